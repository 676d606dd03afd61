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

Login: every page and socket needs a logged-in user. Each browser logs in through
the login form as its own account (two accounts, created with the CLI in the
cluster's PostgreSQL); the raw clients (``SimulatedUser``) carry the session cookie
of ``voiceclaw_app.bench.load.login_headers`` (an account per index, same database)
on both sockets and on every audio fetch.
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

from deploy.cluster import Cluster, missing_tools
from tests.servers.fleet import CloudFleet
from voiceclaw_app.bench.browser import CHROMIUM, AppUser, chromium_args, create_user
from voiceclaw_app.bench.drive import load_fixtures
from voiceclaw_app.bench.load import SPOKEN_TEXT, SimulatedUser

pytestmark = [pytest.mark.slow, pytest.mark.e2e]

PORTS = dict(
    first_port=int(os.environ.get("VOICECLAW_TEST_CLUSTER_PORT", "3811")),
    https_port=int(os.environ.get("VOICECLAW_TEST_HTTPS_PORT", "3843")),
    redis_port=int(os.environ.get("VOICECLAW_TEST_REDIS_PORT", "3890")),
    pg_port=int(os.environ.get("VOICECLAW_TEST_PG_PORT", "3891")),
)


#: one account per browser of the two-browser test
PEOPLE = (AppUser("ada", "ada-password-1"), AppUser("bruno", "bruno-password-2"))


def _have_tools() -> str | None:
    missing = missing_tools()
    if missing:
        return missing
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
    previous_db = os.environ.get("VOICECLAW_DATABASE_URL")
    try:
        for person in PEOPLE:
            create_user(c.worker_env(), person)
        os.environ["VOICECLAW_DATABASE_URL"] = c.postgres.url  # login_headers: the cluster's accounts
        yield c
    finally:
        if previous_db is None:
            os.environ.pop("VOICECLAW_DATABASE_URL", None)
        else:
            os.environ["VOICECLAW_DATABASE_URL"] = previous_db
        c.stop()
        if os.environ.get("VOICECLAW_TEST_KEEP_CLUSTER"):  # its logs, for a failure's post-mortem
            print(f"cluster kept in {root}")
        else:
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


def _login(page, base: str, person: AppUser) -> None:
    """Log this browser in through the login form, as a person does (the page at "/"
    sends a browser without a login to /login; the form posts to /auth/login, which
    sets the HttpOnly session cookie and sends it back)."""
    page.wait_for_url(lambda u: "/login" in u, timeout=60000)
    page.wait_for_selector("#login-username", timeout=60000)
    page.fill("#login-username", person.name)
    page.fill("#login-password", person.password)
    page.click("#login-submit")
    page.wait_for_url(lambda u: "/login" not in u, timeout=60000)


def test_two_browsers_talk_through_tls_on_three_workers(cluster):
    from playwright.sync_api import sync_playwright

    from voiceclaw_app.bench.browser import wait_ready

    questions = ["Tell me about the Moon.", "What should I cook tonight?"]
    with sync_playwright() as pw:
        browsers = [pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(None)) for _ in questions]
        try:
            pages, sockets = [], []
            for b, person in zip(browsers, PEOPLE):
                page = b.new_context(ignore_https_errors=True).new_page()
                seen: list[str] = []
                page.on("websocket", lambda ws, seen=seen: seen.append(ws.url))
                page.goto(cluster.url + "/")
                _login(page, cluster.url, person)
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


async def test_one_mic_per_account_across_workers(cluster):
    """One account, two tabs whose mic sockets sit on two workers: the second tab's mic
    takes the first's (it is told ``taken_over``), through the workers' mic bus on Redis;
    another account's tab on the first worker keeps its mic."""
    w0, w1 = (f"http://127.0.0.1:{p}" for p in cluster.ports[:2])
    first = SimulatedUser(w0, None, index=103, event_url=w0, voice_url=w0)
    other_account = SimulatedUser(w0, None, index=104, event_url=w0, voice_url=w0)
    second = SimulatedUser(w1, None, index=103, event_url=w1, voice_url=w1)
    try:
        await first.connect()
        await other_account.connect()
        await asyncio.sleep(0.5)
        assert not any(m.get("type") == "taken_over" for m in first.server_messages)
        await second.connect()  # its mic starts: the account's mic moves to worker 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(m.get("type") == "taken_over" for m in first.server_messages):
            await asyncio.sleep(0.1)
        assert any(m.get("type") == "taken_over" for m in first.server_messages), "the tab on worker 0 kept the account's mic"
        assert not any(m.get("type") == "taken_over" for m in second.server_messages + other_account.server_messages)
    finally:
        for u in (first, other_account, second):
            await u.close()


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
    cookie = user._headers
    assert cookie, "the simulated user carried no login"
    async with aiohttp.ClientSession() as http:
        for port in cluster.ports:
            async with http.get(f"http://127.0.0.1:{port}{url}", headers=cookie) as resp:
                assert resp.status == 200, (port, resp.status)
                body = await resp.read()
                assert body[:4] == b"RIFF"
            async with http.get(f"http://127.0.0.1:{port}{url}") as resp:
                assert resp.status == 401, (port, resp.status)  # signed for a user, served to that user only


# ---------------------------------------------------------------- faults on the cluster
def _history_of(cluster: Cluster, since_id: int) -> list[dict]:
    return [m for m in messages(cluster) if m["id"] > since_id]


def _last_id(cluster: Cluster) -> int:
    rows = messages(cluster)
    return rows[-1]["id"] if rows else 0


async def _wait_status(user: SimulatedUser, statuses: tuple[str, ...], timeout_s: float) -> bool:
    return await user.page.wait_for(lambda: user.page.status in statuses, timeout_s)


async def test_redis_restarted_mid_conversation(cluster):
    """Redis goes away and comes back while a reply plays: the turn's words are stored,
    and the next turn works (the page reconnects as a browser does)."""
    fx = [f for f in load_fixtures() if f.name.startswith("q_")]
    before = _last_id(cluster)
    user = SimulatedUser(cluster.url, cluster.ssl_context(), index=201)
    await user.connect()
    try:
        assert await user.speak(fx[0], 40), user.stats.problems
        user._speech += fx[1].pcm
        assert await _wait_status(user, ("thinking", "speaking"), 30)
        await asyncio.to_thread(cluster.redis.restart)
        await asyncio.sleep(3)
    finally:
        await user.close()
    again = SimulatedUser(cluster.url, cluster.ssl_context(), index=201, token=user.token)  # the page reconnecting
    await again.connect()
    try:
        assert await again.speak(fx[2], 40), again.stats.problems
    finally:
        await again.close()
    stored = _history_of(cluster, before)
    assert sum(m["role"] == "user" for m in stored) >= 3, stored
    assert all(m["content"] for m in stored if m["role"] == "assistant"), stored


async def test_postgres_unreachable_for_ten_seconds(cluster):
    """The database is down for 10 s around a turn: the page says so in words (no raw
    SQL error), nothing stays "thinking"/"speaking", and once it is back turns work."""
    fx = [f for f in load_fixtures() if f.name.startswith("q_")]
    user = SimulatedUser(cluster.url, cluster.ssl_context(), index=202)
    await user.connect()
    try:
        assert await user.speak(fx[0], 40), user.stats.problems
        before = _last_id(cluster)
        await asyncio.to_thread(cluster.postgres.halt)
        t0 = time.monotonic()
        try:
            user._speech += fx[1].pcm
            await user.page.wait_for(lambda: bool(user.page.error) or user.page.status == "speaking", 20)
            shown = user.page.error + " " + user.page.notice
            assert "sqlalchemy" not in shown.lower() and "psycopg" not in shown.lower() and "no such table" not in shown.lower(), shown
        finally:
            await asyncio.sleep(max(0.0, 10 - (time.monotonic() - t0)))
            await asyncio.to_thread(cluster.postgres.resume)
        assert await user.page.wait_for(lambda: user.page.status not in ("thinking", "speaking"), 30), user.page.status
        user.page.error = ""
        assert await user.speak(fx[2], 40), user.stats.problems
    finally:
        await user.close()
    stored = _history_of(cluster, before)
    assert any(m["role"] == "user" for m in stored)


async def test_worker_sigkilled_mid_reply(cluster, fleet):
    """Worker 2 is SIGKILLed while it speaks a reply: the user's words and the reply's
    words so far are in the history, the reply is marked interrupted, the page (reconnected
    to a live worker) leaves "speaking" with a notice, and the next turn works.

    The reply is long (about 6 s of tokens at the cloud profile's 40/s), so the kill
    lands while it is still being written, not after the worker stored it whole.
    The reconnecting tab keeps its Reflex token (server/reflex_tokens.py: Reflex took
    it for a duplicate of the dead worker's socket and gave it a new, empty state)."""
    from tests.servers.openai_chat import ChatBehavior

    long_reply = "Answer long: " + " ".join(["The river runs past the old mill, and the hills behind it turn gold in the evening."] * 14)
    fx = [f for f in load_fixtures() if f.name.startswith("q_")]
    w2 = f"http://127.0.0.1:{cluster.ports[2]}"
    before = _last_id(cluster)
    user = SimulatedUser(w2, None, index=203)
    await user.connect()
    # every request of this turn (an early start at the pause included) gets the long reply
    await asyncio.to_thread(fleet.call, lambda: fleet.chat.queue.extend(ChatBehavior(reply=long_reply) for _ in range(3)))
    try:
        user._speech += fx[3].pcm
        assert await _wait_status(user, ("speaking",), 40), user.page.status
        await asyncio.sleep(0.8)  # some of the reply streamed and played
        await asyncio.to_thread(cluster.kill_worker, 2)
    finally:
        await user.close()
    await asyncio.to_thread(cluster.start_worker, 2)
    await asyncio.to_thread(cluster.wait_worker, 2)
    stored = _history_of(cluster, before)
    assert any(m["role"] == "user" for m in stored), stored
    reply = [m for m in stored if m["role"] == "assistant"]
    assert reply and reply[0]["content"].startswith("Answer"), stored  # the words streamed before the crash
    assert reply[0]["content"] != long_reply, "the reply was complete before the kill: the test did not kill mid-reply"
    assert _poll(lambda: [m for m in _history_of(cluster, before) if m["role"] == "assistant" and m["interrupted"] and m["finished"]], 20), ("reply not marked interrupted", _history_of(cluster, before))
    await asyncio.to_thread(fleet.call, fleet.chat.queue.clear)
    again = SimulatedUser(cluster.url, cluster.ssl_context(), index=203, token=user.token)
    await again.connect()
    try:
        assert await again.page.wait_for(lambda: again.page.status not in ("thinking", "speaking") and bool(again.page.notice), 15), (again.page.status, again.page.notice)
        assert await again.speak(fx[0], 40), again.stats.problems
    finally:
        await again.close()
        await asyncio.to_thread(fleet.call, fleet.chat.queue.clear)
