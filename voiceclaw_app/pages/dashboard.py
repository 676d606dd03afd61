"""``/``: voice button, status, live transcript, audio queue, text input, controls."""

import reflex as rx

from ..components.audio_queue import audio_queue, stream_text
from ..components.layout import page
from ..components.mic import mic_capture
from ..states.chat import ChatState, StreamState


def message_view(m: rx.Var) -> rx.Component:
    return rx.box(
        rx.text(rx.cond(m["role"] == "user", "You", "Assistant"), weight="bold", size="1", color="gray"),
        rx.cond(
            m["role"] == "assistant",
            rx.markdown(m["content"], use_raw=False, use_math=False, use_katex=False),
            rx.text(m["content"]),
        ),
        rx.cond(m["interrupted"] != "", rx.badge("interrupted", color_scheme="orange", class_name="vc-interrupted")),
        rx.cond(m["error"] != "", rx.text(m["error"], color="red", size="2")),
        data_role=m["role"],
        class_name="vc-msg",
        padding="0.5em 0.8em",
        margin_y="0.3em",
        border_radius="8px",
        background=rx.cond(m["role"] == "user", "var(--accent-3)", "var(--gray-3)"),
    )


def transcript() -> rx.Component:
    return rx.box(
        rx.foreach(ChatState.messages, message_view),
        rx.cond(
            StreamState.user_interim != "",
            rx.box(rx.text(StreamState.user_interim, color="gray", font_style="italic"), id="user-interim", data_role="user-interim"),
        ),
        rx.cond(
            StreamState.streaming,
            rx.box(
                rx.text("Assistant", weight="bold", size="1", color="gray"),
                stream_text(turn_id=StreamState.turn_id, seg_base=StreamState.seg_base, segments=StreamState.seg_tail, id="streaming-reply"),
                data_role="assistant",
                data_streaming="true",
                class_name="vc-msg",
                padding="0.5em 0.8em",
                margin_y="0.3em",
                border_radius="8px",
                background="var(--gray-3)",
            ),
        ),
        id="transcript",
        min_height="200px",
        max_height="55vh",
        overflow_y="auto",
        padding="0.5em",
        border="1px solid var(--gray-5)",
        border_radius="8px",
    )


def controls() -> rx.Component:
    return rx.hstack(
        rx.select.root(
            rx.select.trigger(id="input_mode_switch", aria_label="Input mode"),
            rx.select.content(
                rx.select.item("Hands-free", value="hands_free"),
                rx.select.item("Push to talk (hold button or space)", value="push_to_talk"),
            ),
            value=ChatState.input_mode,
            on_change=ChatState.set_input_mode,
        ),
        rx.hstack(rx.text("Mute replies", size="2"), rx.switch(checked=ChatState.muted, on_change=ChatState.set_muted, id="mute-toggle"), align="center"),
        rx.button("Stop", on_click=ChatState.stop, id="stop-button", color_scheme="red", variant="soft"),
        rx.button("New conversation", on_click=ChatState.new_conversation, id="new-conversation", variant="soft"),
        rx.button("Replay last answer", on_click=ChatState.replay_last, id="replay-last", variant="soft"),
        rx.select.root(
            rx.select.trigger(placeholder="Previous conversations", id="conversation-picker"),
            rx.select.content(rx.foreach(ChatState.conversations, lambda c: rx.select.item(c["title"] + " · " + c["date"], value=c["id"]))),
            on_change=ChatState.pick_conversation,
        ),
        wrap="wrap",
        spacing="3",
        align="center",
    )


def dashboard() -> rx.Component:
    return page(
        rx.hstack(
            mic_capture(
                mode=ChatState.input_mode,
                stop_seq=StreamState.stop_seq,
                busy=(ChatState.status == "thinking") | (ChatState.status == "speaking"),
                conversation_id=ChatState.conversation_id,
                muted=ChatState.muted,
                say_id=ChatState.say_id,
                say_text=ChatState.say_text,
                on_event=ChatState.on_mic_event,
            ),
            rx.vstack(
                rx.hstack(rx.text("Status:", size="2"), rx.badge(ChatState.status, id="voice-status", size="3"), align="center"),
                rx.cond(ChatState.notice != "", rx.text(ChatState.notice, id="notice", size="2", color="gray")),
                rx.cond(ChatState.error != "", rx.callout(ChatState.error, id="error-message", color_scheme="red", size="1")),
            ),
            spacing="5",
            align="center",
            margin_y="1em",
        ),
        controls(),
        rx.box(height="0.8em"),
        transcript(),
        audio_queue(urls=StreamState.audio_urls, turn_id=StreamState.audio_turn, done=StreamState.audio_done, stop_seq=StreamState.audio_stop_seq, cue=StreamState.cue, voice_reports=True),
        rx.form(
            rx.hstack(
                rx.input(name="text", id="text-input", placeholder="Type a message…", value=ChatState.draft, on_change=ChatState.set_draft, width="100%", size="3"),
                rx.button("Send", id="send-button", type="submit", size="3"),
                width="100%",
            ),
            on_submit=ChatState.send_text,
            reset_on_submit=False,
            margin_top="0.8em",
        ),
        title="Talk",
    )
