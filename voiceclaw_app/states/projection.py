"""Session events -> the tab's Reflex state (``StreamState`` / ``ChatState``).

The voice session decides; this only shows. One :class:`Projection` per session,
created by the hub (``projection_for``), writes through a *sink*: :class:`ReflexSink`
(``app.modify_state``, the app passed in) or an in-memory one in tests.

Token batching lives here: reply tokens are collected and sent every ~40 ms as a
segment, and an update carries only the last :data:`TAIL` segments (the browser
component keeps the list); the full list is a backend var (``StreamState._segments``)
so a reloaded page gets the reply resent whole once (``chat.restore_after_load``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Callable

from ..db import repo
from ..session import events as ev
from .chat import BOOT_ID, RESTART_NOTICE, ChatState, StreamState, _conv_row, _msg_row, audio_url

log = logging.getLogger("voiceclaw.projection")

FLUSH_S = 0.04  # token batching interval
TAIL = 32  # segments carried per update (~1.3 s of batches: a late render or a reload loses none)


class NotTheOwnersTab(Exception):
    """The tab now shows another user's data (logged out, someone else logged in)."""


class ReflexSink:
    """Applies a change to a tab's (StreamState, ChatState) through ``app.modify_state``,
    only while the tab is still its user's: after a logout (or another login in the same
    tab) a reply still running for the previous user must not stream into it."""

    def __init__(self, app: Any, user_id: int) -> None:
        self.app = app
        self.user_id = user_id

    @contextlib.asynccontextmanager
    async def states(self, token: str) -> AsyncIterator[tuple[StreamState, ChatState]]:
        import reflex as rx

        from .auth import AccessState

        async with self.app.modify_state(rx.BaseStateToken(ident=token, cls=StreamState)) as root:
            access = await root.get_state(AccessState)
            if access._owner != self.user_id:
                raise NotTheOwnersTab(token)
            stream = await root.get_state(StreamState)
            chat = await root.get_state(ChatState)
            yield stream, chat


class Projection:
    """One session's events applied to its tab's state (the session's subscriber)."""

    def __init__(self, sink: Any, token: str, user_id: int = 0) -> None:
        self.sink = sink
        self.token = token
        self.user_id = user_id
        self.turn_id = ""  # the reply streaming now
        self.segments: list[str] = []
        self.pending = ""
        self._flusher: asyncio.Task | None = None

    async def apply(self, fn: Callable[[Any, Any], None]) -> None:
        try:
            async with self.sink.states(self.token) as (stream, chat):
                fn(stream, chat)
        except NotTheOwnersTab:
            log.info("not shown: tab %s is no longer user %s's", self.token[:8], self.user_id)
        except Exception:
            log.exception("state update failed")

    async def __call__(self, e: ev.SessionEvent) -> None:
        if isinstance(e, ev.ReplyToken):
            if e.turn_id == self.turn_id:
                self.pending += e.text
        elif isinstance(e, ev.TurnStarted):
            await self._turn_started(e)
        elif isinstance(e, ev.ReplyAudio):
            await self.flush()
            url = audio_url(e.url, e.audio_id, self.user_id)

            def add(stream, chat) -> None:
                if stream.audio_turn == e.turn_id:
                    stream.audio_urls = stream.audio_urls + [url]

            await self.apply(add)
        elif isinstance(e, ev.TurnFinished):
            await self._turn_finished(e)
        elif isinstance(e, ev.ReplyCut):
            mid = str(e.message_id or "")

            def cut(stream, chat) -> None:
                chat.messages = [({**m, "content": e.content, "interrupted": "1"} if m.get("id") == mid and m.get("role") == "assistant" else m) for m in chat.messages]

            await self.apply(cut)
        elif isinstance(e, ev.StatusChanged):

            def status(stream, chat) -> None:
                log.debug("tab %s: status %s (stamped by %s) -> %s (this process %s)", self.token[:8], chat.session_status, chat.session_boot or "-", e.status, BOOT_ID)
                if chat.session_boot and chat.session_boot != BOOT_ID and chat.session_status in ("thinking", "speaking"):
                    # the tab's previous status came from a process that is gone (a restart,
                    # a worker that died mid-reply): say what happened to that reply
                    chat.notice = RESTART_NOTICE
                chat.session_status = e.status
                chat.session_boot = BOOT_ID

            await self.apply(status)
        elif isinstance(e, ev.MicChanged):

            def mic(stream, chat) -> None:
                chat.mic_on = e.on
                if e.on and chat.taken_over:  # this tab took the mic back: the notice is stale
                    chat.taken_over = False
                    chat.notice = ""

            await self.apply(mic)
        elif isinstance(e, ev.UserInterim):
            await self.apply(lambda stream, chat: setattr(stream, "user_interim", e.text))
        elif isinstance(e, ev.Notice):
            await self.apply(lambda stream, chat: setattr(chat, "notice", e.message))
        elif isinstance(e, ev.StillWorkingCue):

            def working(stream, chat) -> None:
                stream.cue = f"still_working:{e.waited_ms}"
                chat.notice = "Still working…"

            await self.apply(working)
        elif isinstance(e, ev.ErrorRaised):
            await self.apply(lambda stream, chat: setattr(chat, "error", e.message))
        elif isinstance(e, ev.TakenOver):

            def taken(stream, chat) -> None:
                chat.mic_on = False
                chat.taken_over = True
                chat.notice = "The microphone was taken over by another tab."

            await self.apply(taken)
        elif isinstance(e, ev.PlaybackEnded):

            def ended(stream, chat) -> None:
                if stream.audio_turn == e.turn_id and (stream.audio_done or e.stopped):
                    stream.audio_urls = []  # played: a remounted queue must not play them again

            await self.apply(ended)
        elif isinstance(e, ev.PageGone):
            running = self.turn_id

            def gone(stream, chat) -> None:
                # a new page plays nothing the previous page played
                if not running or stream.audio_turn != running:
                    stream.audio_urls = []
                    stream.audio_done = True

            await self.apply(gone)

    # ---- the streaming reply ---------------------------------------------
    async def _turn_started(self, e: ev.TurnStarted) -> None:
        await self._stop_flusher()
        self.turn_id, self.segments, self.pending = e.turn_id, [], ""
        try:
            convs = await asyncio.to_thread(repo.list_conversations, self.user_id, "", 50)
        except Exception:
            log.exception("could not list conversations")
            convs = None

        def begin(stream, chat) -> None:
            chat.conversation_id = e.conversation_id
            chat.messages = chat.messages + [_msg_row({"id": e.user_message_id, "role": "user", "content": e.user_text})]
            chat.notice = ""
            chat.error = ""
            if convs is not None:
                chat.conversations = [_conv_row(c) for c in convs]
            stream.user_interim = ""
            stream.reset_turn(e.turn_id)

        await self.apply(begin)
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if self.pending:
                await self.flush()

    async def flush(self) -> None:
        if not self.pending:
            return
        self.segments.append(self.pending)
        self.pending = ""
        segs, turn_id = list(self.segments), self.turn_id

        def window(stream, chat) -> None:
            if stream.turn_id != turn_id:
                return
            base = max(0, len(segs) - TAIL)
            stream.seg_base = base
            stream.seg_tail = segs[base:]
            stream._segments = segs

        await self.apply(window)

    async def _stop_flusher(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher
            self._flusher = None

    async def _turn_finished(self, e: ev.TurnFinished) -> None:
        await self._stop_flusher()
        if e.turn_id == self.turn_id:
            await self.flush()
            self.turn_id = ""

        def finish(stream, chat) -> None:
            shown = chat.conversation_id == e.conversation_id  # not after "new conversation" or picking another one
            row = _msg_row({"id": e.message_id, "role": "assistant", "content": e.content, "interrupted": e.interrupted, "error": e.error})
            if shown and (e.content or e.error or e.interrupted):
                chat.messages = chat.messages + [row]
            if shown:
                chat.last_audio_ids = list(e.audio_ids)
            if e.error and shown:
                chat.error = e.error
            if stream.audio_turn == e.turn_id:
                stream.audio_done = True  # the queue may now report "ended" when it drains
            if stream.turn_id == e.turn_id:
                stream.streaming = False
                stream.turn_id = ""
                stream._segments = []

        await self.apply(finish)

