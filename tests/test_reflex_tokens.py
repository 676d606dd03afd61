"""A tab whose worker died keeps its Reflex token (server/reflex_tokens.py), against a
real redis-server and Reflex's own RedisTokenManager: two "workers" are two managers
with their own instance ids on one Redis."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from deploy.cluster import Redis
from voiceclaw_app.server import reflex_tokens

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (make test installs it)")


@pytest.fixture(scope="module")
def redis_url():
    root = Path(tempfile.mkdtemp(prefix="voiceclaw-tokens-"))
    server = Redis(root=root, port=int(os.environ.get("VOICECLAW_TEST_TOKENS_REDIS_PORT", "3895")))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def _worker(url: str):
    """One worker's token manager, wrapped as the app wraps it."""
    import redis.asyncio as aioredis
    from reflex.utils.token_manager import RedisTokenManager

    manager = RedisTokenManager(aioredis.from_url(url))
    app = SimpleNamespace(event_namespace=SimpleNamespace(_token_manager=manager))
    assert reflex_tokens.install(app) and not reflex_tokens.install(app)  # once
    return manager


async def _beat(manager) -> None:
    await manager.redis.set(reflex_tokens.ALIVE_PREFIX + manager.instance_id, b"1", ex=reflex_tokens.ALIVE_TTL_S)


async def test_a_dead_workers_tab_keeps_its_token_a_live_duplicate_does_not(redis_url):
    dead, live, other = _worker(redis_url), _worker(redis_url), _worker(redis_url)
    await _beat(live)
    await _beat(other)
    # worker "dead" held tab A's socket and was killed (no beat, its record left behind)
    assert await dead.link_token_to_sid("tab-a", "sid-1") is None
    assert await dead.redis.exists(dead._get_redis_key("tab-a"))
    # tab A reconnects to another worker: same token, so the same state
    assert await other.link_token_to_sid("tab-a", "sid-2") is None
    assert await other._get_token_owner("tab-a", refresh=True) == other.instance_id
    # a copy of a tab whose worker is alive is still a duplicate (Reflex's rule)
    assert await live.link_token_to_sid("tab-b", "sid-3") is None
    fresh = await other.link_token_to_sid("tab-b", "sid-4")
    assert fresh and fresh != "tab-b"
    # the worker's own reconnect is Reflex's fast path, untouched
    assert await other.link_token_to_sid("tab-a", "sid-2") is None
    for m in (dead, live, other):
        await m.redis.aclose()


async def test_keep_alive_beats_under_the_current_instance_id(redis_url):
    import asyncio

    manager = _worker(redis_url)
    app = SimpleNamespace(event_namespace=SimpleNamespace(_token_manager=manager))
    task = asyncio.create_task(reflex_tokens.keep_alive(app))
    try:
        await asyncio.sleep(0.2)
        assert await manager.redis.exists(reflex_tokens.ALIVE_PREFIX + manager.instance_id)
        ttl = await manager.redis.ttl(reflex_tokens.ALIVE_PREFIX + manager.instance_id)
        assert 0 < ttl <= reflex_tokens.ALIVE_TTL_S
    finally:
        task.cancel()
        await manager.redis.aclose()
    # no Redis token manager (one process): nothing to do
    await asyncio.wait_for(reflex_tokens.keep_alive(SimpleNamespace(event_namespace=None)), 1)
