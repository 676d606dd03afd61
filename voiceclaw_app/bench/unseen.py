"""The *unseen* spoken set (``tests/fixtures/unseen``, made by its ``make_unseen.py``):
voices neither Piper nor the other tests use, for ``bench stt``, ``bench turns`` and
``bench local --fixtures unseen``.

One ``manifest.json`` describes every WAV: the reference text, ``kind``
(``complete`` | ``hesitation``), tags, the voice, and the known voiced span and
pauses in samples, which is what the benchmarks time from (never the VAD's guess).
"""

from __future__ import annotations

import json
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .drive import SAMPLE_RATE, Fixture

UNSEEN = Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "unseen"


@dataclass(frozen=True)
class Utterance:
    name: str
    text: str
    kind: str  # complete | hesitation
    tags: tuple[str, ...]
    voice: str
    pcm: bytes  # 16 kHz mono PCM16, the whole file (lead and tail of noise included)
    first_voiced_sample: int
    last_voiced_sample: int
    pauses: tuple[tuple[int, int], ...]  # [first silent sample, first voiced sample after it)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / SAMPLE_RATE

    def speech(self, tail_ms: int = 160) -> np.ndarray:
        """float32 from the start to ``tail_ms`` after the last voiced sample: what the
        listener hands the recognizer (its pre-roll is in the lead, its post-roll is
        ``tail_ms``)."""
        end = min(len(self.pcm) // 2, self.last_voiced_sample + 1 + SAMPLE_RATE * tail_ms // 1000)
        return np.frombuffer(self.pcm[: 2 * end], dtype="<i2").astype(np.float32) / 32768.0

    def as_fixture(self) -> Fixture:
        return Fixture(self.name, self.text, self.pcm, self.last_voiced_sample, self.first_voiced_sample)


def load_unseen(kind: str | None = None, *, folder: Path = UNSEEN, tag: str | None = None) -> list[Utterance]:
    """Every utterance of the manifest (of ``kind`` / with ``tag`` when given)."""
    manifest = folder / "manifest.json"
    if not manifest.exists():
        raise FileNotFoundError(f"{manifest} is missing (run tests/fixtures/unseen/make_unseen.py)")
    out = []
    for meta in json.loads(manifest.read_text()):
        if kind is not None and meta["kind"] != kind:
            continue
        if tag is not None and tag not in meta["tags"]:
            continue
        with wave.open(str(folder / f"{meta['name']}.wav"), "rb") as w:
            if w.getframerate() != SAMPLE_RATE or w.getnchannels() != 1 or w.getsampwidth() != 2:
                raise ValueError(f"{meta['name']}.wav is not 16 kHz mono PCM16")
            pcm = w.readframes(w.getnframes())
        out.append(Utterance(
            name=meta["name"], text=meta["text"], kind=meta["kind"], tags=tuple(meta["tags"]), voice=meta["voice"], pcm=pcm,
            first_voiced_sample=int(meta["first_voiced_sample"]), last_voiced_sample=int(meta["last_voiced_sample"]),
            pauses=tuple((int(a), int(b)) for a, b in meta.get("pauses", [])),
        ))
    return out


def unseen_questions() -> list[Fixture]:
    """The complete, not-long utterances (>= 20 different requests) as ``bench local``
    fixtures."""
    return [u.as_fixture() for u in load_unseen("complete") if "long" not in u.tags and "repetition" not in u.tags]
