"""SQLModel tables: users and their login sessions, conversations, messages, turn
timings, the settings row.

Plain ``sqlmodel.SQLModel`` tables (``rx.Model`` is deprecated); migrations with
``reflex db makemigrations`` / ``reflex db migrate`` (``alembic/``).
Times are epoch seconds (float) for display; turn marks are milliseconds relative
to the turn's origin (speech end, else final transcript), as the waterfall draws them.
"""

from __future__ import annotations

import time
import uuid
from typing import Optional

from sqlmodel import Field, SQLModel


def _now() -> float:
    return time.time()


def new_id() -> str:
    return uuid.uuid4().hex


class User(SQLModel, table=True):
    """An account. Passwords are argon2id hashes (``accounts.py``); ``prefs`` holds the
    user's own voice preferences (``config.USER_PREF_FIELDS``) as JSON, merged over
    the global settings row by ``repo.load_settings(user_id)``."""

    __tablename__ = "vc_user"

    id: Optional[int] = Field(default=None, primary_key=True)
    name: str = Field(max_length=64, unique=True, index=True)
    password_hash: str = Field(default="", max_length=200)
    is_admin: bool = False
    created_at: float = Field(default_factory=_now)
    prefs: str = "{}"


class LoginSession(SQLModel, table=True):
    """A logged-in browser. ``id`` is the SHA-256 of the cookie value, so a copy of
    the database does not hold usable cookies."""

    __tablename__ = "vc_login_session"

    id: str = Field(primary_key=True, max_length=64)
    user_id: int = Field(foreign_key="vc_user.id", index=True)
    created_at: float = Field(default_factory=_now)
    expires_at: float = Field(index=True)


class LoginFailure(SQLModel, table=True):
    """One failed login, for the rate limit (``key`` is ``user:<name>`` or ``addr:<ip>``).
    In the database so every worker process counts the same failures."""

    __tablename__ = "vc_login_failure"

    id: Optional[int] = Field(default=None, primary_key=True)
    key: str = Field(max_length=200, index=True)
    at: float = Field(default_factory=_now, index=True)


class Conversation(SQLModel, table=True):
    __tablename__ = "vc_conversation"

    id: str = Field(default_factory=new_id, primary_key=True, max_length=40)
    #: the owner; NULL only for rows from before accounts, claimed by the first admin
    user_id: Optional[int] = Field(default=None, foreign_key="vc_user.id", index=True)
    title: str = Field(default="New conversation", max_length=200)
    created_at: float = Field(default_factory=_now, index=True)
    updated_at: float = Field(default_factory=_now, index=True)


class Message(SQLModel, table=True):
    __tablename__ = "vc_message"

    id: Optional[int] = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="vc_conversation.id", index=True, max_length=40)
    role: str = Field(max_length=16)  # user | assistant
    content: str = ""
    created_at: float = Field(default_factory=_now)
    updated_at: float = Field(default_factory=_now)
    #: False while an assistant reply is still streaming; a crash leaves it False
    finished: bool = True
    #: the reply was cut (barge-in, stop, crash): content ends at the last played chunk
    interrupted: bool = False
    spoken: bool = False
    #: JSON list of audio ids of the chunks this reply played/synthesized
    audio_ids: str = "[]"
    error: str = ""


class TurnTiming(SQLModel, table=True):
    __tablename__ = "vc_turn_timing"

    id: Optional[int] = Field(default=None, primary_key=True)
    conversation_id: str = Field(foreign_key="vc_conversation.id", index=True, max_length=40)
    message_id: Optional[int] = Field(default=None, foreign_key="vc_message.id", index=True)
    created_at: float = Field(default_factory=_now, index=True)
    spoken_input: bool = False
    # contract marks, ms after the origin (speech_end for spoken turns, else stt_final)
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
    #: first_audio_playing - speech_end when both are known
    v2v_ms: Optional[float] = None


class SettingsRow(SQLModel, table=True):
    __tablename__ = "vc_settings"

    id: int = Field(default=1, primary_key=True)
    #: VoiceSettings.to_dict() as JSON (no API keys: they live in the key store)
    data: str = "{}"
    updated_at: float = Field(default_factory=_now)
