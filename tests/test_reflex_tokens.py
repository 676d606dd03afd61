"""A tab whose worker died keeps its Reflex token (server/reflex_tokens.py), against a
real redis-server and Reflex's own RedisTokenManager: two "workers" are two managers
with their own instance ids on one Redis (the ``redis_url`` fixture of conftest)."""

from __future__ import annotations

import asyncio
import shutil
from types import SimpleNamespace

import pytest

from voiceclaw_app.server import reflex_tokens

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed (make test installs it)")


def _worker(url: str):
    """One worker's token manager, wrapped as the app wraps it."""
    import redis.asyncio as aioredis
    from reflex.utils.token_manager import RedisTokenManager

    manager = RedisTokenManager(aioredis.from_url(url))
    app = SimpleNamespace(event_namespace=SimpleNamespace(_token_manager=manager))
    assert reflex_tokens.install(app) and not reflex_tokens.install(app)  # once
    return manager


async def _alive(manager) -> asyncio.Task:
    """Run the worker's keep-alive subscription (as its start-up does) until it holds."""
    task = asyncio.create_task(reflex_tokens.keep_alive(SimpleNamespace(event_namespace=SimpleNamespace(_token_manager=manager))))
    for _ in range(100):
        if await reflex_tokens.is_alive(manager, manager.instance_id):
            return task
        await asyncio.sleep(0.02)
    raise AssertionError("keep_alive never subscribed")


async def test_a_dead_workers_tab_keeps_its_token_a_live_duplicate_does_not(redis_url):
    dead, live, other = _worker(redis_url), _worker(redis_url), _worker(redis_url)
    beats = [await _alive(live), await _alive(other)]
    # worker "dead" held tab A's socket and was killed (no subscription, its record left behind)
    assert await dead.link_token_to_sid("tab-a", "sid-1") is None
    assert await other.redis.exists(dead._get_redis_key("tab-a"))
    await dead.close()  # killed: its tasks (which would re-store its record) and its connections end
    # tab A reconnects to another worker: same token, so the same state
    assert await other.link_token_to_sid("tab-a", "sid-2") is None
    assert await other._get_token_owner("tab-a", refresh=True) == other.instance_id
    # a copy of a tab whose worker is alive is still a duplicate (Reflex's rule)
    assert await live.link_token_to_sid("tab-b", "sid-3") is None
    fresh = await other.link_token_to_sid("tab-b", "sid-4")
    assert fresh and fresh != "tab-b"
    # the worker's own reconnect is Reflex's fast path, untouched
    assert await other.link_token_to_sid("tab-a", "sid-2") is None
    for task in beats:
        task.cancel()
    await asyncio.gather(*beats, return_exceptions=True)
    for m in (live, other):
        await m.close()


async def test_alive_follows_the_instance_id_and_ends_with_the_worker(redis_url):
    manager = _worker(redis_url)
    task = await _alive(manager)
    first = manager.instance_id
    manager._reset_instance_id()  # what Reflex does when its event processor starts
    for _ in range(150):
        if await reflex_tokens.is_alive(manager, manager.instance_id) and not await reflex_tokens.is_alive(manager, first):
            break
        await asyncio.sleep(0.02)
    assert await reflex_tokens.is_alive(manager, manager.instance_id) and not await reflex_tokens.is_alive(manager, first)
    task.cancel()  # the worker is gone: its connection closes, so does its channel
    await asyncio.gather(task, return_exceptions=True)
    for _ in range(50):
        if not await reflex_tokens.is_alive(manager, manager.instance_id):
            break
        await asyncio.sleep(0.02)
    assert not await reflex_tokens.is_alive(manager, manager.instance_id)
    await manager.redis.aclose()
    # no Redis token manager (one process): nothing to do
    await asyncio.wait_for(reflex_tokens.keep_alive(SimpleNamespace(event_namespace=None)), 1)
