"""Repository functions (synchronous; async callers wrap them in ``asyncio.to_thread``).

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

from ..config import SettingsError, VoiceSettings
from ..pipeline.timing import MARK_ORDER, TurnMarks
from .engine import get_engine
from .models import Conversation, Message, SettingsRow, TurnTiming


def create_all() -> None:
    """Create missing tables (tests; production uses ``reflex db migrate``)."""
    SQLModel.metadata.create_all(get_engine())


def _session() -> Session:
    return Session(get_engine(), expire_on_commit=False)


# ---------------------------------------------------------------- conversations
def create_conversation(title: str = "New conversation", conversation_id: str | None = None) -> Conversation:
    with _session() as s:
        conv = Conversation(title=title[:200]) if not conversation_id else Conversation(id=conversation_id, title=title[:200])
        s.add(conv)
        s.commit()
        return conv


def ensure_conversation(conversation_id: str | None) -> Conversation:
    """The conversation with this id, created on its first message.

    A voice turn's request is built (and its gateway session key chosen) while the
    user is still speaking, before anything is stored: the id is picked then and
    the row written only once there are words to keep.
    """
    if conversation_id:
        existing = get_conversation(conversation_id)
        if existing is not None:
            return existing
    return create_conversation(conversation_id=conversation_id or None)


def get_conversation(conversation_id: str) -> Conversation | None:
    with _session() as s:
        return s.get(Conversation, conversation_id)


def list_conversations(search: str = "", limit: int = 200) -> list[dict[str, Any]]:
    """Newest first; ``search`` matches the title or any message text."""
    with _session() as s:
        q = select(Conversation)
        if search.strip():
            like = f"%{search.strip()}%"
            sub = select(Message.conversation_id).where(col(Message.content).ilike(like))
            q = q.where(or_(col(Conversation.title).ilike(like), col(Conversation.id).in_(sub)))
        q = q.order_by(col(Conversation.updated_at).desc()).limit(limit)
        return [
            {"id": c.id, "title": c.title, "created_at": c.created_at, "updated_at": c.updated_at}
            for c in s.exec(q).all()
        ]


def delete_conversation(conversation_id: str) -> list[str]:
    """Delete a conversation with its messages and timings; returns its audio ids."""
    with _session() as s:
        msgs = s.exec(select(Message).where(Message.conversation_id == conversation_id)).all()
        audio = [a for m in msgs for a in json.loads(m.audio_ids or "[]")]
        s.exec(delete(TurnTiming).where(col(TurnTiming.conversation_id) == conversation_id))
        s.exec(delete(Message).where(col(Message.conversation_id) == conversation_id))
        s.exec(delete(Conversation).where(col(Conversation.id) == conversation_id))
        s.commit()
        return audio


def delete_all_conversations() -> list[str]:
    with _session() as s:
        audio: list[str] = []
        for m in s.exec(select(Message)).all():
            audio.extend(json.loads(m.audio_ids or "[]"))
        s.exec(delete(TurnTiming))
        s.exec(delete(Message))
        s.exec(delete(Conversation))
        s.commit()
        return audio


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
def add_user_message(conversation_id: str, text: str, spoken: bool = False) -> Message:
    with _session() as s:
        msg = Message(conversation_id=conversation_id, role="user", content=text, spoken=spoken)
        s.add(msg)
        _touch(s, conversation_id, title_from=text)
        s.commit()
        return msg


def start_assistant_message(conversation_id: str, spoken: bool) -> Message:
    with _session() as s:
        msg = Message(conversation_id=conversation_id, role="assistant", content="", finished=False, spoken=spoken)
        s.add(msg)
        s.commit()
        return msg


def update_assistant_message(
    message_id: int,
    content: str,
    audio_ids: Iterable[str] | None = None,
    *,
    finished: bool = False,
    interrupted: bool = False,
    error: str = "",
) -> None:
    with _session() as s:
        msg = s.get(Message, message_id)
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


def list_messages(conversation_id: str) -> list[dict[str, Any]]:
    with _session() as s:
        msgs = s.exec(select(Message).where(Message.conversation_id == conversation_id).order_by(col(Message.id))).all()
        return [message_dict(m) for m in msgs]


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


def recent_history(conversation_id: str, turns: int) -> list[tuple[str, str]]:
    """The last ``turns`` user/assistant exchanges as (role, content), oldest first."""
    if turns <= 0:
        return []
    with _session() as s:
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
def save_timing(conversation_id: str, message_id: int | None, marks: TurnMarks, spoken_input: bool) -> int:
    rel = marks.relative()
    with _session() as s:
        row = TurnTiming(conversation_id=conversation_id, message_id=message_id, spoken_input=spoken_input, **{k: rel.get(k) for k in MARK_ORDER})
        if rel.get("first_audio_playing") is not None and marks.speech_end is not None:
            row.v2v_ms = rel["first_audio_playing"]
        s.add(row)
        s.commit()
        return row.id or 0


def set_first_audio_playing(timing_id: int, relative_ms: float) -> None:
    with _session() as s:
        row = s.get(TurnTiming, timing_id)
        if row is None:
            return
        row.first_audio_playing = round(relative_ms, 1)
        if row.speech_end is not None:
            row.v2v_ms = round(relative_ms - row.speech_end, 1)
        s.add(row)
        s.commit()


def timings_for(conversation_id: str) -> list[dict[str, Any]]:
    with _session() as s:
        rows = s.exec(select(TurnTiming).where(TurnTiming.conversation_id == conversation_id).order_by(col(TurnTiming.id))).all()
        return [timing_dict(r) for r in rows]


def timing_dict(r: TurnTiming) -> dict[str, Any]:
    d = {k: getattr(r, k) for k in MARK_ORDER}
    d.update(id=r.id, message_id=r.message_id, spoken_input=r.spoken_input, v2v_ms=r.v2v_ms, created_at=r.created_at)
    return d


def latency_summary(last: int = 50) -> dict[str, dict[str, float | None]]:
    """p50/p95 over the last ``last`` turns of each headline figure (ms)."""
    with _session() as s:
        rows = s.exec(select(TurnTiming).order_by(col(TurnTiming.id).desc()).limit(last)).all()
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


def count_turns() -> int:
    with _session() as s:
        return int(s.exec(select(func.count()).select_from(TurnTiming)).one())


# ---------------------------------------------------------------- settings
def load_settings() -> VoiceSettings:
    """The stored settings over the env defaults; a bad stored row falls back per field."""
    base = VoiceSettings.from_env()
    try:
        with _session() as s:
            row = s.get(SettingsRow, 1)
    except Exception:  # table missing before the first migration
        return base
    if row is None:
        return base
    try:
        data = json.loads(row.data or "{}")
    except ValueError:
        return base
    try:
        return VoiceSettings.from_dict(data, base=base)
    except SettingsError as exc:
        good = {k: v for k, v in data.items() if k not in exc.errors}
        try:
            return VoiceSettings.from_dict(good, base=base)
        except SettingsError:
            return base


def save_settings(settings: VoiceSettings) -> None:
    with _session() as s:
        row = s.get(SettingsRow, 1) or SettingsRow(id=1)
        row.data = json.dumps(settings.to_dict())
        row.updated_at = time.time()
        s.add(row)
        s.commit()


# ---------------------------------------------------------------- export
def export_conversation(conversation_id: str, fmt: str = "md") -> tuple[str, str]:
    """(filename, text) for a Markdown or JSON export."""
    conv = get_conversation(conversation_id)
    msgs = list_messages(conversation_id)
    title = conv.title if conv else conversation_id
    if fmt == "json":
        body = json.dumps(
            {
                "id": conversation_id,
                "title": title,
                "created_at": conv.created_at if conv else None,
                "messages": [{k: m[k] for k in ("role", "content", "created_at", "interrupted")} for m in msgs],
                "timings": timings_for(conversation_id),
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
