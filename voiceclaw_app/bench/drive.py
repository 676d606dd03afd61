"""What the ``local`` and ``cloud`` benchmarks share: spoken fixtures paced at real
time into the app's own :class:`~voiceclaw_app.session.VoiceSession`.

:class:`SessionDriver` builds a real session (the one each ``/ws/voice`` gets) over
:class:`BenchServices` (the benchmark's runner and listener) and an in-memory store,
pushes frames into it and records what each committed reply delivered from the
session's events. So the benchmarks measure the app's path, not a copy of it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import numpy as np

from ..pipeline.events import AudioReady, ChunkText, TurnDone, TurnError
from ..pipeline.timing import now_ms
from ..pipeline.turn import PreparedRequest, TurnRunner
from ..providers.base import STT, Listener, ListenEvent, ListenNotice, Transcript
from ..session import events as ev
from ..session.ports import InMemoryStore
from ..session.reply import ReplyHandle
from ..session.session import VoiceSession

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


def load_fixture(wav_path: Path) -> Fixture:
    """One ``*.wav`` (16 kHz mono PCM16) with its ``.json`` sidecar."""
    meta = json.loads(wav_path.with_suffix(".json").read_text())
    with wave.open(str(wav_path), "rb") as w:
        if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError(f"{wav_path} is not 16 kHz mono PCM16")
        pcm = w.readframes(w.getnframes())
    return Fixture(wav_path.stem, meta["text"], pcm, int(meta["last_voiced_sample"]), int(meta.get("first_voiced_sample", 0)))


def fixture_named(name: str, folder: Path = FIXTURES) -> Fixture:
    """The fixture ``name`` of ``folder`` (tests/fixtures by default)."""
    return load_fixture(folder / f"{name}.wav")


def load_fixtures(folder: Path = FIXTURES) -> list[Fixture]:
    """Every ``*.wav`` with a ``.json`` sidecar (16 kHz mono PCM16)."""
    out = [load_fixture(p) for p in sorted(folder.glob("*.wav")) if p.with_suffix(".json").exists()]
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

    async def transcribe(self, pcm16: bytes, *, sample_rate: int = SAMPLE_RATE, language: str = "en", cancel=None, score_words: bool = False) -> Transcript:
        t0 = now_ms()
        result = await self.inner.transcribe(pcm16, sample_rate=sample_rate, language=language, cancel=cancel, score_words=score_words)
        if cancel is None or not cancel.cancelled:
            self.durations.append(now_ms() - t0)
        return result

    async def word_probabilities(self, transcript: Transcript) -> tuple[float, ...] | None:
        return await self.inner.word_probabilities(transcript)  # the end of turn asks it


# ---------------------------------------------------------------- frames -> VoiceSession -> recorded outcome
class BenchServices:
    """The session's :class:`~voiceclaw_app.session.ports.Services` for a benchmark: fixed
    settings, one runner, and the listener it is given (a fresh one per utterance, or
    one opened before anyone speaks)."""

    def __init__(self, settings: Any, runner: TurnRunner, listener: Listener | None = None, *, prefill: bool = True) -> None:
        self.settings = settings
        self.runner: Any = runner if prefill else _NoPrefill(runner)
        self.listener = listener

    async def load_settings(self, user_id: int | None = None) -> Any:
        return self.settings

    async def get_runner(self, settings: Any) -> Any:
        return self.runner

    async def build_listener(self, settings: Any) -> Listener:
        listener, self.listener = self.listener, None
        if listener is None:
            raise RuntimeError("the benchmark gave the session no listener for this utterance")
        return listener


class _NoPrefill:
    """The runner, warmed without the request (no LLM prefill while the user speaks)."""

    def __init__(self, runner: TurnRunner) -> None:
        self._runner = runner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    async def warm(self, prepared: PreparedRequest | None = None) -> None:
        await self._runner.warm(None)


@dataclass
class Outcome:
    """One expected turn: what the committed reply delivered, on the bench clock."""

    committed: ReplyHandle | None = None
    committed_ms: float | None = None
    first_chunk: ChunkText | None = None
    first_audio: AudioReady | None = None
    #: when the session sent the first audio URL out (what the page would fetch)
    first_audio_sent_ms: float | None = None
    #: (when it went out, its length in ms) for each piece of the committed reply's audio
    audio: list[tuple[float, float]] = field(default_factory=list)
    reply: str = ""
    error: str = ""
    notices: list[str] = field(default_factory=list)
    discarded: int = 0  # guesses the starter dropped during this turn
    task: asyncio.Task | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def audio_ready_ms(self) -> float | None:
        """When the first audio went out: made early, it still waits for the commit."""
        if self.committed is None or self.first_audio_sent_ms is None:
            return None
        ready = self.committed.marks.first_audio_ready
        return self.first_audio_sent_ms if ready is None else max(ready, self.first_audio_sent_ms)

    @property
    def starved_ms(self) -> float | None:
        """Silence inside the reply a gapless player would have had to wait through:
        each piece plays when it is there and the one before has ended (the first at its
        arrival), so a gap is a piece arriving after its predecessor's end."""
        if not self.audio:
            return None
        starved, end = 0.0, self.audio[0][0]
        for sent, duration in self.audio:
            starved += max(0.0, sent - end)
            end = max(end, sent) + duration
        return starved

    async def finished(self, commit_timeout_s: float, turn_timeout_s: float) -> "Outcome":
        """Wait for the commit, then for the reply's end (raises TimeoutError)."""
        await asyncio.wait_for(self.done.wait(), commit_timeout_s)
        if self.task is not None:
            await asyncio.wait_for(asyncio.shield(self.task), turn_timeout_s)
        return self


class SessionDriver:
    """A real :class:`VoiceSession` fed by a benchmark: call :meth:`expect` before each
    utterance, :meth:`push` its frames; the next committed reply fills that
    :class:`Outcome`. ``on_event`` sees every listener event (e.g. to time ``SpeechStarted``)."""

    def __init__(self, services: BenchServices, *, store: Any = None, conversation_id: str = "bench", on_event: Callable[[ListenEvent], Any] | None = None, muted: bool = False) -> None:
        self.store = store if store is not None else InMemoryStore()
        self.session = VoiceSession(services=services, store=self.store, conversation_id=conversation_id, muted=muted)
        self.services = services
        self.on_event = on_event
        self.outcome: Outcome | None = None
        self._discarded_at = 0
        self.session.subscribe(self._on)

    def expect(self) -> Outcome:
        self.outcome = Outcome()
        starter = self.session.starter
        self._discarded_at = starter.discarded if starter is not None else 0
        return self.outcome

    async def push(self, frame: bytes, due_ms: float) -> None:
        await self.session.push_audio(frame, due_ms)

    async def start(self) -> None:
        """Build the session's listener now (a cloud session opened before anyone speaks)."""
        await self.session.ensure_listener()

    async def _on(self, e: ev.SessionEvent) -> None:
        out = self.outcome
        if isinstance(e, ev.Heard):
            if self.on_event is not None:
                self.on_event(e.event)
            if isinstance(e.event, ListenNotice) and out is not None:
                out.notices.append(f"{e.event.kind}: {e.event.message}")
            return
        if out is None:
            return
        if isinstance(e, ev.ErrorRaised) and out.committed is None:
            out.error = e.message
        elif isinstance(e, ev.TurnStarted):
            reply = self.session.reply
            if out.committed is not None or reply is None:
                log.warning("unexpected turn %r", e.user_text)
                return
            starter = self.session.starter
            out.committed, out.committed_ms, out.task = reply, reply.committed_ms, reply.task
            out.discarded = (starter.discarded if starter is not None else 0) - self._discarded_at
            out.done.set()
        elif isinstance(e, ev.ReplyAudio) and out.first_audio_sent_ms is None and out.committed is not None and e.audio_id:
            out.first_audio_sent_ms = now_ms()
        elif isinstance(e, ev.PipelineEvent) and out.committed is not None and e.turn_id == out.committed.turn_id:
            pe = e.event
            if isinstance(pe, ChunkText) and out.first_chunk is None and not pe.notice:
                out.first_chunk = pe
            elif isinstance(pe, AudioReady):
                out.audio.append((now_ms(), pe.duration_ms))
                if out.first_audio is None:
                    out.first_audio = pe
            elif isinstance(pe, TurnDone):
                out.reply = pe.reply_text
            elif isinstance(pe, TurnError):
                out.error, out.reply = pe.message, pe.reply_text

    async def aclose(self) -> None:
        """Close the session (its reply, listener and starter) and wait for its warm-ups."""
        await self.session.close()
        reply = self.session.reply
        if reply is not None and reply.task is not None:
            await asyncio.gather(reply.task, return_exceptions=True)
        await self.session.drain()
