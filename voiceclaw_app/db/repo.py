"""Repository functions (synchronous; async callers wrap them in ``asyncio.to_thread``).

Every conversation, message and timing function takes the ``user_id`` first and
only touches that user's rows: another user's ids read as not found.

Persistence rules (contracts): the user's message is written when final; the
assistant's reply is created unfinished at the start of the turn and updated at
least per spoken chunk; :func:`recover_unfinished` (run at startup) marks replies a
crash left unfinished as interrupted, so nothing already said is lost.
"""

from __future__ import annotations

import json
import time
from typing import Any, Iterable

from sqlalchemy import delete, func, or_
from sqlmodel import Session, SQLModel, col, select

from ..config import USER_PREF_FIELDS, SettingsError, VoiceSettings
from ..pipeline.timing import MARK_ORDER, TurnMarks
from .engine import get_engine
from .models import Conversation, Message, SettingsRow, TurnTiming, User


def create_all() -> None:
    """Create missing tables (tests; production uses ``reflex db migrate``)."""
    SQLModel.metadata.create_all(get_engine())


def _session() -> Session:
    return Session(get_engine(), expire_on_commit=False)


# ---------------------------------------------------------------- conversations
class NotFound(LookupError):
    """No such conversation or message *for this user*: another user's ids read the
    same as ids that do not exist, so a guessed id tells nothing."""


def create_conversation(user_id: int, title: str = "New conversation", conversation_id: str | None = None) -> Conversation:
    with _session() as s:
        conv = Conversation(user_id=user_id, title=title[:200])
        if conversation_id:
            conv.id = conversation_id
        s.add(conv)
        s.commit()
        return conv


def ensure_conversation(user_id: int, conversation_id: str | None) -> Conversation:
    """The user's conversation with this id, created on its first message.

    A voice turn's request is built (and its gateway session key chosen) while the
    user is still speaking, before anything is stored: the id is picked then and
    the row written only once there are words to keep. An id that belongs to
    another user raises :class:`NotFound` (never appends to their conversation).
    """
    if conversation_id:
        with _session() as s:
            existing = s.get(Conversation, conversation_id)
        if existing is not None:
            if existing.user_id != user_id:
                raise NotFound(conversation_id)
            return existing
    return create_conversation(user_id, conversation_id=conversation_id or None)


def get_conversation(user_id: int, conversation_id: str) -> Conversation | None:
    """The conversation if it is this user's, else None."""
    with _session() as s:
        conv = s.get(Conversation, conversation_id)
        return conv if conv is not None and conv.user_id == user_id else None


def _owned(s: Session, user_id: int, conversation_id: str) -> bool:
    conv = s.get(Conversation, conversation_id)
    return conv is not None and conv.user_id == user_id


def list_conversations(user_id: int, search: str = "", limit: int = 200) -> list[dict[str, Any]]:
    """The user's conversations, newest first; ``search`` matches the title or any message text."""
    with _session() as s:
        q = select(Conversation).where(Conversation.user_id == user_id)
        if search.strip():
            like = f"%{search.strip()}%"
            sub = select(Message.conversation_id).where(col(Message.content).ilike(like))
            q = q.where(or_(col(Conversation.title).ilike(like), col(Conversation.id).in_(sub)))
        q = q.order_by(col(Conversation.updated_at).desc()).limit(limit)
        return [
            {"id": c.id, "title": c.title, "created_at": c.created_at, "updated_at": c.updated_at}
            for c in s.exec(q).all()
        ]


def _delete_conversations(s: Session, ids: list[str]) -> list[str]:
    if not ids:
        return []
    msgs = s.exec(select(Message).where(col(Message.conversation_id).in_(ids))).all()
    audio = [a for m in msgs for a in json.loads(m.audio_ids or "[]")]
    s.exec(delete(TurnTiming).where(col(TurnTiming.conversation_id).in_(ids)))
    s.exec(delete(Message).where(col(Message.conversation_id).in_(ids)))
    s.exec(delete(Conversation).where(col(Conversation.id).in_(ids)))
    return audio


def delete_conversation(user_id: int, conversation_id: str) -> list[str]:
    """Delete the user's conversation with its messages and timings; returns its audio ids
    (nothing happens, and [] comes back, for another user's id)."""
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            return []
        audio = _delete_conversations(s, [conversation_id])
        s.commit()
        return audio


def delete_all_conversations(user_id: int) -> list[str]:
    """Delete every conversation of this user (no one else's); returns their audio ids."""
    with _session() as s:
        ids = list(s.exec(select(Conversation.id).where(Conversation.user_id == user_id)).all())
        audio = _delete_conversations(s, ids)
        s.commit()
        return audio


def claim_unowned_conversations(user_id: int) -> int:
    """Give the conversations from before accounts existed to this user (the first admin)."""
    with _session() as s:
        rows = s.exec(select(Conversation).where(Conversation.user_id == None)).all()  # noqa: E711
        for c in rows:
            c.user_id = user_id
            s.add(c)
        s.commit()
        return len(rows)


def _touch(s: Session, conversation_id: str, title_from: str | None = None) -> None:
    conv = s.get(Conversation, conversation_id)
    if conv is None:
        return
    conv.updated_at = time.time()
    if title_from and conv.title == "New conversation":
        t = " ".join(title_from.split())
        conv.title = (t[:60] + "…") if len(t) > 60 else (t or conv.title)
    s.add(conv)


# ---------------------------------------------------------------- messages
def add_user_message(user_id: int, conversation_id: str, text: str, spoken: bool = False) -> Message:
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            raise NotFound(conversation_id)
        msg = Message(conversation_id=conversation_id, role="user", content=text, spoken=spoken)
        s.add(msg)
        _touch(s, conversation_id, title_from=text)
        s.commit()
        return msg


def start_assistant_message(user_id: int, conversation_id: str, spoken: bool) -> Message:
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            raise NotFound(conversation_id)
        msg = Message(conversation_id=conversation_id, role="assistant", content="", finished=False, spoken=spoken)
        s.add(msg)
        s.commit()
        return msg


def _own_message(s: Session, user_id: int, message_id: int) -> Message | None:
    msg = s.get(Message, message_id)
    if msg is None or not _owned(s, user_id, msg.conversation_id):
        return None
    return msg


def update_assistant_message(
    user_id: int,
    message_id: int,
    content: str,
    audio_ids: Iterable[str] | None = None,
    *,
    finished: bool = False,
    interrupted: bool = False,
    error: str = "",
) -> None:
    with _session() as s:
        msg = _own_message(s, user_id, message_id)
        if msg is None:
            return
        msg.content = content
        if audio_ids is not None:
            msg.audio_ids = json.dumps(list(audio_ids))
        msg.finished = finished
        msg.interrupted = interrupted
        if error:
            msg.error = error[:500]
        msg.updated_at = time.time()
        s.add(msg)
        _touch(s, msg.conversation_id)
        s.commit()


def list_messages(user_id: int, conversation_id: str) -> list[dict[str, Any]]:
    """The conversation's messages, oldest first; [] for another user's conversation."""
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            return []
        msgs = s.exec(select(Message).where(Message.conversation_id == conversation_id).order_by(col(Message.id))).all()
        return [message_dict(m) for m in msgs]


def get_message(user_id: int, message_id: int) -> dict[str, Any] | None:
    """One message of this user's, else None."""
    with _session() as s:
        msg = _own_message(s, user_id, message_id)
        return message_dict(msg) if msg is not None else None


def message_dict(m: Message) -> dict[str, Any]:
    return {
        "id": m.id,
        "role": m.role,
        "content": m.content,
        "created_at": m.created_at,
        "interrupted": m.interrupted,
        "finished": m.finished,
        "spoken": m.spoken,
        "audio_ids": json.loads(m.audio_ids or "[]"),
        "error": m.error,
    }


def recent_history(user_id: int, conversation_id: str, turns: int) -> list[tuple[str, str]]:
    """The last ``turns`` user/assistant exchanges as (role, content), oldest first."""
    if turns <= 0:
        return []
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            return []
        q = (
            select(Message)
            .where(Message.conversation_id == conversation_id)
            .where(Message.content != "")
            .order_by(col(Message.id).desc())
            .limit(turns * 2)
        )
        msgs = list(reversed(s.exec(q).all()))
        return [(m.role, m.content) for m in msgs if m.role in ("user", "assistant")]


def recover_unfinished() -> int:
    """Startup: replies a crash left unfinished are kept as they are, marked interrupted."""
    with _session() as s:
        msgs = s.exec(select(Message).where(Message.finished == False)).all()  # noqa: E712
        for m in msgs:
            m.finished = True
            m.interrupted = True
            s.add(m)
        s.commit()
        return len(msgs)


# ---------------------------------------------------------------- timings
def save_timing(user_id: int, conversation_id: str, message_id: int | None, marks: TurnMarks, spoken_input: bool) -> int:
    rel = marks.relative()
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            raise NotFound(conversation_id)
        row = TurnTiming(conversation_id=conversation_id, message_id=message_id, spoken_input=spoken_input, **{k: rel.get(k) for k in MARK_ORDER})
        if rel.get("first_audio_playing") is not None and marks.speech_end is not None:
            row.v2v_ms = rel["first_audio_playing"]
        s.add(row)
        s.commit()
        return row.id or 0


def set_first_audio_playing(user_id: int, timing_id: int, relative_ms: float) -> None:
    with _session() as s:
        row = s.get(TurnTiming, timing_id)
        if row is None or not _owned(s, user_id, row.conversation_id):
            return
        row.first_audio_playing = round(relative_ms, 1)
        if row.speech_end is not None:
            row.v2v_ms = round(relative_ms - row.speech_end, 1)
        s.add(row)
        s.commit()


def timings_for(user_id: int, conversation_id: str) -> list[dict[str, Any]]:
    with _session() as s:
        if not _owned(s, user_id, conversation_id):
            return []
        rows = s.exec(select(TurnTiming).where(TurnTiming.conversation_id == conversation_id).order_by(col(TurnTiming.id))).all()
        return [timing_dict(r) for r in rows]


def timing_dict(r: TurnTiming) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in MARK_ORDER}
    d.update(id=r.id, message_id=r.message_id, spoken_input=r.spoken_input, v2v_ms=r.v2v_ms, created_at=r.created_at)
    return d


def _user_timings(user_id: int):
    owned = select(Conversation.id).where(Conversation.user_id == user_id)
    return select(TurnTiming).where(col(TurnTiming.conversation_id).in_(owned))


def latency_summary(user_id: int, last: int = 50) -> dict[str, dict[str, float | None]]:
    """p50/p95 over the user's last ``last`` turns of each headline figure (ms)."""
    with _session() as s:
        rows = s.exec(_user_timings(user_id).order_by(col(TurnTiming.id).desc()).limit(last)).all()
    figures = {
        "first_token": [r.llm_first_token for r in rows],
        "first_audio_ready": [r.first_audio_ready for r in rows],
        "voice_to_voice": [r.v2v_ms for r in rows],
        "turn_done": [r.turn_done for r in rows],
    }
    return {k: percentiles([v for v in vals if v is not None]) for k, vals in figures.items()}


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "n": 0}
    v = sorted(values)

    def pick(q: float) -> float:
        idx = min(len(v) - 1, max(0, round(q * (len(v) - 1))))
        return round(v[idx], 1)

    return {"p50": pick(0.5), "p95": pick(0.95), "n": len(v)}


def count_turns(user_id: int) -> int:
    with _session() as s:
        owned = select(Conversation.id).where(Conversation.user_id == user_id)
        q = select(func.count()).select_from(TurnTiming).where(col(TurnTiming.conversation_id).in_(owned))
        return int(s.exec(q).one())


# ---------------------------------------------------------------- settings
def _global_settings() -> VoiceSettings:
    """The stored settings row over the env defaults; a bad stored row falls back per field."""
    base = VoiceSettings.from_env()
    try:
        with _session() as s:
            row = s.get(SettingsRow, 1)
    except Exception:  # table missing before the first migration
        return base
    if row is None:
        return base
    return _merge(base, row.data)


def _merge(base: VoiceSettings, raw: str | None, only: Iterable[str] | None = None) -> VoiceSettings:
    """``raw`` (JSON) over ``base``; fields that fail validation keep the base value."""
    try:
        data = json.loads(raw or "{}")
    except ValueError:
        return base
    if not isinstance(data, dict):
        return base
    if only is not None:
        keep = set(only)
        data = {k: v for k, v in data.items() if k in keep}
    try:
        return VoiceSettings.from_dict(data, base=base)
    except SettingsError as exc:
        good = {k: v for k, v in data.items() if k not in exc.errors}
        try:
            return VoiceSettings.from_dict(good, base=base)
        except SettingsError:
            return base


def load_settings(user_id: int | None = None) -> VoiceSettings:
    """The global settings (admin: providers, keys' addresses, prompt...), with the
    user's own voice preferences (``USER_PREF_FIELDS``) merged over them."""
    settings = _global_settings()
    if user_id is None:
        return settings
    try:
        with _session() as s:
            user = s.get(User, user_id)
    except Exception:
        return settings
    if user is None:
        return settings
    return _merge(settings, user.prefs, only=USER_PREF_FIELDS)


def save_user_prefs(user_id: int, settings: VoiceSettings) -> None:
    """Store the user's voice preferences (only ``USER_PREF_FIELDS`` of ``settings``)."""
    values = settings.to_dict()
    with _session() as s:
        user = s.get(User, user_id)
        if user is None:
            raise NotFound(str(user_id))
        user.prefs = json.dumps({k: values[k] for k in USER_PREF_FIELDS})
        s.add(user)
        s.commit()


def save_settings(settings: VoiceSettings) -> None:
    with _session() as s:
        row = s.get(SettingsRow, 1) or SettingsRow(id=1)
        row.data = json.dumps(settings.to_dict())
        row.updated_at = time.time()
        s.add(row)
        s.commit()


# ---------------------------------------------------------------- export
def export_conversation(user_id: int, conversation_id: str, fmt: str = "md") -> tuple[str, str]:
    """(filename, text) for a Markdown or JSON export of the user's conversation."""
    conv = get_conversation(user_id, conversation_id)
    if conv is None:
        raise NotFound(conversation_id)
    msgs = list_messages(user_id, conversation_id)
    title = conv.title
    if fmt == "json":
        body = json.dumps(
            {
                "id": conversation_id,
                "title": title,
                "created_at": conv.created_at,
                "messages": [{k: m[k] for k in ("role", "content", "created_at", "interrupted")} for m in msgs],
                "timings": timings_for(user_id, conversation_id),
            },
            indent=2,
        )
        return f"conversation-{conversation_id[:8]}.json", body
    lines = [f"# {title}", ""]
    for m in msgs:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"]))
        who = "You" if m["role"] == "user" else "Assistant"
        flag = " _(interrupted)_" if m["interrupted"] else ""
        lines += [f"**{who}** ({stamp}){flag}", "", m["content"], ""]
    return f"conversation-{conversation_id[:8]}.md", "\n".join(lines)
