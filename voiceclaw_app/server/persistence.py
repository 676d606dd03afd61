"""``DbConversationStore``: the session's :class:`~voiceclaw_app.session.ports.ConversationStore`
over the database, for one user.

The guarantees the session relies on: the user message is written when final; the
assistant message is created unfinished and updated as the reply streams (every audio
chunk, and at least every second of text); a cut (barge-in, stop) rewrites it to what
was heard, marked interrupted; the session orders one reply's writes so an abandoned
write never lands after the cut.

Every call is scoped to ``user_id``: a conversation or message id of another user is
not found (``repo.NotFound``), never appended to.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from sqlalchemy.exc import DBAPIError, OperationalError

from ..db import repo
from ..pipeline.timing import TurnMarks

UNREACHABLE = "The database can't be reached right now, so nothing of this turn could be stored: try again in a moment."


class StoreUnavailable(Exception):
    """The database is down or refused the connection: a person reads ``user_message``,
    not the driver's text (which names hosts, ports and SQL)."""

    user_message = UNREACHABLE


def _plainly(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (OperationalError, DBAPIError) as exc:
            raise StoreUnavailable(UNREACHABLE) from exc

    return call


class DbConversationStore:
    def __init__(self, user_id: int) -> None:
        self.user_id = user_id

    @_plainly
    def ensure_conversation(self, conversation_id: str) -> str:
        return repo.ensure_conversation(self.user_id, conversation_id or None).id

    @_plainly
    def add_user_message(self, conversation_id: str, text: str, spoken: bool) -> int:
        return repo.add_user_message(self.user_id, conversation_id, text, spoken).id or 0

    @_plainly
    def start_assistant_message(self, conversation_id: str, spoken: bool) -> int:
        return repo.start_assistant_message(self.user_id, conversation_id, spoken).id or 0

    @_plainly
    def update_assistant_message(self, message_id: int, content: str, audio_ids: list[str], *, finished: bool = False, interrupted: bool = False, error: str = "") -> None:
        repo.update_assistant_message(self.user_id, message_id, content, audio_ids, finished=finished, interrupted=interrupted, error=error)

    @_plainly
    def recent_history(self, conversation_id: str, turns: int) -> list[tuple[str, str]]:
        return repo.recent_history(self.user_id, conversation_id, turns)

    @_plainly
    def save_timing(self, conversation_id: str, message_id: int | None, marks: TurnMarks, spoken_input: bool) -> int:
        return repo.save_timing(self.user_id, conversation_id, message_id, marks, spoken_input)

    @_plainly
    def set_first_audio_playing(self, timing_id: int, relative_ms: float) -> None:
        repo.set_first_audio_playing(self.user_id, timing_id, relative_ms)
