"""The session's database store says "the database can't be reached" in words."""

from __future__ import annotations

import pytest


def test_an_unreachable_database_is_said_in_words(tmp_path, monkeypatch):
    # a PostgreSQL URL nobody listens on (port 9 is discard; nothing answers PostgreSQL there)
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", "postgresql+psycopg://nobody:pw@127.0.0.1:9/none?connect_timeout=2")
    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path))
    from voiceclaw_app.server.persistence import StoreUnavailable, DbConversationStore

    store = DbConversationStore(1)
    with pytest.raises(StoreUnavailable) as info:
        store.recent_history("c" * 32, 4)
    message = info.value.user_message
    assert "database" in message and "try again" in message
    assert "psycopg" not in str(info.value).lower() and "9" not in message
