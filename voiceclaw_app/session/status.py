"""The one place the session's status is derived (LiveKit's agent state).

Nothing assigns a status: the session calls :func:`derive_status` after every
change and emits ``StatusChanged`` when the answer differs.
"""

from __future__ import annotations

from dataclasses import dataclass

STATUSES = ("idle", "listening", "thinking", "speaking", "error")


@dataclass(frozen=True)
class StatusInputs:
    mic_on: bool
    reply_running: bool  # the turn task is producing the reply
    playing: bool  # the page reports playing the reply's audio
    audio_pending: bool  # the reply is done, has audio the page has not finished playing
    failed: bool  # the last turn or listening failed (cleared by the next action)


def derive_status(s: StatusInputs) -> str:
    if s.playing or s.audio_pending:
        return "speaking"
    if s.reply_running:
        return "thinking"
    if s.failed:
        return "error"
    return "listening" if s.mic_on else "idle"
