"""``/history``: conversations (newest first, searchable), messages, latency waterfalls."""

import reflex as rx

from ..components.audio_queue import audio_queue
from ..components.layout import page
from ..states.history import HistoryState


def conv_item(c: rx.Var) -> rx.Component:
    return rx.box(
        rx.text(c["title"], weight="bold", size="2"),
        rx.text(c["date"], size="1", color="gray"),
        on_click=HistoryState.select(c["id"]),
        class_name="vc-conv",
        data_conversation_id=c["id"],
        cursor="pointer",
        padding="0.4em",
        border_radius="6px",
        background=rx.cond(HistoryState.selected == c["id"], "var(--accent-4)", "transparent"),
    )


def msg_item(m: rx.Var) -> rx.Component:
    return rx.box(
        rx.hstack(
            rx.text(rx.cond(m["role"] == "user", "You", "Assistant"), weight="bold", size="1"),
            rx.text(m["time"], size="1", color="gray"),
            rx.cond(m["interrupted"] != "", rx.badge("interrupted", color_scheme="orange", class_name="vc-interrupted")),
            rx.cond(m["audio"] != "", rx.button("Replay", size="1", variant="soft", on_click=HistoryState.replay(m["id"]))),
            align="center",
        ),
        rx.cond(m["role"] == "assistant", rx.markdown(m["content"], use_raw=False, use_math=False, use_katex=False), rx.text(m["content"])),
        data_role=m["role"],
        data_interrupted=m["interrupted"],
        class_name="vc-history-msg",
        padding="0.4em 0.6em",
        margin_y="0.25em",
        border_radius="6px",
        background=rx.cond(m["role"] == "user", "var(--accent-3)", "var(--gray-3)"),
    )


def wf_row(r: rx.Var) -> rx.Component:
    return rx.cond(
        r["kind"] == "head",
        rx.text(r["label"], weight="bold", size="2", margin_top="0.6em", class_name="vc-wf-head"),
        rx.box(
            rx.text(r["label"], width="9em", size="1"),
            rx.box(rx.box(class_name="vc-wf-bar", left=r["left"], width=r["width"]), class_name="vc-wf-track"),
            rx.text(r["ms"], width="9em", size="1"),
            class_name="vc-wf-row",
        ),
    )


def summary_table() -> rx.Component:
    return rx.table.root(
        rx.table.header(rx.table.row(rx.table.column_header_cell("last 50 turns"), rx.table.column_header_cell("p50"), rx.table.column_header_cell("p95"), rx.table.column_header_cell("n"))),
        rx.table.body(rx.foreach(HistoryState.summary, lambda s: rx.table.row(rx.table.cell(s["name"]), rx.table.cell(s["p50"]), rx.table.cell(s["p95"]), rx.table.cell(s["n"])))),
        id="latency-summary",
        size="1",
    )


def history() -> rx.Component:
    return page(
        rx.hstack(
            rx.input(placeholder="Search conversations", value=HistoryState.search, on_change=HistoryState.set_search.debounce(300), id="history-search"),
            rx.spacer(),
            rx.cond(
                HistoryState.confirm_all,
                rx.hstack(
                    rx.text("Delete every conversation?", size="2"),
                    rx.button("Yes, delete all", color_scheme="red", on_click=HistoryState.delete_all, id="confirm-delete-all"),
                    rx.button("Cancel", variant="soft", on_click=HistoryState.cancel_delete_all),
                ),
                rx.button("Delete all", color_scheme="red", variant="soft", on_click=HistoryState.ask_delete_all, id="delete-all"),
            ),
            margin_y="1em",
            width="100%",
        ),
        summary_table(),
        rx.hstack(
            rx.box(rx.foreach(HistoryState.conversations, conv_item), id="conversation-list", width="30%", min_width="12em", max_height="70vh", overflow_y="auto"),
            rx.box(
                rx.cond(
                    HistoryState.selected != "",
                    rx.box(
                        rx.hstack(
                            rx.heading(HistoryState.selected_title, size="3"),
                            rx.spacer(),
                            rx.button("Export Markdown", size="1", variant="soft", on_click=HistoryState.export("md"), id="export-md"),
                            rx.button("Export JSON", size="1", variant="soft", on_click=HistoryState.export("json"), id="export-json"),
                            rx.button("Delete", size="1", color_scheme="red", variant="soft", on_click=HistoryState.delete_selected, id="delete-conversation"),
                            align="center",
                        ),
                        rx.box(rx.foreach(HistoryState.messages, msg_item), id="history-messages"),
                        rx.heading("Latency per turn (ms after speech end)", size="2", margin_top="1em"),
                        rx.box(rx.foreach(HistoryState.waterfall, wf_row), id="latency-waterfall"),
                    ),
                    rx.text("Pick a conversation.", color="gray"),
                ),
                width="70%",
            ),
            align="start",
            width="100%",
            margin_top="1em",
        ),
        rx.cond(
            HistoryState.replaying,
            rx.button("Stop replay", id="stop-replay", color_scheme="red", variant="soft", on_click=HistoryState.stop_replay, position="fixed", bottom="1em", right="1em"),
        ),
        audio_queue(urls=HistoryState.replay_urls, turn_id=HistoryState.replay_turn, done=True, stop_seq=HistoryState.replay_stop_seq, cue="", on_report=HistoryState.on_audio_event),
        title="History",
    )
