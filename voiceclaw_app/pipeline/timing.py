"""Per-turn timing marks (monotonic milliseconds), as named in the contracts.

``speech_end`` is the last voiced audio of the user's turn, not the moment the end
of turn was decided; V2V is ``first_audio_playing - speech_end``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, fields
from typing import Optional

MARK_ORDER = (
    "speech_end",
    "eot_decided",
    "stt_final",
    "llm_request",
    "llm_first_token",
    "first_chunk",
    "tts_first_request",
    "first_audio_ready",
    "first_audio_playing",
    "turn_done",
)


def now_ms() -> float:
    """The clock every mark uses: monotonic, in milliseconds."""
    return time.monotonic() * 1000.0


@dataclass
class TurnMarks:
    speech_end: Optional[float] = None
    eot_decided: Optional[float] = None
    stt_final: Optional[float] = None
    llm_request: Optional[float] = None
    llm_first_token: Optional[float] = None
    first_chunk: Optional[float] = None
    tts_first_request: Optional[float] = None
    first_audio_ready: Optional[float] = None
    first_audio_playing: Optional[float] = None
    turn_done: Optional[float] = None

    def mark(self, name: str, at: float | None = None, *, overwrite: bool = False) -> float:
        """Set a mark once (first occurrence wins unless ``overwrite``)."""
        if name not in MARK_ORDER:
            raise KeyError(name)
        value = now_ms() if at is None else at
        if overwrite or getattr(self, name) is None:
            setattr(self, name, value)
        return getattr(self, name)

    def to_dict(self) -> dict[str, Optional[float]]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TurnMarks":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def origin(self) -> Optional[float]:
        """The turn's start: speech end for spoken turns, else the final transcript."""
        return self.speech_end if self.speech_end is not None else self.stt_final

    def relative(self) -> dict[str, Optional[float]]:
        """Marks in ms after :meth:`origin`, for storage and the latency waterfall."""
        start = self.origin()
        return {k: (None if v is None or start is None else round(v - start, 1)) for k, v in self.to_dict().items()}

    def stages(self) -> dict[str, float]:
        """Stage durations for the per-turn log line and the benchmarks."""
        pairs = {
            "endpointing": ("speech_end", "eot_decided"),
            "stt": ("speech_end", "stt_final"),
            "llm_first_token": ("llm_request", "llm_first_token"),
            "first_chunk": ("llm_first_token", "first_chunk"),
            "tts_first": ("tts_first_request", "first_audio_ready"),
            "time_to_first_audio": ("stt_final", "first_audio_ready"),
            "voice_to_voice": ("speech_end", "first_audio_playing"),
            "turn": ("stt_final", "turn_done"),
        }
        out: dict[str, float] = {}
        for name, (a, b) in pairs.items():
            va, vb = getattr(self, a), getattr(self, b)
            if va is not None and vb is not None:
                out[name] = round(vb - va, 1)
        return out
