"""``bench local``: spoken fixtures through the app's listener and turn path on the embedded engines.

What it measures: ``time_to_first_audio_ms`` = first audio ready - speech end, where
speech end is the fixture's *known* last voiced sample on the pacing clock (not the
VAD's estimate), so the end-of-turn silence wait is inside the figure: a longer
``vad_silence_ms`` makes it worse. Audio produced before the turn was committed
counts as ready only when it is committed (the app holds it back until then).

The turn path is the mic WebSocket's: frames go into a real
:class:`~voiceclaw_app.session.VoiceSession` (:class:`~.drive.SessionDriver`), whose
:class:`LocalListener` (silero VAD + Whisper) and :class:`TurnStarter` run as in the
app; one session per utterance (a fresh VAD context), one in-memory conversation
across them (the history grows as in the app). How the figure is beaten on 2 cores:

* at speech start the starter prepares the request and warms the providers; the
  local LLM prefills the history-bearing prompt while the user speaks;
* at a short pause (~200 ms) the listener transcribes the utterance so far
  (``PreliminaryTranscript``) and the starter runs the whole turn (LLM -> chunker
  -> TTS) early, its events held back; at the end of turn the listener reuses that
  transcript when the audio did not change and the starter keeps the early turn
  when the words hold; if the user speaks again both are dropped;
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
from pathlib import Path
from typing import Any

import numpy as np

from ..config import VoiceSettings
from ..pipeline.audio_store import AudioStore
from ..pipeline.timing import now_ms
from ..pipeline.turn import TurnRunner
from ..providers.base import SpeechStarted
from ..session.ports import InMemoryStore
from ..providers.local_listener import LocalListener
from .drive import FIXTURES, SAMPLE_RATE, BenchServices, Fixture, SessionDriver, TimedSTT, dither, load_fixtures, paced
from .pipeline import UncachedTTS
from .stats import p50_p95, stages

__all__ = ["FIXTURES", "Fixture", "load_fixtures", "play_fixture", "run_local", "word_error_rate"]

DEFAULT_RUNS = 16
TURN_TIMEOUT_S = 20.0


# ---------------------------------------------------------------- one run
async def play_fixture(fx: Fixture, *, session: SessionDriver, stt: TimedSTT, frame_ms: int, rng: np.random.Generator, onset: dict[str, float | None] | None = None) -> dict[str, Any]:
    """Pace ``fx`` into the listener at real time; return the run's figures.

    ``onset["t"]`` is set (by the session's ``on_event``) when the listener reports the
    tentative speech start: what pauses the assistant's playback on a barge-in."""
    out = session.expect()
    n_stt = len(stt.durations)
    if onset is not None:
        onset["t"] = None
    t0 = now_ms() + 5.0
    first_voiced = t0 + 1000.0 * fx.first_voiced_sample / SAMPLE_RATE
    speech_end = t0 + 1000.0 * (fx.last_voiced_sample + 1) / SAMPLE_RATE
    deadline = t0 + 1000.0 * len(fx.pcm) / 2 / SAMPLE_RATE + TURN_TIMEOUT_S * 1000
    async for _, frame, due in paced(fx.pcm, frame_ms, t0, pad=lambda n: dither(n, rng)):
        await session.push(frame, due)
        if out.error or (out.task is not None and (out.task.done() or out.first_audio is not None)) or due > deadline:
            break
    await out.finished(TURN_TIMEOUT_S, TURN_TIMEOUT_S)
    committed = out.committed
    assert committed is not None
    marks = committed.marks
    listener_speech_end = marks.speech_end  # the VAD's estimate (EndOfTurn.speech_end_ms)
    ready = out.audio_ready_ms
    durations = stt.durations[n_stt:]
    s = marks.stages()
    figures = {
        "endpointing": (marks.eot_decided - speech_end) if marks.eot_decided is not None else None,
        "vad_speech_end_error": (listener_speech_end - speech_end) if listener_speech_end is not None else None,
        "stt": durations[-1] if durations else None,
        "stt_final_after_speech_end": (marks.stt_final - speech_end) if marks.stt_final is not None else None,
        "llm_first_token": s.get("llm_first_token"),
        "first_chunk": s.get("first_chunk"),
        "tts_first": s.get("tts_first"),
        "commit_after_speech_end": out.committed_ms - speech_end if out.committed_ms is not None else None,
        # the reply's playback, played gaplessly from its first piece: silence waiting for a piece
        "playback_starved": out.starved_ms,
        # barge-in: first voiced sample -> tentative speech start (playback pauses)
        "barge_in_onset": (onset["t"] - first_voiced) if onset is not None and onset.get("t") is not None and fx.first_voiced_sample else None,
    }
    return {
        "fixture": fx.name,
        "expected": fx.text,
        "transcript": committed.text,
        "reply": out.reply,
        "first_chunk_text": out.first_chunk.text if out.first_chunk is not None else "",
        "speculative_reused": committed.reused,
        "discarded": out.discarded,
        "time_to_first_audio_ms": None if ready is None else ready - speech_end,
        "stages_ms": {k: round(v, 1) for k, v in figures.items() if v is not None},
        "error": out.error or ("" if ready is not None else "no audio"),
    }


# ---------------------------------------------------------------- the benchmark
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


async def run_local(runs: int | None = None, silence_ms: int | None = None, *, speculative: bool | None = None, prefill: bool = True, verbose: bool = False, turn_detection: str | None = None, fixtures: str = "default") -> dict[str, Any]:
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
    if turn_detection is not None:
        settings = settings.replace(turn_detection=turn_detection)
    engines.configure(settings)
    t_load = time.monotonic()
    engines.start_warmup(settings=settings).join()
    load_s = time.monotonic() - t_load
    status = engines.engine_status()
    if not engines.all_ready():
        return {"scenario": "local", "runs": 0, "time_to_first_audio_ms": {"p50": None, "p95": None}, "stages_ms": {}, "errors": runs, "engines": status}
    stt, llm, tts = TimedSTT(engines.get_stt()), engines.get_llm(), engines.get_tts()
    fixture_set = fixtures
    if fixtures == "unseen":
        from .unseen import unseen_questions

        fixtures = unseen_questions()  # type: ignore[assignment]
    else:
        fixtures = load_fixtures()  # type: ignore[assignment]
    rng = np.random.default_rng(7)
    results: list[dict[str, Any]] = []
    conversations = InMemoryStore()  # one conversation across the runs: its history grows as in the app
    with tempfile.TemporaryDirectory(prefix="vc-bench-") as tmp:
        store = AudioStore(Path(tmp))
        runner = TurnRunner(llm=llm, tts=tts, audio_store=store, settings=settings, cache=UncachedTTS(store))
        for r in range(runs):
            fx = fixtures[r % len(fixtures)]
            # a fresh listener (VAD context) per utterance; the turn path is the mic socket's
            listener = LocalListener(settings=settings, stt=stt)
            onset: dict[str, float | None] = {"t": None}

            def on_event(ev: Any, onset: dict[str, float | None] = onset) -> None:
                if isinstance(ev, SpeechStarted) and onset["t"] is None:
                    onset["t"] = now_ms()

            session = SessionDriver(BenchServices(settings, runner, listener, prefill=prefill), store=conversations, conversation_id="bench-local", on_event=on_event)
            try:
                res = await play_fixture(fx, session=session, stt=stt, frame_ms=(20, 32)[r % 2], rng=rng, onset=onset)
            except Exception as exc:  # a benchmark reports failures, it does not stop at the first
                res = {"fixture": fx.name, "error": f"{type(exc).__name__}: {exc}", "time_to_first_audio_ms": None, "stages_ms": {}}
            finally:
                await session.aclose()
                await listener.aclose()
            results.append(res)
            if verbose:
                print(json.dumps(res), flush=True)
            await asyncio.sleep(0.3)  # the user listens to the reply before speaking again
    wers = [word_error_rate(r["expected"], r.get("transcript", "")) for r in results if "expected" in r]
    return {
        "scenario": "local",
        "runs": len(results),
        "time_to_first_audio_ms": p50_p95(r["time_to_first_audio_ms"] for r in results if r.get("time_to_first_audio_ms") is not None),
        "stages_ms": stages([r.get("stages_ms", {}) for r in results]),
        "errors": sum(1 for r in results if r.get("error")),
        "measured": "first audio URL sent by the session (not before the commit) - speech_end (fixture's last voiced sample), server side",
        "vad_silence_ms": settings.vad_silence_ms,
        "turn_detection": settings.turn_detection,
        "fixtures": fixture_set,
        "speculative": settings.speculative,
        "prefill": prefill,
        "speculative_reused": sum(1 for r in results if r.get("speculative_reused")),
        # replies whose gapless playback would have waited >= 20 ms for a piece somewhere
        "starved_replies": sum(1 for r in results if r.get("stages_ms", {}).get("playback_starved", 0) >= 20),
        "discarded_guesses": sum(r.get("discarded", 0) for r in results),
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
