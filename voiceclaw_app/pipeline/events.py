"""Typed events a turn yields, in the order a listener sees them.

The Reflex state, the CLI and the benchmarks consume the same stream; none of
them needs to know which providers produced it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .timing import TurnMarks


@dataclass(frozen=True)
class UserText:
    """The final user message the turn answers."""

    text: str


@dataclass(frozen=True)
class LLMToken:
    """A batch-free text delta as the LLM produced it (original text, markdown and all)."""

    text: str


@dataclass(frozen=True)
class ChunkText:
    """A speakable chunk was cut: ``text`` is the original, ``speech`` what TTS reads."""

    seq: int
    text: str
    speech: str
    notice: bool = False  # an app phrase such as "the rest is on screen"


@dataclass(frozen=True)
class AudioReady:
    """A playable piece of chunk ``seq``'s audio, served at ``url``; strictly in order.

    Streaming TTS hands a chunk over in pieces (``part`` 0, 1, ...) so playback starts
    on its first few hundred ms; other providers give one piece per chunk. ``text`` is
    the chunk's original text on its first piece and empty on the rest, so the text
    of the pieces played so far is what the user heard (barge-in bookkeeping).
    """

    seq: int
    audio_id: str
    url: str
    duration_ms: float
    text: str
    part: int = 0


@dataclass(frozen=True)
class StillWorking:
    """No token for a while (the gateway's agent may be running tools): a cue to voice."""

    waited_ms: float
    audio_url: str | None = None


@dataclass(frozen=True)
class TurnNotice:
    """Something the user should know that did not end the turn (e.g. fell back to a local engine)."""

    message: str


@dataclass(frozen=True)
class TurnDone:
    reply_text: str
    marks: TurnMarks
    spoken_chunks: int
    truncated_speech: bool = False


@dataclass(frozen=True)
class TurnError:
    """The turn ended on a failure; ``reply_text`` keeps whatever was already produced."""

    message: str
    kind: str
    reply_text: str
    marks: TurnMarks
    audio_url: str | None = None  # the spoken error phrase, when TTS works
    detail: str = field(default="", compare=False)


TurnEvent = Union[UserText, LLMToken, ChunkText, AudioReady, StillWorking, TurnNotice, TurnDone, TurnError]
