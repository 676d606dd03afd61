"""``SessionHub``: this process's live voice sessions, keyed (user id, tab token).

Created once by the app (``voiceclaw_app.py``) and handed to the ``/ws/voice`` route;
nothing here is a module global. It holds only what a live connection needs:

- a tab that reconnects (reload, network blip) gets its own session back, so a reply
  that was running goes on and the page that comes back sees it;
- a session whose page left is kept while its reply runs, then closed;
- one mic per account: a tab that starts its mic takes it from the account's other
  tab, which is told (``taken_over``); another account's tabs are never touched.

With several workers a tab's socket stays on the worker that accepted it, and so does
its session; the one-mic rule crosses workers through ``mic_bus`` (Redis): a claim here
is announced, and a claim announced by another worker takes the mic from this
worker's tab of that account (:meth:`SessionHub.mic_claimed_elsewhere`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Awaitable, Callable

from ..session.events import SessionEvent
from ..session.ports import ConversationStore, Services
from ..session.session import VoiceSession

if TYPE_CHECKING:
    from .mic_bus import MicBus

log = logging.getLogger("voiceclaw.hub")

Output = Callable[[SessionEvent], Awaitable[None]]
Key = tuple[int, str]


class Connection:
    """One page socket attached to a session: its output and how to close it."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], close: Callable[[int], Awaitable[None]]) -> None:
        self._send = send
        self._close = close
        self.closed = False

    async def __call__(self, event: SessionEvent) -> None:
        msg = event.wire()
        if msg is not None and not self.closed:
            await self._send(msg)

    async def close(self, code: int) -> None:
        self.closed = True
        with contextlib.suppress(Exception):
            await self._close(code)


class SessionHub:
    def __init__(
        self,
        *,
        services: Services,
        store_for: Callable[[int], ConversationStore],
        projection_for: Callable[[str, int], Output] | None = None,
        new_conversation_id: Callable[[], str] | None = None,
    ) -> None:
        self.services = services
        self.store_for = store_for
        self.projection_for = projection_for
        self.new_conversation_id = new_conversation_id
        self._sessions: dict[Key, VoiceSession] = {}
        self._connections: dict[Key, Connection] = {}
        self._mic: dict[int, Key] = {}  # user id -> the tab that has the account's mic
        self._reapers: set[asyncio.Task] = set()
        #: set by ``mic_bus.follow_claims`` when the app runs on Redis (several workers)
        self.mic_bus: MicBus | None = None

    def session(self, user_id: int, tab: str) -> VoiceSession | None:
        return self._sessions.get((user_id, tab))

    def sessions(self) -> list[VoiceSession]:
        return list(self._sessions.values())

    async def connect(self, user_id: int, tab: str, conn: Connection, *, mode: str = "hands_free", conversation_id: str = "", muted: bool = False) -> VoiceSession:
        """A tab's socket said hello: its session (new, or the one it had) with this socket attached."""
        key = (user_id, tab)
        old = self._connections.pop(key, None)
        session = self._sessions.get(key)
        if old is not None and session is not None:
            await session.detach(old)
            await old.close(4002)  # the same tab opened a newer socket: close the old one quietly
        if session is None or session.closed:
            session = VoiceSession(services=self.services, store=self.store_for(user_id), user_id=user_id, tab=tab, mode=mode, conversation_id=conversation_id, muted=muted, new_conversation_id=self.new_conversation_id)
            session.on_mic_claim = self._claim_mic
            if self.projection_for is not None:
                session.subscribe(self.projection_for(tab, user_id))
            self._sessions[key] = session
        else:
            session.set_mode(mode)
            await session.set_context(conversation_id, muted)
        self._connections[key] = conn
        await session.attach(conn)
        return session

    async def disconnect(self, session: VoiceSession, conn: Connection) -> None:
        """The socket closed: detach it; the session ends now, or when its reply is over."""
        key = (session.user_id, session.tab)
        if self._connections.get(key) is not conn:
            return  # replaced by a newer socket of the same tab
        self._connections.pop(key, None)
        await session.detach(conn)
        reply = session.reply
        if reply is not None and reply.task is not None and not reply.task.done():
            task = asyncio.get_running_loop().create_task(self._close_after_reply(session, reply.task))
            self._reapers.add(task)
            task.add_done_callback(self._reapers.discard)
        else:
            await self._drop(session)

    async def _close_after_reply(self, session: VoiceSession, task: asyncio.Task) -> None:
        await asyncio.gather(task, return_exceptions=True)
        if not session.attached:
            await self._drop(session)

    async def _drop(self, session: VoiceSession) -> None:
        key = (session.user_id, session.tab)
        if self._sessions.get(key) is session and not session.attached:
            self._sessions.pop(key, None)
            if self._mic.get(session.user_id) == key:
                self._mic.pop(session.user_id, None)
            await session.close()

    async def _claim_mic(self, session: VoiceSession) -> None:
        key = (session.user_id, session.tab)
        await self._take_mic(session.user_id, key)
        if self.mic_bus is not None:
            await self.mic_bus.announce(session.user_id, session.tab)

    async def mic_claimed_elsewhere(self, user_id: int, tab: str) -> None:
        """Another worker's tab ``tab`` took the account's mic: this worker's tab, if it had it, stops."""
        prev = self._mic.get(user_id)
        if prev is not None and prev[1] != tab:
            self._mic.pop(user_id, None)
            await self._tell_lost(prev, tab)

    async def _take_mic(self, user_id: int, key: Key) -> None:
        prev = self._mic.get(user_id)
        self._mic[user_id] = key
        if prev is not None and prev != key:
            await self._tell_lost(prev, key[1])

    async def _tell_lost(self, prev: Key, new_tab: str) -> None:
        other = self._sessions.get(prev)
        if other is not None and not other.closed:
            log.info("user %s: tab %s… took the mic from tab %s…", prev[0], new_tab[:6], other.tab[:6])
            await other.lose_mic()

    async def aclose(self) -> None:
        for session in list(self._sessions.values()):
            await session.close()
        self._sessions.clear()
        for conn in list(self._connections.values()):
            await conn.close(1001)
        self._connections.clear()

