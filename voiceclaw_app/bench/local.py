"""``bench local``: spoken fixtures through VAD -> STT -> LLM -> TTS on the embedded engines.

What it measures: ``time_to_first_audio_ms`` = first audio ready - speech end, where
speech end is the fixture's *known* last voiced sample on the pacing clock (not the
VAD's decision), so the end-of-turn silence wait is inside the figure: a longer
``vad_silence_ms`` makes it worse. Audio produced speculatively before the turn was
decided counts as ready only when the end of turn is decided.

How the figure is beaten on 2 cores (see :class:`SpeculativeTurnDriver`):

* llama.cpp prefills the history-bearing prompt as soon as speech starts;
* at a short pause (~200 ms) the utterance so far is transcribed and the whole
  turn (LLM -> chunker -> TTS, the pipeline's :class:`TurnRunner`) starts
  speculatively while the silence wait still runs; if the end-of-turn audio is
  byte-identical the speculative turn is kept, if the user speaks again it is
  cancelled (LLM stops at the next token, TTS at the next sentence), so a wrong
  guess costs at most one ~150 ms transcription;
* the chunker cuts the first clause alone, so TTS starts after a few words.

Frames (20 or 32 ms, alternating by run) are paced at real time with
``asyncio.sleep``; after the file ends, dither keeps flowing like a live mic.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import tempfile
import time
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import VoiceSettings
from ..pipeline.audio_store import AudioStore
from ..pipeline.events import AudioReady, TurnDone, TurnError
from ..pipeline.timing import TurnMarks, now_ms
from ..pipeline.tts_scheduler import TTSCache
from ..pipeline.turn import PreparedRequest, TurnRunner
from ..providers.base import STT, CancelToken, ChatMessage
from ..providers.silero_vad import EndOfTurn, ShortPause, SileroTurnDetector, SpeechResumed, SpeechStart, VADEvent

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"
SAMPLE_RATE = 16000
DEFAULT_RUNS = 16
TURN_TIMEOUT_S = 20.0


# ---------------------------------------------------------------- fixtures
@dataclass(frozen=True)
class Fixture:
    name: str
    text: str
    pcm: bytes
    last_voiced_sample: int


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
        out.append(Fixture(wav_path.stem, meta["text"], pcm, int(meta["last_voiced_sample"])))
    if not out:
        raise FileNotFoundError(f"no WAV fixtures in {folder} (run tests/fixtures/make_fixtures.py)")
    return out


# ---------------------------------------------------------------- speculation
@dataclass
class Attempt:
    """One transcription + turn, speculative until committed."""

    pcm: bytes
    speculative: bool
    cancel: CancelToken = field(default_factory=CancelToken)
    marks: TurnMarks = field(default_factory=TurnMarks)
    task: asyncio.Task | None = None
    transcript: str = ""
    stt_ms: float | None = None
    first_audio_ms: float | None = None
    reply: str = ""
    error: str = ""


class SpeculativeTurnDriver:
    """Turns VAD events into one committed turn, starting work as early as it is safe.

    Feed it every VAD event with :meth:`handle`; await :meth:`committed` after the
    end of turn. It owns no audio I/O, so the microphone WebSocket can reuse it.
    """

    def __init__(self, *, stt: STT, runner: TurnRunner, prepared: PreparedRequest, settings: VoiceSettings, llm_prefill: Any = None) -> None:
        self.stt = stt
        self.runner = runner
        self.prepared = prepared
        self.settings = settings
        self.llm_prefill = llm_prefill
        self.prefill_task: asyncio.Task | None = None
        self.speculative: Attempt | None = None
        self.final: Attempt | None = None
        self.eot: EndOfTurn | None = None
        self.eot_decided_ms: float | None = None
        self.reused = False
        self.discarded = 0
        self._committed = asyncio.Event()

    def handle(self, events: list[VADEvent]) -> None:
        for ev in events:
            if isinstance(ev, SpeechStart) and self.prefill_task is None and self.llm_prefill is not None:
                self.prefill_task = asyncio.create_task(self.llm_prefill(self.prepared.base.messages))
            elif isinstance(ev, ShortPause) and self.settings.speculative and self.final is None:
                self._drop_speculative()
                self.speculative = self._start(ev.pcm, speculative=True)
            elif isinstance(ev, SpeechResumed):
                self._drop_speculative()
            elif isinstance(ev, EndOfTurn) and self.final is None:
                self.eot = ev
                self.eot_decided_ms = now_ms()
                spec = self.speculative
                if spec is not None and spec.pcm == ev.pcm and not spec.cancel.cancelled:
                    self.final, self.reused = spec, True
                else:
                    self._drop_speculative()
                    self.final = self._start(ev.pcm, speculative=False)
                self.final.marks.mark("eot_decided", self.eot_decided_ms)
                self.final.marks.mark("speech_end", ev.speech_end_ms)
                self._committed.set()

    def _drop_speculative(self) -> None:
        if self.speculative is not None:
            self.speculative.cancel.cancel()
            self.discarded += 1
            self.speculative = None

    def _start(self, pcm: bytes, speculative: bool) -> Attempt:
        attempt = Attempt(pcm=pcm, speculative=speculative)
        attempt.task = asyncio.create_task(self._run(attempt))
        return attempt

    async def _run(self, a: Attempt) -> None:
        t0 = now_ms()
        tr = await self.stt.transcribe(a.pcm, sample_rate=SAMPLE_RATE, language=self.settings.stt_language, cancel=a.cancel)
        a.stt_ms = now_ms() - t0
        a.transcript = tr.text.strip()
        if a.cancel.cancelled:
            return
        a.marks.mark("stt_final")
        if not a.transcript:
            a.error = "empty transcript"
            return
        async for ev in self.runner.run(self.prepared, a.transcript, marks=a.marks, cancel=a.cancel):
            if isinstance(ev, AudioReady) and a.first_audio_ms is None:
                a.first_audio_ms = now_ms()
            elif isinstance(ev, TurnDone):
                a.reply = ev.reply_text
            elif isinstance(ev, TurnError):
                a.error, a.reply = ev.message, ev.reply_text

    async def committed(self, timeout_s: float = TURN_TIMEOUT_S) -> Attempt:
        await asyncio.wait_for(self._committed.wait(), timeout_s)
        assert self.final is not None and self.final.task is not None
        await asyncio.wait_for(asyncio.shield(self.final.task), timeout_s)
        return self.final

    async def aclose(self) -> None:
        for a in (self.speculative, self.final):
            if a is not None and a.task is not None and not a.task.done():
                a.cancel.cancel()
                await asyncio.gather(a.task, return_exceptions=True)
        if self.prefill_task is not None:
            await asyncio.gather(self.prefill_task, return_exceptions=True)


class _NoCache(TTSCache):
    """A benchmark must synthesize every reply, never replay a cached one."""

    def get(self, identity: tuple, text: str):  # type: ignore[override]
        return None


# ---------------------------------------------------------------- one run
def _dither(n_samples: int, rng: np.random.Generator) -> bytes:
    return rng.integers(-30, 31, n_samples, dtype=np.int16).astype("<i2").tobytes()


async def play_fixture(fx: Fixture, *, driver: SpeculativeTurnDriver, detector: SileroTurnDetector, frame_ms: int, rng: np.random.Generator) -> dict[str, Any]:
    """Pace ``fx`` into the detector at real time; return the run's figures."""
    frame_samples = SAMPLE_RATE * frame_ms // 1000
    frame_bytes = frame_samples * 2
    t0 = now_ms() + 5.0
    speech_end = t0 + 1000.0 * (fx.last_voiced_sample + 1) / SAMPLE_RATE
    deadline = t0 + 1000.0 * len(fx.pcm) / 2 / SAMPLE_RATE + TURN_TIMEOUT_S * 1000
    i = 0
    while now_ms() < deadline:
        start = i * frame_bytes
        frame = fx.pcm[start : start + frame_bytes]
        if len(frame) < frame_bytes:
            frame += _dither((frame_bytes - len(frame)) // 2, rng)
        target = t0 + (i + 1) * frame_ms
        delay = (target - now_ms()) / 1000.0
        if delay > 0:
            await asyncio.sleep(delay)
        driver.handle(detector.push(frame, target))
        i += 1
        final = driver.final
        if final is not None and (final.task.done() or final.first_audio_ms is not None):
            break
    attempt = await driver.committed()
    marks = attempt.marks
    ready = None if attempt.first_audio_ms is None else max(attempt.first_audio_ms, driver.eot_decided_ms or 0.0)
    stages = {
        "endpointing": (driver.eot_decided_ms or speech_end) - speech_end,
        "vad_speech_end_error": (driver.eot.speech_end_ms - speech_end) if driver.eot else None,
        "stt": attempt.stt_ms,
        "stt_final_after_speech_end": (marks.stt_final - speech_end) if marks.stt_final else None,
        "llm_first_token": (marks.llm_first_token - marks.llm_request) if marks.llm_first_token and marks.llm_request else None,
        "first_chunk_after_first_token": (marks.first_chunk - marks.llm_first_token) if marks.first_chunk and marks.llm_first_token else None,
        "tts_first": (marks.first_audio_ready - marks.tts_first_request) if marks.first_audio_ready and marks.tts_first_request else None,
    }
    return {
        "fixture": fx.name,
        "expected": fx.text,
        "transcript": attempt.transcript,
        "reply": attempt.reply,
        "speculative_reused": driver.reused,
        "time_to_first_audio_ms": None if ready is None else ready - speech_end,
        "stages_ms": {k: round(v, 1) for k, v in stages.items() if v is not None},
        "error": attempt.error or ("" if ready is not None else "no audio"),
    }


# ---------------------------------------------------------------- the benchmark
def _pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None}
    arr = np.asarray(values, dtype=float)
    return {"p50": round(float(np.percentile(arr, 50)), 1), "p95": round(float(np.percentile(arr, 95)), 1)}


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Levenshtein distance over words / reference length (0.0 = perfect)."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return 0.0 if not hyp else 1.0
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1] / len(ref)


async def run_local(runs: int | None = None, silence_ms: int | None = None, *, speculative: bool | None = None, prefill: bool = True, verbose: bool = False) -> dict[str, Any]:
    """Run the benchmark; returns the contract JSON object (``scenario`` = ``local``).

    ``speculative=False`` / ``prefill=False`` switch the overlaps off, to measure
    what each one buys.
    """
    from ..providers import engines

    runs = runs or DEFAULT_RUNS
    settings = VoiceSettings.from_env().replace(llm_base_url="", stt_provider="local", tts_provider="local")
    if silence_ms is not None:
        settings = settings.replace(vad_silence_ms=int(silence_ms))
    if speculative is not None:
        settings = settings.replace(speculative=bool(speculative))
    engines.configure(settings)
    t_load = time.monotonic()
    engines.start_warmup(settings=settings).join()
    load_s = time.monotonic() - t_load
    status = engines.engine_status()
    if not engines.all_ready():
        return {"scenario": "local", "runs": 0, "time_to_first_audio_ms": {"p50": None, "p95": None}, "stages_ms": {}, "errors": runs, "engines": status}
    stt, llm, tts = engines.get_stt(), engines.get_llm(), engines.get_tts()
    fixtures = load_fixtures()
    rng = np.random.default_rng(7)
    results: list[dict[str, Any]] = []
    history: list[ChatMessage] = []
    with tempfile.TemporaryDirectory(prefix="vc-bench-") as tmp:
        store = AudioStore(Path(tmp))
        runner = TurnRunner(llm=llm, tts=tts, audio_store=store, settings=settings, cache=_NoCache(store))
        for r in range(runs):
            fx = fixtures[r % len(fixtures)]
            prepared = runner.prepare(history, "bench-local")
            detector = SileroTurnDetector(silence_ms=settings.vad_silence_ms, min_speech_ms=settings.vad_min_speech_ms, max_utterance_s=settings.max_utterance_s)
            driver = SpeculativeTurnDriver(stt=stt, runner=runner, prepared=prepared, settings=settings, llm_prefill=llm.prefill if prefill else None)
            try:
                res = await play_fixture(fx, driver=driver, detector=detector, frame_ms=(20, 32)[r % 2], rng=rng)
            except Exception as exc:  # a benchmark reports failures, it does not stop at the first
                res = {"fixture": fx.name, "error": f"{type(exc).__name__}: {exc}", "time_to_first_audio_ms": None, "stages_ms": {}}
            finally:
                await driver.aclose()
                detector.close()
            results.append(res)
            if verbose:
                print(json.dumps(res), flush=True)
            if res.get("transcript") and res.get("reply"):
                history = (history + [ChatMessage("user", res["transcript"]), ChatMessage("assistant", res["reply"])])[-2 * settings.llm_history_turns :]
            await asyncio.sleep(0.3)  # the user listens to the reply before speaking again
    ttfa = [r["time_to_first_audio_ms"] for r in results if r.get("time_to_first_audio_ms") is not None]
    stage_names = sorted({k for r in results for k in r.get("stages_ms", {})})
    wers = [word_error_rate(r["expected"], r.get("transcript", "")) for r in results if "expected" in r]
    return {
        "scenario": "local",
        "runs": len(results),
        "time_to_first_audio_ms": _pct(ttfa),
        "stages_ms": {name: _pct([r["stages_ms"][name] for r in results if name in r.get("stages_ms", {})]) for name in stage_names},
        "errors": sum(1 for r in results if r.get("error")),
        "measured": "first_audio_ready - speech_end (fixture's last voiced sample), server side",
        "vad_silence_ms": settings.vad_silence_ms,
        "speculative": settings.speculative,
        "prefill": prefill,
        "speculative_reused": sum(1 for r in results if r.get("speculative_reused")),
        "stt_wer": round(statistics.fmean(wers), 3) if wers else None,
        "engine_load_s": round(load_s, 1),
        "memory": engines.memory_report(),
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m voiceclaw_app.bench.local [--runs N] [--silence-ms MS] [--json] [-v]``."""
    import argparse

    p = argparse.ArgumentParser(prog="bench local", description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=None)
    p.add_argument("--silence-ms", type=int, default=None)
    p.add_argument("--no-speculative", action="store_true", help="no work before the end of turn is decided")
    p.add_argument("--no-prefill", action="store_true", help="no LLM prefill while the user speaks")
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run as it finishes")
    args = p.parse_args(argv)
    result = asyncio.run(run_local(args.runs, args.silence_ms, speculative=False if args.no_speculative else None, prefill=not args.no_prefill, verbose=args.verbose))
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
