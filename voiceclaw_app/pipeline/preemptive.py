"""From listener events to turns, starting the work before the end of turn is sure.

The silence wait at the end of an utterance (300-800 ms) is the largest block of
dead time in a voice turn. Listeners report a *likely-final* transcript before the
end of turn is confirmed (the local listener at a short pause, Deepgram on
``is_final``): :class:`TurnStarter` starts the whole turn (LLM, chunking, TTS) on
it as an :class:`EarlyTurn` whose events are held back. At the end of turn, if the
words are the same, the early turn is committed and its events (audio already
synthesized, often) flow at once; if the user kept talking or the words changed,
it is cancelled unseen and a fresh turn starts. A wrong guess costs CPU, never
correctness, and never delays the real turn beyond the cancel.

Used by the mic WebSocket and by the ``local`` and ``cloud`` benchmarks, so the
figures measure what the app does.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable

from ..providers.base import CancelToken, EndOfTurn, InterimTranscript, ListenEvent, PreliminaryTranscript, SpeechDiscarded, SpeechStarted
from .events import TurnEvent
from .timing import TurnMarks, now_ms
from .turn import PreparedRequest, TurnRunner

log = logging.getLogger("voiceclaw.preemptive")

_END = object()
_WORDS = re.compile(r"[\w']+")


def same_words(a: str, b: str) -> bool:
    """Transcripts that differ only in case or punctuation ask the same thing."""
    return _WORDS.findall(a.lower()) == _WORDS.findall(b.lower())


def _retrieve(task: asyncio.Task) -> None:
    """Mark a preparation's exception as seen (it is raised where the task is awaited)."""
    if not task.cancelled():
        task.exception()


class EarlyTurn:
    """A running turn whose events wait in a queue until someone iterates :meth:`events`."""

    def __init__(self, runner: TurnRunner, prepared: PreparedRequest, text: str, *, marks: TurnMarks, speak: bool = True):
        self.text = text
        self.marks = marks
        self.cancel = CancelToken()
        self.committed = False
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.create_task(self._pump(runner, prepared, speak), name="early-turn")

    async def _pump(self, runner: TurnRunner, prepared: PreparedRequest, speak: bool) -> None:
        try:
            async for ev in runner.run(prepared, self.text, marks=self.marks, cancel=self.cancel, speak=speak):
                self._queue.put_nowait(ev)
        finally:
            self._queue.put_nowait(_END)

    async def events(self) -> AsyncIterator[TurnEvent]:
        """The turn's events, the held-back ones first. Closing this iterator cancels the turn."""
        finished = False
        try:
            while True:
                ev = await self._queue.get()
                if ev is _END:
                    finished = True
                    return
                yield ev
        finally:
            if not finished:
                await self.discard()

    async def discard(self) -> None:
        """Cancel the turn and wait until all of its work has stopped."""
        self.cancel.cancel()
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@dataclass
class CommittedTurn:
    """The end of turn was confirmed: the user's words and the turn answering them."""

    text: str
    turn: EarlyTurn
    reused: bool  # True when the early turn started at the pause was kept


Prepare = Callable[[], Awaitable[tuple[TurnRunner, PreparedRequest]]]


class TurnStarter:
    """Feed it every listener event; :meth:`handle` returns a :class:`CommittedTurn` at
    each confirmed end of turn.

    ``prepare`` builds the runner and the request (settings, bounded history) and
    warms the providers; it is started when speech starts (already at a tentative
    onset), so none of that work waits for the user to finish. A preparation that
    failed is started again at the next speech start, and one made for an onset
    that turned out to be a cough is dropped (the reply it interrupted goes on and
    will be in the next request's history).
    """

    def __init__(self, prepare: Prepare, *, speculative: bool = True, speak: bool = True):
        self._prepare_fn = prepare
        self.speculative = speculative
        self.speak = speak
        self._prepared: asyncio.Task | None = None
        self.early: EarlyTurn | None = None
        self.discarded = 0

    def _prepare(self) -> asyncio.Task:
        task = self._prepared
        if task is not None and task.done() and (task.cancelled() or task.exception() is not None):
            task = None  # failed (settings unreadable, a provider down): try again, do not re-raise forever
        if task is None:
            task = asyncio.create_task(self._prepare_fn(), name="turn-prepare")
            task.add_done_callback(_retrieve)
            self._prepared = task
        return task

    async def handle(self, ev: ListenEvent) -> CommittedTurn | None:
        if isinstance(ev, SpeechStarted):
            if not ev.tentative:
                # The user is (still, or again) talking: a guess made at a pause is stale.
                await self._drop_early()
            self._prepare()
        elif isinstance(ev, SpeechDiscarded):
            # a cough during a reply (the session passes it on only then): the reply
            # goes on and lands in the history, so the request prepared now would miss it
            if self.early is None:
                self.invalidate()
        elif isinstance(ev, InterimTranscript) and ev.text.strip() and self.early is not None and not same_words(self.early.text, ev.text):
            await self._drop_early()  # new words after a likely-final transcript: the user kept talking
        elif isinstance(ev, PreliminaryTranscript) and self.speculative and ev.text.strip():
            if self.early is not None and same_words(self.early.text, ev.text):
                return None
            await self._drop_early()
            self.early = await self._start(ev.text.strip(), ev.speech_end_ms)
        elif isinstance(ev, EndOfTurn) and ev.text.strip():
            early, self.early = self.early, None
            reused = early is not None and not early.cancel.cancelled and same_words(early.text, ev.text)
            if not reused:
                if early is not None:
                    self.discarded += 1
                    await early.discard()
                early = await self._start(ev.text.strip(), ev.speech_end_ms, stt_final_ms=ev.stt_final_ms)
            assert early is not None
            early.marks.mark("speech_end", ev.speech_end_ms, overwrite=True)
            early.marks.mark("eot_decided", ev.eot_ms, overwrite=True)
            early.committed = True
            self._prepared = None  # the next utterance gets a request with this turn in its history
            return CommittedTurn(ev.text.strip(), early, reused)
        return None

    def invalidate(self) -> None:
        """Drop the prepared request (cancelling its preparation): the history it read is
        stale, e.g. a barge-in is about to store the interrupted reply. The next speech
        start or end of turn prepares a fresh one."""
        task, self._prepared = self._prepared, None
        if task is not None and not task.done():
            task.cancel()

    async def _start(self, text: str, speech_end_ms: float | None, stt_final_ms: float | None = None) -> EarlyTurn:
        runner, prepared = await self._prepare()
        marks = TurnMarks()
        if speech_end_ms is not None:
            marks.mark("speech_end", speech_end_ms)
        marks.mark("stt_final", stt_final_ms if stt_final_ms is not None else now_ms())
        return EarlyTurn(runner, prepared, text, marks=marks, speak=self.speak)

    async def _drop_early(self) -> None:
        if self.early is not None and not self.early.committed:
            early, self.early = self.early, None
            self.discarded += 1
            await early.discard()

    async def aclose(self) -> None:
        """Stop listening: cancel an uncommitted guess and the pending preparation."""
        await self._drop_early()
        if self._prepared is not None and not self._prepared.done():
            self._prepared.cancel()
            await asyncio.gather(self._prepared, return_exceptions=True)
        self._prepared = None
