"""``python -m voiceclaw_app.cli user ...`` and ``serve-check``, run as a person would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cli(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", url)
    from voiceclaw_app.db import repo

    repo.create_all()
    env = {**os.environ, "VOICECLAW_DATA_DIR": str(tmp_path), "VOICECLAW_DATABASE_URL": url}

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "voiceclaw_app.cli", *args], cwd=ROOT, env=env, input=stdin, text=True, capture_output=True, timeout=120)

    return run


def test_user_commands_end_to_end(cli):
    from voiceclaw_app import accounts

    r = cli("user", "list")
    assert r.returncode == 0 and "no accounts yet" in r.stdout
    r = cli("user", "add", "Carl", "--password-stdin", stdin="correct horse battery\n")
    assert r.returncode == 0, r.stderr
    assert "created admin 'carl'" in r.stdout and "first account is always an admin" in r.stdout
    r = cli("user", "add", "dana", "--password-stdin", stdin="another password\n")
    assert r.returncode == 0 and "created user 'dana'" in r.stdout
    r = cli("user", "add", "dana", "--password-stdin", stdin="another password\n")
    assert r.returncode == 1 and "exists already" in r.stderr
    r = cli("user", "add", "eve", "--password-stdin", stdin="short\n")
    assert r.returncode == 1 and "at least 8" in r.stderr
    r = cli("user", "list")
    assert r.stdout.splitlines() == ["carl\tadmin\t0 conversation(s)", "dana\tuser\t0 conversation(s)"]
    # the password read from stdin is exactly the first line (spaces kept, newline not)
    assert accounts.check_login("carl", "correct horse battery", None).account is not None
    r = cli("user", "passwd", "dana", "--password-stdin", stdin="a brand new password\n")
    assert r.returncode == 0 and "sessions ended" in r.stdout
    assert accounts.check_login("dana", "a brand new password", None).account is not None
    r = cli("user", "passwd", "nobody", "--password-stdin", stdin="whatever password\n")
    assert r.returncode == 1 and "No user named" in r.stderr
    r = cli("user", "remove", "carl")
    assert r.returncode == 1 and "only admin" in r.stderr
    r = cli("user", "remove", "dana")
    assert r.returncode == 0 and "removed 'dana'" in r.stdout
    assert [u.name for u in accounts.list_users()] == ["carl"]


def test_serve_check_refuses_a_public_address_with_no_account(cli):
    r = cli("serve-check", "127.0.0.1")
    assert r.returncode == 0 and r.stderr == ""
    r = cli("serve-check", "0.0.0.0")
    assert r.returncode == 1 and "user add NAME --admin --password-stdin" in r.stderr
    cli("user", "add", "carl", "--password-stdin", stdin="correct horse battery\n")
    r = cli("serve-check", "0.0.0.0")
    assert r.returncode == 0 and "without TLS" in r.stderr


def test_a_database_that_was_never_migrated_is_explained(tmp_path):
    env = {**os.environ, "VOICECLAW_DATA_DIR": str(tmp_path), "VOICECLAW_DATABASE_URL": f"sqlite:///{tmp_path / 'empty.db'}"}
    r = subprocess.run([sys.executable, "-m", "voiceclaw_app.cli", "user", "list"], cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
    assert r.returncode == 1 and "reflex db migrate" in r.stderr
