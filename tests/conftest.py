"""Shared fixtures: a private data dir per test session, so tests never touch ./data;
a real redis-server and PostgreSQL for the tests of what workers share."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

_tmp = tempfile.mkdtemp(prefix="voiceclaw-test-")
os.environ.setdefault("VOICECLAW_DATA_DIR", _tmp)
# A stray OPENAI_BASE_URL must never redirect our clients (they take explicit URLs).
os.environ["OPENAI_BASE_URL"] = "http://127.0.0.1:9/never-used"
# ...but share the models assembled by `make setup` (copying 150 MB per run is waste).
os.environ.setdefault("VOICECLAW_MODEL_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "models"))


def _running(make, prefix: str):
    """Start ``make(root)`` (a deploy.cluster server) in a fresh temp dir, yield its URL, stop it."""
    root = Path(tempfile.mkdtemp(prefix=prefix))  # not under pytest's 0700 dir: postgres must reach it
    os.chmod(root, 0o755)
    server = make(root)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_url():
    """A redis-server of the test session's own (deploy.cluster.Redis), stopped at the end."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (make test installs it)")
    from deploy.cluster import Redis

    yield from _running(lambda root: Redis(root=root, port=int(os.environ.get("VOICECLAW_TEST_TOKENS_REDIS_PORT", "3895"))), "voiceclaw-redis-")


@pytest.fixture(scope="session")
def pg_url():
    """A throwaway PostgreSQL 15 cluster (``initdb``; deploy.cluster.Postgres), stopped at the end."""
    from deploy.cluster import PG_BIN, Postgres

    if not (PG_BIN / "initdb").exists():
        pytest.skip("PostgreSQL 15 binaries not on this machine")
    # not the cluster test's 3891: its cluster lives for the whole session
    yield from _running(lambda root: Postgres(root, int(os.environ.get("VOICECLAW_TEST_AUDIO_PG_PORT", "3892"))), "voiceclaw-pg-")
