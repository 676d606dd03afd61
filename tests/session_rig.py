"""A voice session as the app builds it, without a browser: the real VoiceSession over
the real DbConversationStore (a test database), the app's services module (its runner
swapped for a FakeRunner by the ``env`` fixture), the real Projection writing into an
in-memory sink, and a stand-in for the page's socket that records what it was sent."""

from __future__ import annotations

from voiceclaw_app.server.persistence import DbConversationStore
from voiceclaw_app.session.events import SessionEvent
from voiceclaw_app.session.reply import ReplyHandle
from voiceclaw_app.session.session import VoiceSession
from voiceclaw_app.states.projection import Projection


class WireRecorder:
    """The page's socket: the wire messages the session sent it."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    async def __call__(self, event: SessionEvent) -> None:
        msg = event.wire()
        if msg is not None:
            self.sent.append(msg)

    def types(self) -> list[str]:
        return [m.get("type") for m in self.sent]


async def make_session(sink, token: str, *, mode: str = "hands_free", attached: bool = True, user_id: int = 1, **kw) -> tuple[VoiceSession, WireRecorder, Projection]:
    from voiceclaw_app.states import services

    session = VoiceSession(services=services, store=DbConversationStore(user_id), user_id=user_id, tab=token, mode=mode, **kw)
    projection = Projection(sink, token, user_id)
    session.subscribe(projection)
    wire = WireRecorder()
    if attached:
        await session.attach(wire)
    return session, wire, projection


def speaking_reply(session: VoiceSession, *, started_ago_ms: float = 1000.0, done: bool = False) -> ReplyHandle:
    """A reply the page is playing (started ``started_ago_ms`` ago)."""
    from voiceclaw_app.pipeline.timing import now_ms

    r = ReplyHandle(conversation_id="c", speak=True, turn_id="t-speaking")
    r.ledger.playing = True
    r.ledger.started_ms = now_ms() - started_ago_ms
    r.done = done
    session.reply = r
    return r
