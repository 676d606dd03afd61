"""Migrations run against the configured database itself, whatever was migrated before.

The bug this guards: ``make run`` skipped ``reflex db migrate`` because a stamp in
``./data`` said some database had been migrated, and a new data dir or database
URL then failed every turn with "no such table". Now the check reads the target
database's ``alembic_version``; several processes starting at once migrate it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect

from voiceclaw_app.db.migrate import MigrationError, ensure_migrated

ROOT = Path(__file__).resolve().parents[1]


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_fresh_database_is_migrated_then_left_alone(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    assert ensure_migrated(url) is True
    assert {"vc_conversation", "vc_message", "vc_settings", "vc_turn_timing", "alembic_version"} <= _tables(url)
    assert ensure_migrated(url) is False


def test_a_second_database_is_migrated_although_the_first_was(tmp_path):
    first, second = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b' / 'b.db'}"
    (tmp_path / "b").mkdir()
    assert ensure_migrated(first) is True
    assert ensure_migrated(second) is True
    assert "vc_message" in _tables(second)


def test_the_configured_url_is_the_default(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", url)
    assert ensure_migrated() is True
    assert "vc_message" in _tables(url)


def test_concurrent_starts_migrate_once(tmp_path):
    """Three processes at once (three workers starting): one migrates, the others wait and find it done."""
    db = tmp_path / "shared.db"
    code = "import sys; from voiceclaw_app.db.migrate import ensure_migrated; print('RAN' if ensure_migrated(sys.argv[1]) else 'SKIP')"
    env = dict(os.environ)
    procs = [subprocess.Popen([sys.executable, "-c", code, f"sqlite:///{db}"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    results = sorted(o[0].strip() for o in outs)
    assert results == ["RAN", "SKIP", "SKIP"], outs


def test_unreachable_database_is_a_readable_error():
    with pytest.raises(MigrationError) as info:
        ensure_migrated("postgresql+psycopg://nobody:secret@127.0.0.1:9/none?connect_timeout=2")
    message = str(info.value)
    assert "could not migrate the database at" in message
    assert "secret" not in message  # the password never reaches a log line


def test_make_migrate_targets_the_configured_data_dir(tmp_path):
    """``make migrate`` with a new VOICECLAW_DATA_DIR migrates that directory's database."""
    env = dict(os.environ)
    env.pop("VOICECLAW_DATABASE_URL", None)
    env["VOICECLAW_DATA_DIR"] = str(tmp_path / "other-data")
    out = subprocess.run(["make", "-s", "migrate"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert "vc_message" in _tables(f"sqlite:///{tmp_path / 'other-data' / 'voiceclaw.db'}")
