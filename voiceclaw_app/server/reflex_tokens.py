"""A tab whose worker died keeps its Reflex token instead of getting a new, empty one.

Why: with Redis, Reflex 0.10's ``RedisTokenManager`` records for each tab token which
worker instance holds its socket (``token_manager_socket_record_<token>``, kept for
``redis_token_expiration``, an hour by default), and a worker deletes its records when
a socket closes. A worker that is SIGKILLed deletes nothing. When its tabs reconnect
(to another worker, or to the restarted one), their tokens still "exist", Reflex
takes each tab for a duplicate of itself and hands it a new token: a new, empty state
(no messages, status "idle", no notice), while the tab's voice session, keyed on the
old token, goes on writing into a state no page shows. Found by the cluster test
``test_worker_sigkilled_mid_reply``.

The fix: every worker holds a Redis connection subscribed to a channel named after
its Reflex instance (:func:`keep_alive`); when a tab's token is linked to a socket, a
record owned by an instance whose channel has no subscriber is dropped first, so the
tab keeps its token and its state (and the projection's restart notice reaches it).
Why a subscription and not a key with a time to live: a killed process's connection
closes at once, so its tabs, which reconnect within a second, already find it gone;
a key would outlive it by its TTL. A record of a live instance is left to Reflex's
own duplicate-tab rule.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("voiceclaw.tokens")

ALIVE_PREFIX = "voiceclaw_alive_instance_"
#: how often the subscription checks that it follows the current instance id (and
#: how soon it comes back after Redis restarted)
CHECK_S = 1.0


def token_manager(app: Any):
    """The app's Reflex ``RedisTokenManager``, or None when it runs without Redis."""
    from reflex.utils.token_manager import RedisTokenManager

    namespace = getattr(app, "event_namespace", None)
    manager = getattr(namespace, "_token_manager", None)
    return manager if isinstance(manager, RedisTokenManager) else None


def install(app: Any) -> bool:
    """Wrap the app's Redis token manager's ``link_token_to_sid`` (no-op without Redis)."""
    manager = token_manager(app)
    if manager is None or getattr(manager, "_voiceclaw_wrapped", False):
        return False
    original = manager.link_token_to_sid

    async def link_token_to_sid(token: str, sid: str) -> str | None:
        await drop_if_orphaned(manager, token)
        return await original(token, sid)

    manager.link_token_to_sid = link_token_to_sid
    manager._voiceclaw_wrapped = True
    log.debug("Reflex token manager wrapped: a crashed worker's tabs keep their tokens")
    return True


async def drop_if_orphaned(manager: Any, token: str) -> bool:
    """Delete ``token``'s socket record when the instance that owns it is gone."""
    local = manager.token_to_socket.get(token)
    if local is not None and local.instance_id == manager.instance_id:
        return False  # ours: Reflex handles its own reconnects
    try:
        owner = await manager._get_token_owner(token, refresh=True)
        if owner is None or owner == manager.instance_id or await is_alive(manager, owner):
            return False
        await manager.redis.delete(manager._get_redis_key(token))
    except Exception:  # Redis away: Reflex's own path reports it
        log.exception("could not check the owner of a tab's token")
        return False
    manager.token_to_socket.pop(token, None)
    log.info("tab %s…: its worker %s… is gone, the tab keeps its token", token[:8], owner[:8])
    return True


async def is_alive(manager: Any, instance_id: str) -> bool:
    """Does a worker hold ``instance_id``'s channel (see :func:`keep_alive`)?"""
    counts = await manager.redis.pubsub_numsub(ALIVE_PREFIX + instance_id)
    return any(n > 0 for _, n in counts)


async def keep_alive(app: Any) -> None:
    """Hold this worker's "alive" subscription until cancelled (returns at once
    without Redis).

    Reflex gives the event processor a fresh instance id when it starts, so the
    channel follows ``instance_id``; after Redis restarted it subscribes again."""
    manager = token_manager(app)
    if manager is None:
        return
    while True:
        try:
            async with manager.redis.pubsub() as pubsub:
                current = manager.instance_id
                await pubsub.subscribe(ALIVE_PREFIX + current)
                log.debug("this worker is alive in Redis as %s…", current[:8])
                while manager.instance_id == current:
                    await pubsub.get_message(timeout=CHECK_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis restarting: subscribe again shortly
            log.warning("could not mark this worker alive in Redis: %s", exc)
            await asyncio.sleep(CHECK_S)
