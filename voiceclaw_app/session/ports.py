"""What a :class:`~.session.VoiceSession` needs from outside, as Protocols.

The session never imports the database, Reflex or the provider factory: the server
layer hands it a :class:`ConversationStore` (``server/persistence.py`` over the
database, :class:`InMemoryStore` in tests and benchmarks) and :class:`Services`
(settings, the turn runner, the listener).
"""

from __future__ import annotations

import itertools
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..pipeline.timing import TurnMarks


class ConversationStore(Protocol):
    """One user's conversations. Calls are blocking (a database); the session runs them in a thread."""

    def ensure_conversation(self, conversation_id: str) -> str: ...

    def add_user_message(self, conversation_id: str, text: str, spoken: bool) -> int: ...

    def start_assistant_message(self, conversation_id: str, spoken: bool) -> int: ...

    def update_assistant_message(self, message_id: int, content: str, audio_ids: list[str], *, finished: bool = False, interrupted: bool = False, error: str = "") -> None: ...

    def recent_history(self, conversation_id: str, turns: int) -> list[tuple[str, str]]: ...

    def save_timing(self, conversation_id: str, message_id: int | None, marks: TurnMarks, spoken_input: bool) -> int: ...

    def set_first_audio_playing(self, timing_id: int, relative_ms: float) -> None: ...


class Services(Protocol):
    """Settings, the (cached) turn runner and a new listener; ``states/services.py`` is one."""

    async def load_settings(self, user_id: int | None = None) -> Any:
        """The provider settings with this user's voice preferences over them."""
        ...

    async def get_runner(self, settings: Any) -> Any: ...

    async def build_listener(self, settings: Any) -> Any: ...


@dataclass
class StoredMessage:
    role: str
    content: str
    spoken: bool = False
    audio_ids: list[str] = field(default_factory=list)
    finished: bool = True
    interrupted: bool = False
    error: str = ""


class InMemoryStore:
    """A :class:`ConversationStore` in a dict: for tests and benchmarks (no database)."""

    def __init__(self) -> None:
        self.conversations: dict[str, list[int]] = {}
        self.messages: dict[int, StoredMessage] = {}
        self.timings: dict[int, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def ensure_conversation(self, conversation_id: str) -> str:
        cid = conversation_id or secrets.token_hex(8)
        self.conversations.setdefault(cid, [])
        return cid

    def add_user_message(self, conversation_id: str, text: str, spoken: bool) -> int:
        mid = next(self._ids)
        self.messages[mid] = StoredMessage("user", text, spoken)
        self.conversations[conversation_id].append(mid)
        return mid

    def start_assistant_message(self, conversation_id: str, spoken: bool) -> int:
        mid = next(self._ids)
        self.messages[mid] = StoredMessage("assistant", "", spoken, finished=False)
        self.conversations[conversation_id].append(mid)
        return mid

    def update_assistant_message(self, message_id: int, content: str, audio_ids: list[str], *, finished: bool = False, interrupted: bool = False, error: str = "") -> None:
        m = self.messages[message_id]
        m.content, m.audio_ids = content, list(audio_ids)
        m.finished, m.interrupted = finished, interrupted  # as the database does
        m.error = error or m.error

    def recent_history(self, conversation_id: str, turns: int) -> list[tuple[str, str]]:
        msgs = [self.messages[i] for i in self.conversations.get(conversation_id, [])]
        return [(m.role, m.content) for m in msgs if m.content][-2 * turns :]

    def save_timing(self, conversation_id: str, message_id: int | None, marks: TurnMarks, spoken_input: bool) -> int:
        tid = next(self._ids)
        self.timings[tid] = {"conversation_id": conversation_id, "message_id": message_id, "stages": marks.stages(), "first_audio_playing": None}
        return tid

    def set_first_audio_playing(self, timing_id: int, relative_ms: float) -> None:
        self.timings[timing_id]["first_audio_playing"] = relative_ms

    def history(self, conversation_id: str) -> list[StoredMessage]:
        return [self.messages[i] for i in self.conversations.get(conversation_id, [])]
