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

The fix: every worker keeps a short-lived "alive" key for its Reflex instance in
Redis (:func:`keep_alive`); when a tab's token is linked to a socket, a record owned
by an instance that is not alive any more is dropped first, so the tab keeps its
token and its state (and the restart notice of ``restore_after_load`` / the
projection can reach it). A record of a live instance is left to Reflex's own
duplicate-tab rule.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("voiceclaw.tokens")

ALIVE_PREFIX = "voiceclaw_alive_instance_"
#: how long an instance counts as alive after its last beat, and how often it beats
ALIVE_TTL_S = 10
BEAT_S = 3.0


def _token_manager(app: Any):
    from reflex.utils.token_manager import RedisTokenManager

    namespace = getattr(app, "event_namespace", None)
    manager = getattr(namespace, "_token_manager", None)
    return manager if isinstance(manager, RedisTokenManager) else None


def install(app: Any) -> bool:
    """Wrap the app's Redis token manager's ``link_token_to_sid`` (no-op without Redis)."""
    manager = _token_manager(app)
    if manager is None or getattr(manager, "_voiceclaw_wrapped", False):
        return False
    original = manager.link_token_to_sid

    async def link_token_to_sid(token: str, sid: str) -> str | None:
        await drop_if_orphaned(manager, token)
        return await original(token, sid)

    manager.link_token_to_sid = link_token_to_sid
    manager._voiceclaw_wrapped = True
    return True


async def drop_if_orphaned(manager: Any, token: str) -> bool:
    """Delete ``token``'s socket record when the instance that owns it is gone."""
    local = manager.token_to_socket.get(token)
    if local is not None and local.instance_id == manager.instance_id:
        return False  # ours: Reflex handles its own reconnects
    try:
        owner = await manager._get_token_owner(token, refresh=True)
        if owner is None or owner == manager.instance_id or await manager.redis.exists(ALIVE_PREFIX + owner):
            return False
        await manager.redis.delete(manager._get_redis_key(token))
    except Exception:  # Redis away: Reflex's own path reports it
        log.exception("could not check the owner of a tab's token")
        return False
    manager.token_to_socket.pop(token, None)
    log.info("tab %s…: its worker %s… is gone, the tab keeps its token", token[:8], owner[:8])
    return True


async def keep_alive(app: Any) -> None:
    """Beat this worker's "alive" key until cancelled (returns at once without Redis).

    The instance id is read at each beat: Reflex gives the event processor a fresh
    one when it starts."""
    manager = _token_manager(app)
    if manager is None:
        return
    install(app)
    while True:
        try:
            await manager.redis.set(ALIVE_PREFIX + manager.instance_id, b"1", ex=ALIVE_TTL_S)
        except Exception as exc:  # Redis restarting: beat again shortly
            log.warning("could not mark this worker alive in Redis: %s", exc)
        await asyncio.sleep(BEAT_S)
