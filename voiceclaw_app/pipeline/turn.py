"""One conversational turn, from the final transcript to the last audio chunk.

Read top to bottom, a turn is::

    prepare()  (while the user still speaks: settings + bounded history -> request)
    run():     LLM tokens --> SpeechChunker --> SpokenLengthLimiter --> TTSScheduler
                   |               |                                        |
                LLMToken       ChunkText                           AudioReady (in order)

``run`` is one async generator of typed events (:mod:`.events`). Two tasks feed it:
the LLM pump (tokens, chunks, synthesis submissions) and the audio pump (finished
chunks, strictly in order). A watchdog emits :class:`StillWorking` after ~2 s with
no token. Cancelling (``cancel.cancel()``, closing the generator, or cancelling the
task that iterates it) stops the LLM stream and every synthesis, waits for them,
and delivers nothing more.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from ..config import VoiceSettings
from ..providers.base import LLM, TTS, CancelToken, ChatMessage, LLMRequest, ProviderError
from .audio_store import AudioStore
from .events import AudioReady, ChunkText, LLMToken, StillWorking, TurnDone, TurnError, TurnEvent, TurnNotice, UserText
from .phrases import PhraseBook
from .text import Chunk, SpeechChunker, SpokenLengthLimiter
from .timing import TurnMarks, now_ms
from .tts_scheduler import TTSCache, TTSScheduler

log = logging.getLogger("voiceclaw.turn")

STILL_WORKING_AFTER_S = 2.0
#: no first chunk this long after the first token: cut it at the last word boundary
#: (SpeechChunker.cut_first_now), or at the first one after the deadline that has its
#: three words. At ~40 tokens/s that is 4-5 words: the voice starts after ~6 tokens
#: rather than waiting for a clause (measured in README "The first chunk")
FIRST_CHUNK_DEADLINE_S = 0.15
STILL_WORKING_REPEAT_S = 10.0
_END = object()


@dataclass
class PreparedRequest:
    """An LLM request waiting only for the user's words."""

    base: LLMRequest
    conversation_id: str
    spoken: bool
    prepared_at_ms: float = field(default_factory=now_ms)

    def complete(self, user_text: str) -> LLMRequest:
        msgs = list(self.base.messages) + [ChatMessage("user", user_text)]
        return LLMRequest(messages=msgs, model=self.base.model, user=self.base.user, headers=dict(self.base.headers), read_timeout_s=self.base.read_timeout_s, max_tokens=self.base.max_tokens, temperature=self.base.temperature, assistant_name=self.base.assistant_name)


def build_request(settings: VoiceSettings, history: list[ChatMessage], conversation_id: str, spoken: bool = True) -> PreparedRequest:
    """Settings + bounded recent history -> a request missing only the user's words.

    History mode ``server`` (gateway sessions): send ``user`` = conversation id and
    only the new message, since the gateway keeps the session and would duplicate
    history sent again. ``client``: system prompt + the last ``llm_history_turns``
    exchanges.
    """
    server = settings.effective_history_mode(spoken) == "server"
    messages: list[ChatMessage] = []
    if not server:
        if settings.system_prompt.strip():
            messages.append(ChatMessage("system", settings.system_prompt.strip()))
        keep = settings.llm_history_turns * 2
        recent = [m for m in history if m.role in ("user", "assistant") and m.content.strip()]
        messages.extend(recent[-keep:] if keep else [])
    base = LLMRequest(
        messages=messages,
        model=settings.model_for(spoken),
        user=conversation_id if server else None,
        headers=dict(settings.llm_headers),
        read_timeout_s=settings.llm_read_timeout_s,
        assistant_name=settings.assistant_name,
    )
    return PreparedRequest(base, conversation_id, spoken)


class TurnRunner:
    """Runs turns with one set of providers and settings (rebuild it when they change)."""

    def __init__(self, *, llm: LLM, tts: TTS | None, audio_store: AudioStore, settings: VoiceSettings, cache: TTSCache | None = None, phrases: PhraseBook | None = None, speech_unavailable: str | None = None):
        self.llm = llm
        self.tts = tts
        #: why there is no TTS (e.g. the voice's model files are damaged): said on spoken turns
        self.speech_unavailable = speech_unavailable
        self.store = audio_store
        self.settings = settings
        self.cache = cache or TTSCache(audio_store)
        self.phrases = phrases or PhraseBook(tts, audio_store, self.cache, voice=settings.tts_voice, speed=settings.tts_speed)

    def prepare(self, history: list[ChatMessage], conversation_id: str, spoken: bool = True) -> PreparedRequest:
        return build_request(self.settings, history, conversation_id, spoken)

    async def warm(self, prepared: PreparedRequest | None = None) -> None:
        """When the user starts speaking: warm connections and models, and let the LLM
        evaluate the request's prefix (history) now rather than after the last word.
        Never fails the turn."""
        coros = [self.llm.warm()] + ([self.tts.warm()] if self.tts is not None else [])
        if prepared is not None:
            coros.append(self.llm.prefill(prepared.base.messages, prepared.base.assistant_name))
        for result in await asyncio.gather(*coros, return_exceptions=True):
            if isinstance(result, Exception):
                log.debug("warm-up failed: %s", result)

    async def run(self, prepared: PreparedRequest, user_text: str, *, marks: TurnMarks | None = None, cancel: CancelToken | None = None, speak: bool = True) -> AsyncIterator[TurnEvent]:
        marks = marks or TurnMarks()
        cancel = cancel or CancelToken()
        marks.mark("stt_final")
        yield UserText(user_text)
        if speak and self.tts is None and self.speech_unavailable:
            yield TurnNotice(f"{self.speech_unavailable} Replies are text only for now.")
        turn = _Turn(self, prepared, user_text, marks, cancel, speak and self.tts is not None)
        finished = False
        try:
            async for event in turn.events():
                yield event
            finished = not cancel.cancelled
        finally:
            if not finished:
                cancel.cancel()
            try:
                await turn.shutdown()
            finally:
                turn.log_line(cancelled=not finished)


class _Turn:
    """The moving parts of one running turn (kept out of the generator for clarity)."""

    def __init__(self, runner: TurnRunner, prepared: PreparedRequest, user_text: str, marks: TurnMarks, cancel: CancelToken, speak: bool):
        s = runner.settings
        self.runner = runner
        self.prepared = prepared
        self.user_text = user_text
        self.marks = marks
        self.cancel = cancel
        self.queue: asyncio.Queue = asyncio.Queue()
        self.reply: list[str] = []
        self.first_chunk_due = False  # the first chunk's deadline passed
        self.chunker = SpeechChunker(s.first_chunk_min_words)
        self.limiter = SpokenLengthLimiter(s.max_spoken_chars)
        self.scheduler = (
            TTSScheduler(runner.tts, runner.store, voice=s.tts_voice, speed=s.tts_speed, parallel=s.tts_parallel, cancel=cancel, cache=runner.cache, on_first_request=lambda: marks.mark("tts_first_request"))
            if speak and runner.tts is not None
            else None
        )
        self.llm_error: ProviderError | None = None
        self.tts_error: ProviderError | None = None
        self.spoken_chunks = 0
        self.llm_done = asyncio.Event()
        self.last_activity = now_ms()
        self.tasks: list[asyncio.Task] = []
        self.logged = False

    # ------------------------------------------------------------ the event stream
    async def events(self) -> AsyncIterator[TurnEvent]:
        self.tasks = [
            asyncio.create_task(self._llm_pump(), name="turn-llm"),
            asyncio.create_task(self._audio_pump(), name="turn-audio"),
            asyncio.create_task(self._watchdog(), name="turn-watchdog"),
        ]
        supervisor = asyncio.create_task(self._supervise(), name="turn-supervisor")
        self.tasks.append(supervisor)
        self.tasks.append(asyncio.create_task(self._cancel_watch(), name="turn-cancel-watch"))
        while True:
            event = await self.queue.get()
            if event is _END:
                break
            if self.cancel.cancelled:
                return
            yield event
        if self.cancel.cancelled:
            return
        for event in await self._final_events():
            yield event

    async def _cancel_watch(self) -> None:
        """``cancel.cancel()`` from anywhere wakes the consumer at once, even while
        the turn waits for its first token (no other event would come to wake it)."""
        await self.cancel.wait()
        self.queue.put_nowait(_END)

    async def _supervise(self) -> None:
        try:
            await asyncio.gather(self.tasks[0], self.tasks[1])
        finally:
            self.queue.put_nowait(_END)

    async def shutdown(self) -> None:
        """Stop everything this turn started and wait for it (idempotent)."""
        if self.cancel.cancelled and self.scheduler is not None:
            await self.scheduler.aclose()
        for task in self.tasks:
            if not task.done():
                task.cancel()
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)

    def log_line(self, *, cancelled: bool) -> None:
        """The turn's one structured log line (also for cancelled turns, e.g. barge-in)."""
        if self.logged:
            return
        self.logged = True
        self.marks.mark("turn_done")
        reply = "".join(self.reply)
        log.info("turn %s", json.dumps({"conversation": self.prepared.conversation_id, "chars": len(reply), "chunks": self.spoken_chunks, "error": self.llm_error.kind if self.llm_error else None, "cancelled": cancelled, "stages_ms": self.marks.stages()}))

    async def _final_events(self) -> list[TurnEvent]:
        marks = self.marks
        self.log_line(cancelled=False)
        reply = "".join(self.reply).rstrip()  # a stream may end on the newline before its stop
        if self.llm_error is not None:
            # only an already synthesized apology: synthesizing it now (TTS down too?)
            # would hold the error back for seconds
            phrase = self.runner.phrases.cached("error") if self.scheduler is not None else None
            return [TurnError(self.llm_error.user_message, self.llm_error.kind, reply, marks, phrase.url if phrase else None, self.llm_error.detail)]
        if not reply.strip():
            return [TurnError("The assistant sent an empty reply.", "empty", reply, marks)]
        done = TurnDone(reply, marks, self.spoken_chunks, self.limiter.truncated)
        if self.scheduler is not None and self.spoken_chunks == 0 and self.tts_error is None:
            return [TurnNotice("Nothing in this reply can be read aloud (code or symbols only); it is on screen."), done]
        return [done]

    # ------------------------------------------------------------ producers
    async def _llm_pump(self) -> None:
        request = self.prepared.complete(self.user_text)
        self.marks.mark("llm_request")
        self.last_activity = now_ms()
        deadline: asyncio.TimerHandle | None = None
        try:
            async for delta in self.runner.llm.stream(request, self.cancel):
                if self.cancel.cancelled:
                    return
                if deadline is None:
                    deadline = asyncio.get_running_loop().call_later(FIRST_CHUNK_DEADLINE_S, self._first_chunk_deadline)
                self.marks.mark("llm_first_token")
                self.last_activity = now_ms()
                self.reply.append(delta)
                self.queue.put_nowait(LLMToken(delta))
                for chunk in self.chunker.push(delta):
                    self._chunk(chunk)
                if self.first_chunk_due and self.chunker.first_pending:
                    for chunk in self.chunker.cut_first_now():  # the deadline found too few words
                        self._chunk(chunk)
            for chunk in self.chunker.flush():
                self._chunk(chunk)
        except ProviderError as exc:
            self.llm_error = exc
            log.warning("LLM failed (%s): %s", exc.kind, exc.detail or exc.user_message)
        finally:
            if deadline is not None:
                deadline.cancel()
            self.llm_done.set()
            if self.scheduler is not None:
                self.scheduler.close()

    def _first_chunk_deadline(self) -> None:
        """Runs on the loop between two tokens (never inside ``chunker.push``)."""
        self.first_chunk_due = True
        if self.cancel.cancelled or self.llm_done.is_set() or not self.chunker.first_pending:
            return
        for chunk in self.chunker.cut_first_now():
            self._chunk(chunk)

    def _chunk(self, chunk: Chunk) -> None:
        if self.scheduler is None:
            return  # muted (or no TTS): the transcript has the tokens already
        for c in self.limiter.admit(chunk):
            if not c.speech:
                continue  # e.g. a code block: shown, not spoken
            self.marks.mark("first_chunk")
            self.queue.put_nowait(ChunkText(c.seq, c.text, c.speech, c.notice))
            if self.tts_error is None:
                self.scheduler.submit(c)

    async def _audio_pump(self) -> None:
        if self.scheduler is None:
            return
        async for result in self.scheduler.results():
            if result.error is not None:
                for notice in self.runner.tts.drain_notices():
                    self.queue.put_nowait(TurnNotice(notice))
                if self.tts_error is None:
                    self.tts_error = result.error
                    self.queue.put_nowait(TurnNotice(f"{result.error.user_message} The rest of the reply is text only."))
                continue
            if result.audio is None or self.tts_error is not None:
                continue
            self.marks.mark("first_audio_ready")
            if result.part == 0:
                self.spoken_chunks += 1
            a = result.audio
            self.queue.put_nowait(AudioReady(result.chunk.seq, a.audio_id, a.url, a.duration_ms, result.chunk.text if result.part == 0 else "", result.part))
            for notice in self.runner.tts.drain_notices():
                self.queue.put_nowait(TurnNotice(notice))

    async def _watchdog(self) -> None:
        """Say "still working" after ~2 s without a token (tools, slow upstream)."""
        announced_at = 0.0
        while not self.llm_done.is_set():
            quiet = (now_ms() - max(self.last_activity, announced_at)) / 1000.0
            wait = (STILL_WORKING_AFTER_S if announced_at < self.last_activity else STILL_WORKING_REPEAT_S) - quiet
            if wait > 0:
                try:
                    await asyncio.wait_for(self.llm_done.wait(), timeout=wait)
                except asyncio.TimeoutError:
                    pass
                continue
            announced_at = now_ms()
            phrase = self.runner.phrases.cached("still_working") if self.scheduler is not None else None
            self.queue.put_nowait(StillWorking(announced_at - self.last_activity, phrase.url if phrase else None))
