"""The cluster of ``make cluster`` (deploy/cluster.py), tested as it runs: 3 workers on
Redis + PostgreSQL behind Caddy with TLS, providers = the cloud protocol servers.

* two browsers talk through ``https://`` / ``wss://`` at the same time;
* Reflex state updates cross workers (``app.modify_state`` on the worker holding the
  mic socket reaches a page whose Reflex socket sits on another worker);
* faults: Redis restarted mid-conversation, PostgreSQL unreachable for 10 s, a worker
  SIGKILLed mid-reply (tests/test_faults_cluster.py holds those, on this fixture).

Ports (overridable): workers from ``VOICECLAW_TEST_CLUSTER_PORT`` (3811), https
``VOICECLAW_TEST_HTTPS_PORT`` (3843), Redis ``VOICECLAW_TEST_REDIS_PORT`` (3890),
PostgreSQL ``VOICECLAW_TEST_PG_PORT`` (3891).

Login: the accounts work adds a login to every page and socket; when merged, log
each browser in where :func:`_login` says (and the raw clients through
``voiceclaw_app.bench.load.login_headers``).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from deploy.cluster import PG_BIN, Cluster
from tests.servers.fleet import CloudFleet
from voiceclaw_app.bench.browser import CHROMIUM, chromium_args
from voiceclaw_app.bench.drive import load_fixtures
from voiceclaw_app.bench.load import SPOKEN_TEXT, SimulatedUser

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PORTS = dict(
    first_port=int(os.environ.get("VOICECLAW_TEST_CLUSTER_PORT", "3811")),
    https_port=int(os.environ.get("VOICECLAW_TEST_HTTPS_PORT", "3843")),
    redis_port=int(os.environ.get("VOICECLAW_TEST_REDIS_PORT", "3890")),
    pg_port=int(os.environ.get("VOICECLAW_TEST_PG_PORT", "3891")),
)


def _have_tools() -> str | None:
    for tool in ("redis-server", "caddy"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (make test installs it)"
    if not (PG_BIN / "initdb").exists():
        return "PostgreSQL 15 binaries not found"
    if not Path(CHROMIUM).exists():
        return "Chromium not installed"
    return None


@pytest.fixture(scope="session")
def fleet():
    with CloudFleet(default_text=SPOKEN_TEXT) as f:
        yield f


@pytest.fixture(scope="session")
def cluster(fleet):
    missing = _have_tools()
    if missing:
        pytest.skip(missing)
    root = Path(tempfile.mkdtemp(prefix="voiceclaw-cluster-"))
    os.chmod(root, 0o755)  # PostgreSQL runs as its own user
    c = Cluster(root=root, workers=3, extra_env=fleet.env(), **PORTS)
    c.start(build=True)
    try:
        yield c
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)


def messages(cluster: Cluster) -> list[dict]:
    engine = create_engine(cluster.postgres.url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(text("select id, conversation_id, role, content, finished, interrupted from vc_message order by id"))]
    finally:
        engine.dispose()


def _poll(fn, timeout_s: float, step: float = 0.25):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(step)
    return fn()


def _login(page, base: str) -> None:
    """Hook for the accounts work: log this browser in (e.g. a user per browser via
    /login, or a cookie from ``create_login_session``). No login exists yet."""


def test_two_browsers_talk_through_tls_on_three_workers(cluster):
    from playwright.sync_api import sync_playwright

    from voiceclaw_app.bench.browser import wait_ready

    questions = ["Tell me about the Moon.", "What should I cook tonight?"]
    with sync_playwright() as pw:
        browsers = [pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(None)) for _ in questions]
        try:
            pages, sockets = [], []
            for b in browsers:
                page = b.new_context(ignore_https_errors=True).new_page()
                seen: list[str] = []
                page.on("websocket", lambda ws, seen=seen: seen.append(ws.url))
                page.goto(cluster.url + "/")
                _login(page, cluster.url)
                wait_ready(page)
                pages.append(page)
                sockets.append(seen)
            for page, q in zip(pages, questions):  # both turns run at once
                page.fill("#text-input", q)
                page.click("#send-button")
            for page in pages:
                page.wait_for_selector('#transcript [data-role="assistant"]:not([data-streaming])', timeout=60000)
                assert _poll(lambda: int(page.get_attribute("#audio-queue", "data-played-count") or 0) >= 1, 60), "no reply audio played"
                assert "Answer" in page.text_content('#transcript [data-role="assistant"]:not([data-streaming])')
        finally:
            for b in browsers:
                b.close()
    for seen in sockets:
        assert any(u.startswith(cluster.ws_url + "/_event") for u in seen), seen
        assert any(u.startswith(cluster.ws_url + "/ws/voice?token=") for u in seen), seen
    stored = messages(cluster)
    for q in questions:
        user = [m for m in stored if m["role"] == "user" and m["content"] == q]
        assert user, f"{q!r} not in the history"
        replies = [m for m in stored if m["role"] == "assistant" and m["conversation_id"] == user[0]["conversation_id"]]
        assert replies and replies[0]["content"].startswith("Answer") and replies[0]["finished"]


async def test_state_updates_reach_a_page_whose_socket_is_on_another_worker(cluster):
    """The mic socket on worker 1, the Reflex socket on worker 0: the turn runs on worker 1
    and its ``app.modify_state`` updates reach the page through Redis (Reflex's token
    manager publishes them to the owning worker's "lost and found" channel)."""
    fx = [f for f in load_fixtures() if f.name.startswith("q_")]
    w0, w1 = (f"http://127.0.0.1:{p}" for p in cluster.ports[:2])
    user = SimulatedUser(w0, None, index=101, event_url=w0, voice_url=w1)
    await user.connect()
    try:
        assert await user.speak(fx[0], 40), user.stats.problems
        assert user.audio_fetched >= 1 and not user.audio_errors, user.audio_errors
    finally:
        await user.close()


async def test_reply_audio_is_served_by_every_worker(cluster):
    """A clip synthesized on one worker is served by all of them (the database audio store)."""
    import aiohttp

    fx = [f for f in load_fixtures() if f.name.startswith("q_")]
    user = SimulatedUser(cluster.url, cluster.ssl_context(), index=102)
    await user.connect()
    try:
        assert await user.speak(fx[1], 40), user.stats.problems
        url = user.played_urls[0] if user.played_urls else None
    finally:
        await user.close()
    assert url, "no audio URL in the page state"
    async with aiohttp.ClientSession() as http:
        for port in cluster.ports:
            async with http.get(f"http://127.0.0.1:{port}{url}") as resp:
                assert resp.status == 200, (port, resp.status)
                body = await resp.read()
                assert body[:4] == b"RIFF"
