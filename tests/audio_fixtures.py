"""The spoken WAV fixtures (espeak-ng, 16 kHz mono) and their known voiced span."""

from __future__ import annotations

import json
import wave
from pathlib import Path

FIX = Path(__file__).parent / "fixtures"
RATE = 16000


def fixture(name: str) -> tuple[bytes, dict]:
    """PCM16 of ``fixtures/<name>.wav`` and its sidecar (text, first/last voiced sample)."""
    with wave.open(str(FIX / f"{name}.wav"), "rb") as w:
        pcm = w.readframes(w.getnframes())
    return pcm, json.loads((FIX / f"{name}.json").read_text())


def speech_only(name: str) -> bytes:
    """The fixture without its leading and trailing silence."""
    pcm, meta = fixture(name)
    return pcm[2 * meta["first_voiced_sample"] : 2 * (meta["last_voiced_sample"] + 1)]
