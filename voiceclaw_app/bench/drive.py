"""What the ``local`` and ``cloud`` benchmarks share: spoken fixtures paced at real
time, and listener events driven into turns by the app's own :class:`TurnStarter`.

:class:`StarterSession` does what the mic WebSocket does (``ws_voice``'s
``_on_listen_event``): every listener event goes to the starter, and the committed
:class:`EarlyTurn` is consumed; here its events are recorded instead of shown. So
the benchmarks measure the app's path, not a copy of it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from ..pipeline.events import AudioReady, ChunkText, TurnDone, TurnError
from ..pipeline.preemptive import CommittedTurn, TurnStarter
from ..pipeline.timing import now_ms
from ..pipeline.turn import PreparedRequest, TurnRunner
from ..providers.base import STT, ChatMessage, Listener, ListenEvent, ListenNotice, Transcript

log = logging.getLogger("voiceclaw.bench")

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
SAMPLE_RATE = 16000


# ---------------------------------------------------------------- fixtures and audio
@dataclass(frozen=True)
class Fixture:
    name: str
    text: str
    pcm: bytes
    last_voiced_sample: int
    first_voiced_sample: int = 0


def load_fixtures(folder: Path = FIXTURES) -> list[Fixture]:
    """Every ``*.wav`` with a ``.json`` sidecar (16 kHz mono PCM16)."""
    out = []
    for wav_path in sorted(folder.glob("*.wav")):
        meta_path = wav_path.with_suffix(".json")
        if not meta_path.exists():
            continue
        meta = json.loads(meta_path.read_text())
        with wave.open(str(wav_path), "rb") as w:
            if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise ValueError(f"{wav_path} is not 16 kHz mono PCM16")
            pcm = w.readframes(w.getnframes())
        out.append(Fixture(wav_path.stem, meta["text"], pcm, int(meta["last_voiced_sample"]), int(meta.get("first_voiced_sample", 0))))
    if not out:
        raise FileNotFoundError(f"no WAV fixtures in {folder} (run tests/fixtures/make_fixtures.py)")
    return out


def dither(n_samples: int, rng: np.random.Generator) -> bytes:
    """Low noise, like a live mic in a quiet room."""
    return rng.integers(-30, 31, n_samples, dtype=np.int16).astype("<i2").tobytes()


async def paced(pcm: bytes, frame_ms: int, t0: float, *, pad: Callable[[int], bytes] | None = None) -> AsyncIterator[tuple[int, bytes, float]]:
    """``pcm`` in frames at real time from ``t0`` (ms, pacing clock).

    Yields ``(first sample, frame, due_ms)`` once the frame's last sample is due;
    after the end, frames of ``pad(n_samples)`` forever when ``pad`` is given (the
    caller stops iterating)."""
    frame_samples = SAMPLE_RATE * frame_ms // 1000
    frame_bytes = frame_samples * 2
    i = 0
    while True:
        frame = pcm[i * frame_bytes : (i + 1) * frame_bytes]
        if len(frame) < frame_bytes:
            if pad is None:
                if not frame:
                    return
            else:
                frame += pad((frame_bytes - len(frame)) // 2)
        due = t0 + 1000.0 * (i * frame_samples + len(frame) // 2) / SAMPLE_RATE
        delay = (due - now_ms()) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        yield i * frame_samples, frame, due
        i += 1


class TimedSTT(STT):
    """An STT that records how long each finished, uncancelled transcription took."""

    def __init__(self, inner: STT) -> None:
        self.inner = inner
        self.capabilities = inner.capabilities
        self.durations: list[float] = []

    async def transcribe(self, pcm16: bytes, *, sample_rate: int = SAMPLE_RATE, language: str = "en", cancel=None) -> Transcript:
        t0 = now_ms()
        result = await self.inner.transcribe(pcm16, sample_rate=sample_rate, language=language, cancel=cancel)
        if cancel is None or not cancel.cancelled:
            self.durations.append(now_ms() - t0)
        return result


# ---------------------------------------------------------------- listener -> TurnStarter -> turn
class WarmingPrepare:
    """The ``prepare`` the app gives its :class:`TurnStarter` (``states.turns.prepare_runner``):
    the request from the current history, and the providers warmed in the background
    (with ``prefill``, the local LLM evaluates the history while the user speaks)."""

    def __init__(self, runner: TurnRunner, history: Callable[[], list[ChatMessage]], conversation_id: str, *, prefill: bool = True) -> None:
        self.runner = runner
        self.history = history
        self.conversation_id = conversation_id
        self.prefill = prefill
        self._background: set[asyncio.Task] = set()

    async def __call__(self) -> tuple[TurnRunner, PreparedRequest]:
        prepared = self.runner.prepare(self.history(), self.conversation_id, spoken=True)
        task = asyncio.create_task(self.runner.warm(prepared if self.prefill else None), name="bench-warm")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return self.runner, prepared

    async def settle(self) -> None:
        """Wait for the warm-ups still running (they hold model locks and cores)."""
        await asyncio.gather(*self._background, return_exceptions=True)


@dataclass
class Outcome:
    """One expected turn: what the committed turn delivered, on the bench clock."""

    committed: CommittedTurn | None = None
    committed_ms: float | None = None
    first_chunk: ChunkText | None = None
    first_audio: AudioReady | None = None
    reply: str = ""
    error: str = ""
    notices: list[str] = field(default_factory=list)
    discarded: int = 0  # guesses the starter dropped during this turn
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def audio_ready_ms(self) -> float | None:
        """When the first audio could be sent: made early, it still waits for the commit."""
        if self.committed is None or self.committed_ms is None:
            return None
        ready = self.committed.turn.marks.first_audio_ready
        return None if ready is None else max(ready, self.committed_ms)

    async def finished(self, commit_timeout_s: float, turn_timeout_s: float) -> "Outcome":
        """Wait for the commit, then for the turn's end (raises TimeoutError)."""
        await asyncio.wait_for(self.done.wait(), commit_timeout_s)
        if self.task is not None:
            await asyncio.wait_for(asyncio.shield(self.task), turn_timeout_s)
        return self

    async def _consume(self) -> None:
        assert self.committed is not None
        async for ev in self.committed.turn.events():
            if isinstance(ev, ChunkText) and self.first_chunk is None and not ev.notice:
                self.first_chunk = ev
            elif isinstance(ev, AudioReady) and self.first_audio is None:
                self.first_audio = ev
            elif isinstance(ev, TurnDone):
                self.reply = ev.reply_text
            elif isinstance(ev, TurnError):
                self.error, self.reply = ev.message, ev.reply_text


class StarterSession:
    """Listener events -> :class:`TurnStarter` -> committed turns, as the mic WebSocket does.

    Call :meth:`expect` before each utterance; the next committed turn fills that
    :class:`Outcome`. ``on_event`` sees every listener event first (e.g. to time
    ``SpeechStarted``)."""

    def __init__(self, listener: Listener, starter: TurnStarter, *, on_event: Callable[[ListenEvent], Any] | None = None) -> None:
        self.listener = listener
        self.starter = starter
        self.on_event = on_event
        self.outcome: Outcome | None = None
        self._discarded_at = 0
        self._task = asyncio.create_task(self._run(), name="bench-listen")

    def expect(self) -> Outcome:
        self.outcome = Outcome()
        self._discarded_at = self.starter.discarded
        return self.outcome

    async def _run(self) -> None:
        async for ev in self.listener.events():
            if self.on_event is not None:
                self.on_event(ev)
            out = self.outcome
            if isinstance(ev, ListenNotice) and out is not None:
                out.notices.append(f"{ev.kind}: {ev.message}")
            try:
                committed = await self.starter.handle(ev)
            except Exception as exc:  # set-up failed: the app says so and keeps listening
                log.warning("could not start the turn: %s", exc)
                if out is not None and out.committed is None:
                    out.error = f"{type(exc).__name__}: {exc}"
                continue
            if committed is None:
                continue
            if out is None or out.committed is not None:
                log.warning("unexpected turn %r dropped", committed.text)
                await committed.turn.discard()
                continue
            out.committed, out.committed_ms = committed, now_ms()
            out.discarded = self.starter.discarded - self._discarded_at
            out.task = asyncio.create_task(out._consume(), name="bench-turn")
            out.done.set()

    async def aclose(self) -> None:
        self._task.cancel()
        with contextlib.suppress(BaseException):
            await self._task
        out = self.outcome
        if out is not None and out.task is not None and not out.task.done():
            out.task.cancel()
            await asyncio.gather(out.task, return_exceptions=True)
        await self.starter.aclose()
