"""The shared audio store: what one box synthesized, every box serves; deleted is deleted everywhere.

Two stores with separate local directories on one database stand for two machines.
Run against SQLite (always) and a throwaway PostgreSQL 15 (when its binaries are
on the machine), through the real ``/audio`` route of a Starlette app.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.routing import Route
from starlette.testclient import TestClient

from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.audio_store_db import DbAudioStore, audio_store_mode, open_audio_store
from voiceclaw_app.providers.base import AudioClip


def _clip(seconds: float = 0.3, freq: float = 440.0) -> AudioClip:
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (np.sin(2 * np.pi * freq * t) * 8000).astype("<i2").tobytes()
    return AudioClip.from_pcm16(pcm, 16000)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audio.db'}"
    url = request.getfixturevalue("pg_url")
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("drop table if exists vc_audio_blob"))
    engine.dispose()
    return url


@pytest.fixture()
def two_boxes(tmp_path, db_url):
    a = DbAudioStore(tmp_path / "box-a", db_url)
    b = DbAudioStore(tmp_path / "box-b", db_url)
    yield a, b
    a.close()
    b.close()


def _route_client(store: AudioStore) -> TestClient:
    """The app's real route, with the store it would get from services."""
    from voiceclaw_app.server import audio as audio_route_module
    from voiceclaw_app.states import services

    services._audio_store = store
    app = Starlette(routes=[Route("/audio/{id}.wav", audio_route_module.audio_route, methods=["GET", "HEAD"])])
    return TestClient(app)


def _logged_in_user(db_url: str, monkeypatch) -> tuple[int, dict[str, str]]:
    """A real account in the same database and its login cookie (the route serves a
    clip only to the user its URL was signed for, logged in)."""
    import uuid

    from voiceclaw_app import accounts
    from voiceclaw_app.db import repo
    from voiceclaw_app.server.auth import SESSION_COOKIE, create_login_session

    monkeypatch.setenv("VOICECLAW_DATABASE_URL", db_url)
    repo.create_all()
    user = accounts.add_user(f"box-{uuid.uuid4().hex[:8]}", "correct horse battery")
    return user.id, {"Cookie": f"{SESSION_COOKIE}={create_login_session(user.id)}"}


def test_a_clip_saved_on_one_box_is_served_by_another(two_boxes, db_url, monkeypatch):
    from voiceclaw_app.server.auth import sign_stored_url

    a, b = two_boxes
    user_id, cookie = _logged_in_user(db_url, monkeypatch)
    clip = _clip()
    stored = a.save(clip)
    assert a.flush(10)
    assert not (b.root / f"{stored.audio_id}.wav").exists()
    url = sign_stored_url(stored.url, user_id)
    try:
        client = _route_client(b)
        response = client.get(url, headers=cookie)
        anonymous = client.get(url)
        unsigned = client.get(stored.url, headers=cookie)
    finally:
        from voiceclaw_app.states import services

        services._audio_store = None
    assert anonymous.status_code == 401  # no login: the shared store changes nothing there
    assert unsigned.status_code == 404
    assert response.status_code == 200
    assert response.content == clip.wav
    assert response.headers["content-type"] == "audio/wav"


async def test_locate_waits_for_an_upload_in_flight(two_boxes):
    """The page may ask box B for a clip a few ms before box A's upload commits."""
    a, b = two_boxes
    clip = _clip(0.2, 300)
    stored = a.save(clip)  # no flush: the uploader thread races the lookup
    path = await b.locate(stored.audio_id)
    assert path is not None and path.read_bytes() == clip.wav


async def test_unknown_and_malformed_ids_are_not_found_quickly(two_boxes):
    a, b = two_boxes
    b.fetch_wait_s = 0.3
    t0 = time.monotonic()
    assert await b.locate("doesnotexist123") is None
    assert time.monotonic() - t0 < 2.0
    assert await b.locate("../../etc/passwd") is None
    assert b.path_for("../x") is None


async def test_deleting_on_one_box_removes_it_everywhere(two_boxes):
    a, b = two_boxes
    a.fetch_wait_s = b.fetch_wait_s = 0.2
    stored = a.save(_clip())
    assert a.flush(10)
    assert await b.locate(stored.audio_id) is not None  # B now holds a copy too
    assert b.delete([stored.audio_id]) >= 1
    assert await a.locate(stored.audio_id) is None  # A's own copy is not served any more
    assert await b.locate(stored.audio_id) is None


async def test_retention_prunes_the_database_rows(two_boxes):
    a, b = two_boxes
    b.fetch_wait_s = 0.2
    old = a.save(_clip())
    assert a.flush(10)
    old_time = time.time() - 10 * 86400
    with a.engine.begin() as conn:
        from voiceclaw_app.pipeline.audio_store_db import audio_blobs

        conn.execute(audio_blobs.update().where(audio_blobs.c.id == old.audio_id).values(created_at=old_time))
    os.utime(a.root / f"{old.audio_id}.wav", (old_time, old_time))
    fresh = a.save(_clip(0.1))
    assert a.flush(10)
    assert b.prune(7 * 86400) >= 1
    assert await b.locate(old.audio_id) is None
    assert await b.locate(fresh.audio_id) is not None


def test_a_database_outage_never_blocks_save(tmp_path):
    """Unreachable database: save returns at once (the clip is on this box), uploads retry."""
    store = DbAudioStore(tmp_path / "box", "postgresql+psycopg://x@127.0.0.1:9/none", retry_s=0.2)
    try:
        t0 = time.monotonic()
        stored = store.save(_clip())
        assert time.monotonic() - t0 < 0.2
        assert store.path_for(stored.audio_id) == tmp_path / "box" / f"{stored.audio_id}.wav"
        assert not store.flush(1.0)  # still pending: nothing was lost, nothing was claimed
    finally:
        store.close()


def test_mode_selection(monkeypatch, tmp_path):
    monkeypatch.delenv("VOICECLAW_AUDIO_STORE", raising=False)
    assert audio_store_mode("sqlite:///x.db") == "disk"
    assert audio_store_mode("postgresql+psycopg://h/db") == "db"
    monkeypatch.setenv("VOICECLAW_AUDIO_STORE", "disk")
    assert audio_store_mode("postgresql+psycopg://h/db") == "disk"
    monkeypatch.setenv("VOICECLAW_AUDIO_STORE", "db")
    store = open_audio_store(tmp_path / "a", f"sqlite:///{tmp_path / 'a.db'}")
    try:
        assert isinstance(store, DbAudioStore) and store.shared
    finally:
        store.close()
    monkeypatch.setenv("VOICECLAW_AUDIO_STORE", "s3")
    with pytest.raises(ValueError, match="disk, db or auto"):
        audio_store_mode("sqlite:///x.db")
