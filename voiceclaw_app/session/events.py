"""What a :class:`~.session.VoiceSession` emits: typed events (dataclasses).

Two kinds of listener subscribe: the page's socket (``server/ws_voice.py``) sends
the events that have a :meth:`wire` form (playback commands, errors, takeover) and
the Reflex projection (``states/projection.py``) turns the rest into page state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SessionEvent:
    def wire(self) -> dict | None:
        """The message for the page's socket, or None when the socket has no use for it."""
        return None


@dataclass(frozen=True)
class StatusChanged(SessionEvent):
    """idle / listening / thinking / speaking / error (derived in ``status.py`` only)."""

    status: str


@dataclass(frozen=True)
class MicChanged(SessionEvent):
    on: bool


@dataclass(frozen=True)
class PlaybackCommand(SessionEvent):
    """pause (a tentative voice onset), resume (it was a cough), barge_in (cancelled).

    ``turn`` names the reply a barge-in cuts: its chunk URLs travel on the Reflex
    socket and may reach the page *after* this command (which travels on
    ``/ws/voice``), so the page must know never to start that turn's audio."""

    action: str
    server_time_ms: float
    turn: str = ""

    def wire(self) -> dict:
        return {"type": self.action, "server_time_ms": self.server_time_ms, "turn": self.turn}


@dataclass(frozen=True)
class ErrorRaised(SessionEvent):
    """A failure the person must read (listening failed, a refused message)."""

    message: str
    code: str = ""

    def wire(self) -> dict:
        out = {"type": "error", "message": self.message}
        if self.code:
            out["code"] = self.code
        return out


@dataclass(frozen=True)
class TakenOver(SessionEvent):
    """Another tab of the same account took the microphone."""

    def wire(self) -> dict:
        return {"type": "taken_over"}


@dataclass(frozen=True)
class Notice(SessionEvent):
    message: str


@dataclass(frozen=True)
class UserInterim(SessionEvent):
    text: str


@dataclass(frozen=True)
class TurnStarted(SessionEvent):
    turn_id: str
    conversation_id: str
    user_message_id: int
    user_text: str
    speak: bool


@dataclass(frozen=True)
class ReplyToken(SessionEvent):
    turn_id: str
    text: str


@dataclass(frozen=True)
class ReplyAudio(SessionEvent):
    turn_id: str
    url: str
    audio_id: str = ""


@dataclass(frozen=True)
class StillWorkingCue(SessionEvent):
    turn_id: str
    waited_ms: int


@dataclass(frozen=True)
class TurnFinished(SessionEvent):
    turn_id: str
    conversation_id: str
    message_id: int | None
    content: str
    interrupted: bool
    error: str
    audio_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReplyCut(SessionEvent):
    """A finished reply was cut later (a "stopped" report with the chunks heard)."""

    turn_id: str
    message_id: int | None
    content: str


@dataclass(frozen=True)
class PlaybackEnded(SessionEvent):
    """The page's queue reported ended/stopped for this turn (its URLs must not replay)."""

    turn_id: str
    stopped: bool


@dataclass(frozen=True)
class PageGone(SessionEvent):
    """The page that played this session's audio is gone (socket closed, a new queue mounted)."""


@dataclass(frozen=True)
class Heard(SessionEvent):
    """A listener event, as the session saw it (for observers: benchmarks, diagnostics)."""

    event: Any


@dataclass(frozen=True)
class PipelineEvent(SessionEvent):
    """A turn event of the reply, after the session handled it (for observers)."""

    turn_id: str
    event: Any
