"""One mic per account across workers: "tab T of user U took the mic", said on Redis.

Why: the hub (``server/hub.py``) keeps the one-mic rule among the tabs of its own
process. With several workers, an account's two tabs can sit on two workers (a second
device, or the balancer hashing two tokens apart), and each worker would let its tab
keep listening: both would hear the person, and both would answer.

How: a worker whose tab claims the mic writes the claim to a key per account
(``voiceclaw_mic_<user id>`` = the tab's token, last writer wins) and publishes it on
one channel. Every worker listens on that channel; on a claim for an account whose mic
one of its own tabs holds, it takes the mic from that tab (the page is told, as within
one worker). A claim that a later one has overtaken (the key names another tab) is
ignored, so two tabs claiming at the same moment end with one mic, the last claim's.

Without Redis (one process, ``make run``) nothing is published: the hub's own rule is
the whole rule. Redis errors are logged and never fail the claim: the person's own
tab keeps working; only the other worker's tab may go on listening until Redis is back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, Awaitable, Callable

log = logging.getLogger("voiceclaw.mic_bus")

CHANNEL = "voiceclaw_mic_claims"
KEY_PREFIX = "voiceclaw_mic_"
#: a claim's key outlives any session (a day), so a stale one never blocks anything
KEY_TTL_S = 24 * 3600
#: how long a claim may wait on Redis before the tab goes on without it
PUBLISH_TIMEOUT_S = 2.0
RETRY_S = 1.0

OnClaim = Callable[[int, str], Awaitable[None]]


class MicBus:
    """Claims out and in over the app's Redis client (``redis.asyncio``)."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self.sender = uuid.uuid4().hex  # this worker: its own claims come back and are skipped
        self.listening = asyncio.Event()

    async def announce(self, user_id: int, tab: str) -> None:
        """This worker's tab ``tab`` took user ``user_id``'s mic: tell the other workers."""
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_S):
                await self.redis.set(f"{KEY_PREFIX}{user_id}", tab, ex=KEY_TTL_S)
                await self.redis.publish(CHANNEL, json.dumps({"user": user_id, "tab": tab, "from": self.sender}))
        except Exception as exc:  # Redis away: this tab still has its mic
            log.warning("could not tell the other workers that a tab took the mic: %s", exc)

    async def follow(self, on_claim: OnClaim) -> None:
        """Call ``on_claim(user_id, tab)`` for each other worker's current claim, until cancelled
        (subscribes again after Redis restarted)."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.listening.set()
                    while True:
                        msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=RETRY_S)
                        if msg is not None:
                            await self._on_message(msg.get("data"), on_claim)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                log.warning("mic claims from other workers are not heard (Redis): %s", exc)
                await asyncio.sleep(RETRY_S)

    async def _on_message(self, data: Any, on_claim: OnClaim) -> None:
        try:
            claim = json.loads(data)
            user_id, tab, sender = int(claim["user"]), str(claim["tab"]), claim.get("from")
        except (TypeError, ValueError, KeyError):
            log.warning("ignored a malformed mic claim on Redis")
            return
        if sender == self.sender:
            return
        current = await self.redis.get(f"{KEY_PREFIX}{user_id}")
        if current is not None and (current.decode() if isinstance(current, bytes) else current) != tab:
            return  # overtaken by a later claim, whose own message follows
        try:
            await on_claim(user_id, tab)
        except Exception:
            log.exception("could not hand over the mic of user %s", user_id)


def redis_of(app: Any) -> Any | None:
    """The app's Redis client (its Reflex token manager's), or None when it runs without Redis."""
    from .reflex_tokens import token_manager

    manager = token_manager(app)
    return manager.redis if manager is not None else None


async def follow_claims(app: Any, hub: Any) -> None:
    """Join ``hub`` to the other workers' mic claims (a start-up task; returns at once
    without Redis)."""
    redis = redis_of(app)
    if redis is None:
        return
    bus = MicBus(redis)
    hub.mic_bus = bus
    await bus.follow(hub.mic_claimed_elsewhere)
