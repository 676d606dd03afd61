"""``bench stt``: the embedded recognizer on the unseen set, beside faster-whisper's standard path.

Same model, same thread count, same audio (each utterance cut where the listener
cuts it: its lead, the speech, 160 ms of post-roll), in one run:

* ``short_window``: the app's path (:meth:`LocalWhisperSTT.transcribe_array`: short
  encoder window, timestamped greedy decode, repetition guard with its fallback);
* ``standard``: ``WhisperModel.transcribe(audio, language=...)`` with faster-whisper's
  defaults (30 s window, beam 5, temperature fallback), what a user of the library
  would call.

The order alternates per utterance so neither path always meets a warm cache.
WER is over the whole set (edits / reference words) after one normalization applied
to both paths (Whisper writes "7:15", "$50", "Dr."; the references are spoken words).
"""

from __future__ import annotations

import re
import statistics
import time
from typing import Any

from ..providers.local_stt import LocalWhisperSTT, looks_repeated
from .local import word_error_rate
from .stats import p50_p95
from .unseen import load_unseen

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0 <= n < 1,000,000 in English words ("one hundred and twenty eight")."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + number_words(rest))
    rest = n % 1000
    return number_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + number_words(rest))


def _clock(m: re.Match) -> str:
    h, mins = int(m.group(1)), int(m.group(2))
    return number_words(h) + ("" if mins == 0 else " " + number_words(mins))


def normalize(text: str) -> str:
    """Written forms Whisper prefers -> the spoken words the references use."""
    t = text.lower()
    t = re.sub(r"\bdr\.", "doctor", t)
    t = re.sub(r"\b(\d{1,2})[:.](\d{2})\b", _clock, t)
    t = re.sub(r"\$(\d+)", lambda m: m.group(1) + " dollars", t)
    t = re.sub(r"(\d+)\s*%", lambda m: m.group(1) + " percent", t)
    t = re.sub(r"\b(\d+)(st|nd|rd|th)\b", lambda m: m.group(1), t)
    t = re.sub(r"\d+", lambda m: number_words(int(m.group(0))) if len(m.group(0)) <= 6 else m.group(0), t)
    t = t.replace("-", " ")
    return t


def _standard(stt: LocalWhisperSTT, audio, language: str, seed: int = 0) -> str:
    """faster-whisper's ``transcribe()`` with its defaults. Its temperature fallback
    samples, so CTranslate2's random seed is set per utterance: without it the
    baseline's WER moved 17.7-19.6 % between runs of the same audio."""
    import ctranslate2

    ctranslate2.set_random_seed(seed)
    segments, _info = stt._model.transcribe(audio, language=language)
    return " ".join(s.text.strip() for s in segments if s.text.strip())


def run_stt(runs: int | None = None, *, language: str = "en", verbose: bool = False) -> dict[str, Any]:
    """The contract JSON object (``scenario`` = ``stt``); ``runs`` limits the utterances."""
    stt = LocalWhisperSTT()
    stt._warm_sync()
    _standard(stt, stt_warm_audio(), language)  # the standard path's own first-call cost
    utterances = load_unseen()
    if runs:
        utterances = utterances[:runs]
    rows: list[dict[str, Any]] = []
    errors = 0
    for i, utt in enumerate(utterances):
        audio = utt.speech()
        out: dict[str, Any] = {"name": utt.name, "voice": utt.voice, "seconds": round(audio.size / 16000, 2)}
        order = ("short_window", "standard") if i % 2 == 0 else ("standard", "short_window")
        try:
            for path in order:
                t0 = time.perf_counter()
                text = stt.transcribe_array(audio, language=language).text if path == "short_window" else _standard(stt, audio, language, seed=i)
                out[path] = {"ms": (time.perf_counter() - t0) * 1000.0, "text": text}
        except Exception as exc:  # a benchmark reports failures, it does not stop at the first
            errors += 1
            out["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(out)
            continue
        ref = normalize(utt.text)
        n_ref = len(ref.split())
        for path in ("short_window", "standard"):
            hyp = out[path]["text"]
            out[path]["edits"] = word_error_rate(ref, normalize(hyp)) * n_ref
            out[path]["repeated"] = looks_repeated(hyp)
        out["ref_words"] = n_ref
        rows.append(out)
        if verbose:
            print(f"{utt.name:15s} {out['seconds']:5.2f}s  short {out['short_window']['ms']:6.0f} ms {out['short_window']['text']!r}\n"
                  f"{'':22s} std   {out['standard']['ms']:6.0f} ms {out['standard']['text']!r}", flush=True)
    ok = [r for r in rows if "error" not in r]
    words = sum(r["ref_words"] for r in ok) or 1

    def wer(path: str) -> float:
        return round(100.0 * sum(r[path]["edits"] for r in ok) / words, 2)

    def total_ms(path: str) -> float:
        return sum(r[path]["ms"] for r in ok)

    short_wer, std_wer = wer("short_window"), wer("standard")
    return {
        "scenario": "stt",
        "runs": len(ok),
        "latency_ms": p50_p95(r["short_window"]["ms"] for r in ok),
        "standard_latency_ms": p50_p95(r["standard"]["ms"] for r in ok),
        "stages_ms": {},
        "errors": errors,
        "wer_percent": {"short_window": short_wer, "standard": std_wer},
        "wer_points_above_standard": round(short_wer - std_wer, 2),
        "time_vs_standard": round(total_ms("short_window") / (total_ms("standard") or 1.0), 3),
        "repeated_transcripts": {p: sum(1 for r in ok if r[p]["repeated"]) for p in ("short_window", "standard")},
        "fallbacks_to_standard": stt.fallbacks,
        "seconds_of_audio": round(sum(r["seconds"] for r in ok), 1),
        "median_utterance_s": round(statistics.median(r["seconds"] for r in ok), 2) if ok else None,
        "targets": {"wer_points_above_standard": 0.5, "time_vs_standard": 0.30},
        "measured": f"transcription wall time per utterance, {stt.cpu_threads} CPU thread(s), same model and audio for both paths",
        "cpu_threads": stt.cpu_threads,
        "fixtures": "tests/fixtures/unseen (espeak-ng voices other than the tests' en-us and Piper's)",
    }


def stt_warm_audio():
    import numpy as np

    return (0.1 * np.sin(2 * np.pi * 220 * np.arange(16000) / 16000)).astype(np.float32)
