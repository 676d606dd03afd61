"""Dashboard state: a projection of the tab's voice session, for display.

``ChatState`` holds the finished transcript, status and controls. ``StreamState`` is
a small state of its own for what changes every 30-50 ms (the reply being streamed,
the interim user words, the audio queue), so only its readers re-render and an
update carries only the newest segments: the reply streams as a window of its last
few segments (``seg_base`` + ``seg_tail``); the browser component keeps the list.

Turns run in the tab's :class:`~voiceclaw_app.session.VoiceSession` (on its
``/ws/voice``); ``states/projection.py`` writes its events here. Handlers here never
start or cancel a turn: what the session must know (typed text, conversation id,
mute, stop) goes to it on the voice socket from the page (``assets/mic_capture.jsx``).
"""

from __future__ import annotations

import asyncio
import json
import secrets

import reflex as rx

from ..db import repo
from ..server.auth import sign_audio_url, sign_stored_url
from .auth import require_user

STATUS_WORDS = ("warming up", "idle", "listening", "thinking", "speaking", "error")
#: this process's id: a status stamped by another (an earlier run) is stale after a restart
BOOT_ID = secrets.token_hex(6)
RESTART_NOTICE = "The server restarted while a reply was in progress: it was stopped. What was said is kept in the history."


def audio_url(url: str, audio_id: str, user_id: int) -> str:
    """The one place audio URLs for the page are made (the projection's and replay's):
    signed for the user (``server/auth.py``), so only they can fetch it (a fixed phrase
    comes with its URL only: its id is read from it)."""
    return sign_audio_url(audio_id, user_id) if audio_id else sign_stored_url(url, user_id)


class ChatState(rx.State):
    conversation_id: str = ""
    messages: list[dict[str, str]] = []
    #: the session's status (derived in session/status.py, projected here)
    session_status: str = "idle"
    #: the process that projected ``session_status`` (see ``restore_after_load``)
    session_boot: str = ""
    #: the embedded engines are still loading
    warming: bool = False
    #: the browser could not open the mic (permission, no device): set by the mic component
    mic_error: str = ""
    notice: str = ""
    error: str = ""
    muted: bool = False
    input_mode: str = "hands_free"
    draft: str = ""
    conversations: list[dict[str, str]] = []
    #: the mic is on (hands-free) or the button is held (push-to-talk): from the session
    mic_on: bool = False
    taken_over: bool = False
    last_audio_ids: list[str] = []
    engines: dict[str, str] = {}
    #: the last typed message and its own id: the page's mic component sends an id once
    #: per tab (a reloaded page gets both back with the state and must not send it again)
    say_id: str = ""
    say_text: str = ""

    @rx.var
    def status(self) -> str:
        """What the badge shows: the session's status, or the page's own warm-up / mic error."""
        if self.session_status == "idle" and self.warming:
            return "warming up"
        if self.mic_error and self.session_status in ("idle", "listening"):
            return "error"
        return self.session_status

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
        from . import services

        user = await require_user(self)  # reads the connection's headers: no lock needed
        if user is None:
            return
        settings = await services.load_settings(user.id)
        convs = await asyncio.to_thread(repo.list_conversations, user.id, "", 50)
        async with self:
            stream = await self.get_state(StreamState)
            restore_after_load(stream, self)
            self.input_mode = settings.input_mode
            self.conversations = [_conv_row(c) for c in convs]
            if self.conversation_id:
                msgs = await asyncio.to_thread(repo.list_messages, user.id, self.conversation_id)
                self.messages = [_msg_row(m) for m in msgs]
        for _ in range(600):
            status = services.engine_status()
            warming = any(v == "warming" for v in status.values())
            async with self:
                self.engines = status
                self.warming = warming
            if not warming:
                return
            await asyncio.sleep(1.0)

    @rx.event
    async def send_text(self, form: dict | None = None):
        """A typed message goes to the tab's voice session through the page's voice socket
        (opened for it when the mic is off): the session runs the turn."""
        if await require_user(self) is None:
            return
        text = (form or {}).get("text", self.draft) if isinstance(form, dict) else self.draft
        text = (text or "").strip()
        if not text:
            return
        self.draft = ""
        self.say_text = text
        self.say_id = secrets.token_hex(8)

    @rx.event
    async def stop(self):
        """Stop button: the page stops playback and the mic and tells the session "stop"."""
        if await require_user(self) is None:
            return
        stream = await self.get_state(StreamState)
        stream.stop_seq += 1
        stream.audio_stop_seq += 1

    async def _leave_conversation(self) -> None:
        """Stop the page's playback; the conversation id the page sends next tells the
        session to cancel its reply (the mic keeps listening)."""
        stream = await self.get_state(StreamState)
        stream.reset_turn("")
        stream.audio_stop_seq += 1
        stream.audio_urls = []
        stream.audio_done = True

    @rx.event
    async def new_conversation(self):
        if await require_user(self) is None:
            return
        await self._leave_conversation()
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
        await self._leave_conversation()
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
        urls = [audio_url(store.url_for(a), a, user.id) for a in self.last_audio_ids if store.path_for(a) is not None]
        if not urls:
            self.notice = "No audio to replay."
            return
        stream = await self.get_state(StreamState)
        stream.audio_turn = f"replay-{secrets.token_hex(6)}"
        stream.audio_urls = urls
        stream.audio_done = True

    # ---- reports from the mic component (small payloads) ----------------
    @rx.event
    async def on_mic_event(self, payload: str):
        """The mic component: listening / stopped / error:<message> / taken_over (the
        session says the same on the voice socket; here only what the page alone knows)."""
        if await require_user(self) is None or not isinstance(payload, str):
            return
        if payload == "listening":
            if self.taken_over:  # this tab took the mic back
                self.notice = ""
            self.taken_over = False
            self.mic_error = ""
            self.error = ""
        elif payload.startswith("error:"):
            self.mic_error = self.error = payload[6:].strip()


def restore_after_load(stream, chat) -> None:
    """``on_load``: a reply still streaming is resent whole once (updates carry only its
    last segments, and a new page's text component starts empty); after a server
    restart a status left on "thinking"/"speaking" by the previous process is cleared
    with a notice (nothing of that process runs any more).

    ``on_load`` also runs on a mere socket reconnect, while the page still shows and
    plays everything: nothing else changes here (what a *new* page means for playback
    the session learns from the voice socket closing)."""
    if stream.streaming and stream.turn_id:
        stream.seg_base = 0
        stream.seg_tail = list(stream._segments)
    if chat.session_boot != BOOT_ID and (chat.session_status in ("thinking", "speaking") or stream.streaming):
        chat.session_status = "idle"
        chat.session_boot = BOOT_ID
        chat.mic_on = False
        chat.notice = RESTART_NOTICE
        stream.reset_turn("")
        stream.audio_urls = []
        stream.audio_done = True
        stream._segments = []


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
    #: every segment of the reply streaming now (backend only: resent whole after a reload)
    _segments: list[str] = []

    def reset_turn(self, turn_id: str) -> None:
        self.turn_id = turn_id
        self.streaming = bool(turn_id)
        self.seg_base = 0
        self.seg_tail = []
        self._segments = []
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
