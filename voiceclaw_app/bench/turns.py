"""``bench turns``: when does the embedded listener decide the user is done?

The unseen set's utterances (``tests/fixtures/unseen``) are paced at real time into
real :class:`LocalListener` s (silero VAD, Whisper, Smart Turn), one per end-of-turn
configuration:

* ``silence_200`` / ``silence_500`` / ``silence_1000``: ``turn_detection="silence"``
  with that ``vad_silence_ms``;
* ``smart_turn``: the default: at each 96 ms pause the sound (Smart Turn) and the
  pause's words (its transcript, scored by the words' model), ``turn_max_wait_ms`` ceiling;
* ``smart_turn_audio_only``: Smart Turn alone (no words), to show what each adds.

Figures, from the fixtures' known samples (never the VAD's estimate):

* ``cut_off_rate`` on the *hesitations* (a clearly unfinished sentence, 600-1,200 ms
  of pause, then its end): share of them where an end of turn was decided before
  the sentence's last voiced sample (the fragment became a turn of its own);
* ``dead_air_ms`` on the *complete* utterances: last voiced sample -> end of turn
  decided (``EndOfTurn.eot_ms``), p50/p95.

Decisions are timed when made (the listener's ``on_decision``), before their
transcription. Configurations that do not need the words share one pass over an
utterance; ``smart_turn`` gets a pass of its own, so its wait for the pause's
transcript is not inflated by the other listeners' transcriptions.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import VoiceSettings
from ..pipeline.timing import now_ms
from ..providers.local_listener import LocalListener
from .drive import SAMPLE_RATE, dither, paced
from .stats import p50_p95
from .unseen import Utterance, load_unseen

#: after the last voiced sample, how long the mic keeps sending noise (past every ceiling)
TAIL_MS = 2600


@dataclass(frozen=True)
class Config:
    name: str
    settings: VoiceSettings
    use_words: bool = True
    own_pass: bool = False


def configs(base: VoiceSettings) -> list[Config]:
    # the shared pass's listeners do not transcribe at the short pause (speculative
    # off): it never moves their decision, and it keeps the 2 cores' Whisper queue short
    silence = base.replace(turn_detection="silence", speculative=False)
    smart = base.replace(turn_detection="smart_turn")
    return [
        Config("silence_200", silence.replace(vad_silence_ms=200)),
        Config("silence_500", silence.replace(vad_silence_ms=500)),
        Config("silence_1000", silence.replace(vad_silence_ms=1000)),
        Config("smart_turn_audio_only", smart.replace(speculative=False), use_words=False),
        Config("smart_turn", smart, own_pass=True),
    ]


async def _pass(utt: Utterance, group: list[Config], stt, analyzer, words, rng: np.random.Generator) -> dict[str, list[float]]:
    """One utterance through one listener per config at once; each config's end-of-turn
    decision times (ms from the utterance start), taken when decided (``on_decision``),
    not when transcribed: a queue at Whisper does not move them."""
    decided: dict[str, list[float]] = {c.name: [] for c in group}
    t0 = now_ms() + 5.0
    listeners = {
        c.name: LocalListener(settings=c.settings, stt=stt, turn_analyzer=analyzer, text_analyzer=words, use_words=c.use_words, on_decision=lambda eot, _end, n=c.name: decided[n].append(eot - t0))
        for c in group
    }
    drains = [asyncio.create_task(_drain(lst)) for lst in listeners.values()]
    speech_end = 1000.0 * (utt.last_voiced_sample + 1) / SAMPLE_RATE
    async for _, frame, due in paced(utt.pcm, 20, t0, pad=lambda n: dither(n, rng)):
        for lst in listeners.values():
            await lst.push(frame, due)
        if due - t0 > speech_end + TAIL_MS or all(any(t >= speech_end - 1 for t in ts) for ts in decided.values()):
            break
    for lst in listeners.values():
        await lst.aclose()
    await asyncio.gather(*drains, return_exceptions=True)
    return decided


async def _drain(listener: LocalListener) -> None:
    async for _ev in listener.events():
        pass


def _score(utt: Utterance, decided: list[float]) -> dict[str, Any]:
    speech_end = 1000.0 * (utt.last_voiced_sample + 1) / SAMPLE_RATE
    early = [t for t in decided if t < speech_end - 1]
    final = [t for t in decided if t >= speech_end - 1]
    return {"cut_off": bool(early), "dead_air_ms": round(final[0] - speech_end, 1) if final else None, "turns": len(decided)}


async def run_turns_async(runs: int | None = None, *, verbose: bool = False) -> dict[str, Any]:
    from ..providers import engines

    base = VoiceSettings.from_env().replace(stt_provider="local")
    stt = await engines.aget_engine("stt")
    analyzer = await engines.aget_engine("turn")
    words = await engines.aget_engine("text_turn")
    hesitations = load_unseen("hesitation")
    complete = [u for u in load_unseen("complete") if "long" not in u.tags and "repetition" not in u.tags]
    if runs:
        hesitations, complete = hesitations[: (runs + 1) // 2], complete[: runs // 2]
    cfgs = configs(base)
    shared = [c for c in cfgs if not c.own_pass]
    alone = [c for c in cfgs if c.own_pass]
    rng = np.random.default_rng(11)
    rows: dict[str, list[dict[str, Any]]] = {c.name: [] for c in cfgs}
    errors = 0
    for utt in hesitations + complete:
        for group in [shared] + [[c] for c in alone]:
            try:
                got = await _pass(utt, group, stt, analyzer, words, rng)
            except Exception as exc:  # report, go on
                errors += 1
                got = {}
                if verbose:
                    print(f"{utt.name}: {type(exc).__name__}: {exc}", flush=True)
            for c in group:
                if c.name in got:
                    rows[c.name].append({"name": utt.name, "kind": utt.kind, **_score(utt, got[c.name])})
        if verbose:
            line = "  ".join(f"{n}: {'CUT' if r[-1]['cut_off'] else ''}{r[-1]['dead_air_ms']}" for n, r in rows.items() if r and r[-1]["name"] == utt.name)
            print(f"{utt.name:12s} {line}", flush=True)
        await asyncio.sleep(0.2)
    out: dict[str, Any] = {}
    for c in cfgs:
        hes = [r for r in rows[c.name] if r["kind"] == "hesitation"]
        comp = [r for r in rows[c.name] if r["kind"] == "complete"]
        out[c.name] = {
            "cut_off_rate": round(sum(r["cut_off"] for r in hes) / len(hes), 3) if hes else None,
            "cut_off": f"{sum(r['cut_off'] for r in hes)}/{len(hes)}",
            "dead_air_ms": p50_p95(r["dead_air_ms"] for r in comp if r["dead_air_ms"] is not None),
            "complete_cut_in_two": sum(1 for r in comp if r["cut_off"]),
            "undecided": sum(1 for r in rows[c.name] if r["dead_air_ms"] is None),
        }
    smart = out["smart_turn"]
    return {
        "scenario": "turns",
        "runs": len(hesitations) + len(complete),
        "hesitations": len(hesitations),
        "complete": len(complete),
        "dead_air_ms": smart["dead_air_ms"],
        "cut_off_rate": smart["cut_off_rate"],
        "configs": out,
        "stages_ms": {},
        "errors": errors,
        "targets": {"cut_off_rate": 0.125, "dead_air_ms_p50": 300},
        "turn_max_wait_ms": base.turn_max_wait_ms,
        "measured": "eot_decided - the fixture's last voiced sample, real-time pacing, 20 ms frames, real silero/Whisper/Smart Turn",
    }


def run_turns(runs: int | None = None, *, verbose: bool = False):
    return run_turns_async(runs, verbose=verbose)
