"""One reply of the assistant (LiveKit's SpeechHandle): its task, cancel, marks,
the playback ledger, and the ordered writes of its stored message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from ..pipeline.timing import TurnMarks, now_ms
from ..providers.base import CancelToken
from .playback import PlaybackLedger

log = logging.getLogger("voiceclaw.reply")

#: a reply's text is written at least this often while it streams (a crash keeps it)
PROGRESS_WRITE_MS = 1000.0


@dataclass
class ReplyHandle:
    conversation_id: str
    speak: bool
    text: str = ""  # what the user said or typed
    #: the early turn started at the pause was kept (the listener's guess held)
    reused: bool = False
    committed_ms: float = field(default_factory=now_ms)
    turn_id: str = field(default_factory=lambda: secrets.token_hex(6))
    cancel: CancelToken = field(default_factory=CancelToken)
    task: asyncio.Task | None = None
    marks: TurnMarks = field(default_factory=TurnMarks)
    ledger: PlaybackLedger = field(default_factory=PlaybackLedger)
    message_id: int | None = None
    reply_text: str = ""
    interrupted: bool = False
    done: bool = False
    finished: bool = False  # the final write stored the reply
    error: str = ""
    #: the page that was to play this reply went away while it ran: no "ended" will come
    page_left: bool = False
    last_write_ms: float = 0.0
    #: the latest write of the assistant message (writes run in order, see :meth:`write`)
    _db_last: asyncio.Future | None = None

    @property
    def cut(self) -> bool:
        """An interrupted spoken reply keeps only what was heard."""
        return self.interrupted and self.speak

    def interrupt(self, reason: str) -> bool:
        """Cancel the running reply (barge-in, stop, new conversation); False if it is over."""
        if self.done:
            return False
        self.interrupted = True
        self.cancel.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        log.info("turn %s interrupted (%s) after %d played chunk(s)", self.turn_id, reason, self.ledger.played)
        return True

    async def settled(self, timeout_s: float = 1.5) -> None:
        """Wait (bounded) until a cancelled reply has stored its cut."""
        task = self.task
        if task is None or task.done() or task is asyncio.current_task() or not self.cancel.cancelled:
            return
        with contextlib.suppress(Exception, asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout_s)

    def stored_text(self) -> str:
        if self.cut:
            return " ".join(t.strip() for _, t in self.ledger.kept(cut=True) if t.strip())
        return self.reply_text.strip()

    def stored_audio(self) -> list[str]:
        return [a for a, _ in self.ledger.kept(cut=self.cut)]

    async def write(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run a blocking write of this reply's message; writes run in order.

        A barge-in cancels the turn task while an incremental write may be running in
        a thread; abandoned, it could land after the final write and undo the cut.
        Each write waits for the one before it and survives its caller's cancellation."""
        prev = self._db_last
        self.last_write_ms = now_ms()

        async def run() -> None:
            if prev is not None:
                with contextlib.suppress(BaseException):
                    await prev
            await asyncio.to_thread(fn, *args, **kwargs)

        self._db_last = fut = asyncio.ensure_future(run())
        await asyncio.shield(fut)
