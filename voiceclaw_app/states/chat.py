"""Dashboard state.

``ChatState`` holds the finished transcript, status and controls. ``StreamState`` is
a small state of its own for what changes every 30-50 ms (the reply being streamed,
the interim user words, the audio queue), so only its readers re-render and an
update carries only the newest segments: the reply streams as a window of its last
few segments (``seg_base`` + ``seg_tail``); the browser component keeps the list.
Turn work runs in tasks owned by :mod:`voiceclaw_app.states.turns`, which update
these states with ``app.modify_state``; handlers here never block.
"""

from __future__ import annotations

import asyncio
import json
import secrets

import reflex as rx

from ..db import repo
from ..server.auth import sign_audio_url
from .auth import require_user

STATUS_WORDS = ("warming up", "idle", "listening", "thinking", "speaking", "error")


class ChatState(rx.State):
    conversation_id: str = ""
    messages: list[dict[str, str]] = []
    status: str = "idle"
    notice: str = ""
    error: str = ""
    muted: bool = False
    input_mode: str = "hands_free"
    draft: str = ""
    conversations: list[dict[str, str]] = []
    #: the mic is on (hands-free) or the button is held (push-to-talk)
    mic_on: bool = False
    taken_over: bool = False
    last_audio_ids: list[str] = []
    engines: dict[str, str] = {}

    @rx.event
    async def set_draft(self, value: str):
        if await require_user(self) is None:
            return
        self.draft = value

    @rx.event
    async def set_muted(self, value: bool):
        if await require_user(self) is None:
            return
        self.muted = bool(value)

    @rx.event
    async def set_input_mode(self, value: str):
        user = await require_user(self)
        if user is None or value not in ("push_to_talk", "hands_free"):
            return
        self.input_mode = value
        settings = await asyncio.to_thread(repo.load_settings, user.id)
        if settings.input_mode != value:  # a voice preference: the user's own
            await asyncio.to_thread(repo.save_user_prefs, user.id, settings.replace(input_mode=value))

    @rx.event(background=True)
    async def on_load(self):
        """Load the conversation list and settings; report engine warm-up until ready."""
        from . import services, turns

        user = await require_user(self)  # reads the connection's headers: no lock needed
        if user is None:
            return
        settings = await services.load_settings(user.id)
        convs = await asyncio.to_thread(repo.list_conversations, user.id, "", 50)
        async with self:
            stream = await self.get_state(StreamState)
            restore_after_load(self.router.session.client_token, stream, self)
            self.input_mode = settings.input_mode
            self.conversations = [_conv_row(c) for c in convs]
            if self.conversation_id:
                msgs = await asyncio.to_thread(repo.list_messages, user.id, self.conversation_id)
                self.messages = [_msg_row(m) for m in msgs]
        for _ in range(600):
            status = services.engine_status()
            warming = [k for k, v in status.items() if v == "warming"]
            async with self:
                self.engines = status
                if warming and self.status in ("idle", "warming up"):
                    self.status = "warming up"
                elif not warming and self.status == "warming up":
                    self.status = "idle"
            if not warming:
                return
            await asyncio.sleep(1.0)

    @rx.event
    async def send_text(self, form: dict | None = None):
        user = await require_user(self)
        if user is None:
            return
        text = (form or {}).get("text", self.draft) if isinstance(form, dict) else self.draft
        text = (text or "").strip()
        if not text:
            return
        self.draft = ""
        from . import turns

        turns.start_turn(self.router.session.client_token, text, speak=not self.muted, spoken_input=False, conversation_id=self.conversation_id, user_id=user.id)

    @rx.event
    async def stop(self):
        """Stop button: cancel the turn, stop playback and the mic."""
        from . import turns

        if await require_user(self) is None:
            return
        token = self.router.session.client_token
        turns.interrupt(token, reason="stop")
        self.mic_on = False
        stream = await self.get_state(StreamState)
        stream.stop_seq += 1
        stream.audio_stop_seq += 1
        if self.status in ("thinking", "speaking", "listening"):
            self.status = "idle"

    async def _leave_conversation(self, reason: str) -> None:
        """Cancel the running turn and stop its playback (the mic keeps listening)."""
        from . import turns

        turns.interrupt(self.router.session.client_token, reason=reason)
        stream = await self.get_state(StreamState)
        stream.reset_turn("")
        stream.audio_stop_seq += 1
        stream.audio_urls = []
        stream.audio_done = True
        if self.status in ("thinking", "speaking"):
            self.status = "listening" if self.mic_on else "idle"

    @rx.event
    async def new_conversation(self):
        if await require_user(self) is None:
            return
        await self._leave_conversation("new")
        self.conversation_id = ""
        self.messages = []
        self.last_audio_ids = []

    @rx.event
    async def pick_conversation(self, conversation_id: str):
        user = await require_user(self)
        if user is None or not isinstance(conversation_id, str) or not conversation_id:
            return
        if await asyncio.to_thread(repo.get_conversation, user.id, conversation_id) is None:
            self.notice = "Conversation not found."
            return
        await self._leave_conversation("pick")
        msgs = await asyncio.to_thread(repo.list_messages, user.id, conversation_id)
        self.conversation_id = conversation_id
        self.messages = [_msg_row(m) for m in msgs]
        last = next((m for m in reversed(msgs) if m["role"] == "assistant"), None)
        self.last_audio_ids = list(last["audio_ids"]) if last else []

    @rx.event
    async def replay_last(self):
        from . import services

        user = await require_user(self)
        if user is None:
            return
        store = services.audio_store()
        urls = [sign_audio_url(a, user.id) for a in self.last_audio_ids if store.path_for(a) is not None]
        if not urls:
            self.notice = "No audio to replay."
            return
        stream = await self.get_state(StreamState)
        stream.audio_turn = f"replay-{secrets.token_hex(6)}"
        stream.audio_urls = urls
        stream.audio_done = True

    # ---- reports from the browser components (small payloads) ----------
    @rx.event
    async def on_mic_event(self, payload: str):
        """The mic component: listening / stopped / error:<message> / taken_over."""
        if await require_user(self) is None or not isinstance(payload, str):
            return
        if payload == "listening":
            self.mic_on = True
            if self.taken_over:  # this tab took the mic back
                self.notice = ""
            self.taken_over = False
            self.error = ""
            if self.status in ("idle", "error", "warming up"):
                self.status = "listening"
        elif payload == "stopped":
            self.mic_on = False
            if self.status == "listening":
                self.status = "idle"
        elif payload == "taken_over":
            self.mic_on = False
            self.taken_over = True
            self.notice = "The microphone was taken over by another tab."
            if self.status == "listening":
                self.status = "idle"
        elif payload.startswith("error:"):
            self.mic_on = False
            self.error = payload[6:].strip()
            self.status = "error"

    @rx.event
    async def on_audio_event(self, payload: str):
        """The audio queue: {"event": "mounted"|"first_playing"|"chunk"|"ended"|"stopped", ...}."""
        if await require_user(self) is None:
            return
        try:
            data = json.loads(payload)
        except ValueError:
            return
        if not isinstance(data, dict):
            return
        stream = await self.get_state(StreamState)
        apply_audio_report(self.router.session.client_token, data, stream, self)


def apply_audio_report(token: str, data: dict, stream, chat) -> None:
    """An audio queue report applied to the tab's StreamState / ChatState (or test doubles)."""
    from . import turns

    kind = data.get("event")
    if kind == "mounted":
        queue_mounted(token, stream, chat)
        return
    turns.audio_report(token, data)
    current = data.get("turn") == stream.audio_turn
    if not current:
        return  # a late report of a queue that was replaced
    running = turns.active(token)
    if kind == "stopped" and running is not None and running.turn_id == data.get("turn"):
        # the queue stopped mid-reply (the page was left, or a barge-in/Stop the
        # server has not acted on yet): nothing more of this turn will be heard,
        # so it ends now, stored up to the chunks played, marked interrupted
        turns.interrupt(token, reason="playback stopped")
    if kind in ("first_playing", "chunk") and chat.status in ("thinking", "listening", "idle"):
        chat.status = "speaking"
    elif kind in ("ended", "stopped"):
        if chat.status == "speaking":
            chat.status = "listening" if chat.mic_on else "idle"
        if stream.audio_done or kind == "stopped":
            stream.audio_urls = []  # played: a remounted queue must not play them again


def restore_after_load(token: str, stream, chat) -> None:
    """``on_load``: a reply still streaming is resent whole once (updates carry only
    its last segments, and a new page's text component starts empty).

    Nothing else here: ``on_load`` also runs on a mere socket reconnect, while the
    page still shows and plays everything; what a *new* page means for playback is
    in :func:`queue_mounted` (its audio queue reports being mounted).
    """
    from . import turns

    t = turns.active(token)
    if t is not None and stream.turn_id == t.turn_id:
        stream.seg_base = 0
        stream.seg_tail = list(t.segments)


def queue_mounted(token: str, stream, chat) -> None:
    """A new audio queue was mounted (the dashboard was loaded, reloaded or reopened):
    whatever the previous page played is gone.

    - The new queue plays nothing that was played before: the finished turn's URLs go.
    - (A reply cut by leaving the page is reported by the old page itself, on the
      mic socket or as a "stopped" report.)
    - The new page's mic is off: "listening" from the old page would be a lie.
    - Nothing is producing or playing any more: a "speaking"/"thinking" status
      would stay forever (nobody reports "ended"), keep the page busy and turn a
      tap on the voice button into a barge-in: back to idle.
    """
    from . import turns

    # a new page's mic starts off (capture needs a tap, which comes after this report)
    chat.mic_on = False
    if chat.status == "listening":
        chat.status = "idle"
    turns.playback_gone(token)
    t = turns.active(token)
    if t is None or stream.audio_turn != t.turn_id:
        stream.audio_urls = []
        stream.audio_done = True
    if not turns.speaking(token) and chat.status in ("speaking", "thinking"):
        chat.status = "idle"


class StreamState(rx.State):
    """What streams: kept small; each update carries only the newest pieces."""

    turn_id: str = ""
    streaming: bool = False
    user_interim: str = ""
    seg_base: int = 0
    seg_tail: list[str] = []
    audio_turn: str = ""
    audio_urls: list[str] = []
    #: the turn has produced all its audio: the queue reports "ended" only then
    audio_done: bool = True
    #: Stop button (mic and playback)
    stop_seq: int = 0
    #: playback only (new conversation, another conversation picked)
    audio_stop_seq: int = 0
    cue: str = ""

    def reset_turn(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.streaming = bool(turn_id)
        self.seg_base = 0
        self.seg_tail = []
        if turn_id:
            self.audio_turn = turn_id
            self.audio_urls = []
            self.audio_done = False


def _msg_row(m: dict) -> dict[str, str]:
    return {
        "id": str(m.get("id") or ""),
        "role": m["role"],
        "content": m["content"],
        "interrupted": "1" if m.get("interrupted") else "",
        "error": m.get("error") or "",
    }


def _conv_row(c: dict) -> dict[str, str]:
    import time

    return {"id": c["id"], "title": c["title"], "date": time.strftime("%Y-%m-%d %H:%M", time.localtime(c["updated_at"]))}
