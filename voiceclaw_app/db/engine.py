"""Database URL and a process-wide engine (SQLite by default, Postgres by env var)."""

from __future__ import annotations

import os
import threading

from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlmodel import create_engine

from ..config import data_dir

_engine: Engine | None = None
_engine_url: str | None = None
_lock = threading.Lock()


def database_url() -> str:
    """``VOICECLAW_DATABASE_URL`` or ``sqlite:///<data_dir>/voiceclaw.db``."""
    url = os.environ.get("VOICECLAW_DATABASE_URL", "").strip()
    if url:
        return url
    return f"sqlite:///{data_dir() / 'voiceclaw.db'}"


def get_engine() -> Engine:
    """One engine per process and URL (tests switch the URL by env var)."""
    global _engine, _engine_url
    url = database_url()
    with _lock:
        if _engine is None or _engine_url != url:
            kwargs: dict = {"pool_pre_ping": True}
            if url.startswith("sqlite"):
                kwargs["connect_args"] = {"check_same_thread": False, "timeout": 15}
            _engine = create_engine(url, **kwargs)
            _engine_url = url
            if url.startswith("sqlite"):
                event.listen(_engine, "connect", _sqlite_pragmas)
    return _engine


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
