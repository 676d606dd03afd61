"""The voice session's decisions (barge-in, listener lifecycle, playback reports) and
the ``/ws/voice`` hello, against the real VoiceSession and SessionHub.

A fake listener (a real ``Listener`` subclass) and the in-memory sink of
test_states; the socket is a small in-memory stand-in for Starlette's WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json

import pytest

from voiceclaw_app.pipeline.timing import TurnMarks, now_ms
from voiceclaw_app.providers.base import EngineUnavailable, Listener, SpeechDiscarded, SpeechStarted, queued_events

from .session_rig import make_session, speaking_reply
from .test_states import FakeRunner, FakeSink, env  # noqa: F401  (env is a fixture)

TOKEN = "tok-voice-0001"


class FakeWS:
    """Enough of starlette's WebSocket for ws_voice: scripted input, recorded output."""

    def __init__(self, incoming: list[dict] | None = None, headers: dict | None = None):
        self.sent: list[dict] = []
        self.closed_with: int | None = None
        self.incoming = list(incoming or [])
        self.headers = headers or {}
        self.client = None

    async def accept(self):
        pass

    async def receive_text(self):
        return self.incoming.pop(0)["text"]

    async def receive(self):
        if self.incoming:
            return self.incoming.pop(0)
        return {"type": "websocket.disconnect"}

    async def send_text(self, text):
        self.sent.append(json.loads(text))

    async def close(self, code=1000):
        self.closed_with = code

    def types(self) -> list[str]:
        return [m.get("type") for m in self.sent]


class FakeListener(Listener):
    def __init__(self, fail_push: Exception | None = None):
        self.q: asyncio.Queue = asyncio.Queue()
        self._end = object()
        self.pushed = 0
        self.fail_push = fail_push
        self.modes: list[bool] = []
        self.closed = False
        self.frames: list[float] = []

    async def push(self, pcm16, t_ms):
        if self.fail_push is not None:
            raise self.fail_push
        self.pushed += 1
        self.frames.append(t_ms)
        await asyncio.sleep(0.002)  # like the real listeners: the VAD runs off the loop

    def events(self):
        return queued_events(self.q, self._end)

    def set_hands_free(self, hands_free):
        super().set_hands_free(hands_free)
        self.modes.append(hands_free)

    async def aclose(self):
        self.closed = True
        self.q.put_nowait(self._end)


@pytest.fixture()
def voice(env, monkeypatch):  # noqa: F811
    from voiceclaw_app.states import services

    built: list[FakeListener] = []
    holder = {"fail_push": None}

    async def fake_build_listener(settings):
        lst = FakeListener(fail_push=holder["fail_push"])
        built.append(lst)
        return lst

    monkeypatch.setattr(services, "build_listener", fake_build_listener)
    yield env[0], built, holder


# ---------------------------------------------------------------- pause / resume / barge-in
async def test_tentative_onset_pauses_and_a_discard_resumes_without_cancelling(voice):
    sink, _, _ = voice
    session, ws, _ = await make_session(sink, TOKEN)
    turn = speaking_reply(session)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    assert ws.types() == ["pause"]
    assert not turn.cancel.cancelled and not turn.interrupted
    # a second tentative onset does not pause twice
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    assert ws.types() == ["pause"]
    await session._on_listen_event(SpeechDiscarded(t_ms=now_ms()))
    assert ws.types() == ["pause", "resume"]
    assert not turn.cancel.cancelled and not turn.interrupted
    # a discard with no pause outstanding sends nothing
    await session._on_listen_event(SpeechDiscarded(t_ms=now_ms()))
    assert ws.types() == ["pause", "resume"]
    await session.close()


async def test_confirmed_speech_after_a_pause_barges_in(voice):
    sink, _, _ = voice
    session, ws, _ = await make_session(sink, TOKEN)
    turn = speaking_reply(session)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=False))
    assert ws.types() == ["pause", "barge_in"]
    # the command names the cut turn: the page must not start its audio if the
    # chunk URLs (Reflex socket) arrive after the command (this socket)
    assert ws.sent[-1]["turn"] == turn.turn_id and turn.turn_id
    assert turn.cancel.cancelled and turn.interrupted
    assert not session.barge.paused
    await session.close()


async def test_confirmed_speech_while_speaking_barges_in_even_without_a_pause(voice):
    sink, _, _ = voice
    session, ws, _ = await make_session(sink, TOKEN)
    turn = speaking_reply(session)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms()))
    assert ws.types() == ["barge_in"]
    assert turn.interrupted


async def test_echo_guard_and_silence_keep_playback_going(voice):
    sink, _, _ = voice
    session, ws, _ = await make_session(sink, TOKEN)
    # nothing is speaking: no pause, no barge-in
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await session._on_listen_event(SpeechStarted(t_ms=now_ms()))
    assert ws.types() == []
    # within the first 300 ms of playback: our own voice, ignored
    turn = speaking_reply(session, started_ago_ms=50.0)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await session._on_listen_event(SpeechStarted(t_ms=now_ms()))
    assert ws.types() == []
    assert not turn.interrupted


async def test_an_unresolved_pause_resumes_by_itself(voice):
    sink, _, _ = voice
    session, ws, _ = await make_session(sink, TOKEN)
    session.barge.pause_timeout_s = 0.05
    speaking_reply(session)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await asyncio.sleep(0.2)
    assert ws.types() == ["pause", "resume"]


async def test_button_barge_in_control_cancels_a_speaking_turn(voice):
    sink, _, _ = voice
    session, ws, _ = await make_session(sink, TOKEN)
    turn = speaking_reply(session)
    await session.on_control({"type": "barge_in"})
    assert ws.types() == ["barge_in"] and turn.interrupted


# ---------------------------------------------------------------- listener mode and failures
async def test_listener_gets_the_input_mode_when_built_and_on_every_change(voice):
    sink, built, _ = voice
    session, ws, _ = await make_session(sink, TOKEN, mode="push_to_talk")
    await session.ensure_listener()
    assert built and built[0].modes == [False]
    await session.on_control({"type": "mode", "mode": "hands_free"})
    assert built[0].modes[-1] is True and built[0].hands_free
    await session.on_control({"type": "mode", "mode": "nonsense"})
    assert built[0].modes[-1] is True
    await session.on_control({"type": "ptt_start"})
    assert built[0].modes[-1] is False and session.mode == "push_to_talk"
    await session.close()


async def test_a_provider_error_on_push_is_reported_and_the_socket_survives(voice):
    sink, built, holder = voice
    holder["fail_push"] = EngineUnavailable("The speech model files are missing: run make setup.")
    session, ws, _ = await make_session(sink, TOKEN)
    frame = b"\x00\x01" * 320
    await session.push_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    for _ in range(20):  # frames right after the failure do not rebuild the listener
        await session.push_audio(frame)
    assert len(built) == 1
    assert built[0].closed
    assert [m for m in ws.sent if m["type"] == "error"] == [{"type": "error", "message": "The speech model files are missing: run make setup."}]
    assert sink.chat.error == "The speech model files are missing: run make setup." and sink.chat.session_status == "error"
    assert not session.closed
    # the user presses stop / the button again: listening is retried
    holder["fail_push"] = None
    await session.on_control({"type": "stop"})
    await session.push_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    await session.push_audio(frame)
    assert len(built) == 2 and built[1].pushed == 2
    assert sink.chat.session_status == "listening"
    await session.close()


async def test_a_listener_that_ends_by_itself_is_rebuilt_on_the_next_frame(voice):
    """A cloud session that failed with fallback off ends its events: the mic must not go dead."""
    sink, built, _ = voice
    session, _, _ = await make_session(sink, TOKEN)
    frame = b"\x00\x01" * 320
    await session.push_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    assert len(built) == 1 and built[0].pushed == 1
    built[0].q.put_nowait(built[0]._end)  # the listener's events end
    for _ in range(100):
        if session.listener is None:
            break
        await asyncio.sleep(0.01)
    assert session.listener is None and built[0].closed
    await session.push_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    await session.push_audio(frame)
    assert len(built) == 2 and built[1].pushed == 2
    await session.close()


async def test_frames_said_while_the_listener_starts_reach_it_in_order(voice, monkeypatch):
    """The user's first words are buffered while the listener starts; live frames that
    arrive during the replay must queue behind them, not overtake them."""
    sink, built, _ = voice
    from voiceclaw_app.session import session as session_mod
    from voiceclaw_app.states import services

    real_build = services.build_listener

    async def slow_build(settings):
        await asyncio.sleep(0.05)
        return await real_build(settings)

    monkeypatch.setattr(services, "build_listener", slow_build)
    session, _, _ = await make_session(sink, TOKEN)
    frame = b"\x00\x01" * 320

    times = itertools.count()
    monkeypatch.setattr(session_mod, "now_ms", lambda: float(next(times)))
    session.rate_guard.rate = 1e9  # the fake clock ticks 1 ms per frame: faster than real time
    for _ in range(30):  # buffered while the listener is built
        await session.push_audio(frame)
    starting = session._starting
    # live frames keep coming while the buffer is replayed
    while not starting.done():  # (real frames come every 20 ms; a replayed push takes ~2 ms here)
        await session.push_audio(frame)
        await asyncio.sleep(0.01)
    for _ in range(5):
        await session.push_audio(frame)
    got = built[0].frames
    assert len(got) >= 35
    assert got == sorted(got), "frames reached the listener out of order"
    await session.close()


async def test_stop_while_the_listener_starts_does_not_bring_it_back(voice, monkeypatch):
    sink, built, _ = voice
    from voiceclaw_app.states import services

    real_build = services.build_listener
    gate = asyncio.Event()

    async def slow_build(settings):
        await gate.wait()
        return await real_build(settings)

    monkeypatch.setattr(services, "build_listener", slow_build)
    session, _, _ = await make_session(sink, TOKEN)
    await session.push_audio(b"\x00\x01" * 320)
    starting = session._starting
    await asyncio.sleep(0.01)
    await session.on_control({"type": "stop"})
    gate.set()
    await asyncio.gather(starting, return_exceptions=True)
    await asyncio.sleep(0.01)
    assert session.listener is None
    assert all(lst.closed for lst in built)  # none built, or closed at once
    await session.close()


async def test_a_barge_in_prepares_the_next_request_again_and_a_cough_in_silence_keeps_it(voice):
    """The request prepared at a voice onset while the assistant speaks lacks the reply
    it interrupts: a barge-in drops it and the next preparation runs after the cut."""
    from voiceclaw_app.pipeline.preemptive import TurnStarter

    sink, _, _ = voice
    session, _, _ = await make_session(sink, TOKEN)
    calls: list[float] = []

    async def prepare():
        calls.append(now_ms())
        await asyncio.sleep(3600)  # never needed here

    session.starter = TurnStarter(prepare)
    turn = speaking_reply(session)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await asyncio.sleep(0.01)
    assert len(calls) == 1
    first = session.starter._prepared
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=False))
    await asyncio.sleep(0.01)
    assert turn.interrupted
    assert first.cancelled() or first.cancelling()
    assert len(calls) == 2, "the confirmed start must prepare a fresh request"
    # a cough in silence (no reply playing): the prepared request stays
    session.reply = None
    kept = session.starter._prepared
    await session._on_listen_event(SpeechDiscarded(t_ms=now_ms()))
    assert session.starter._prepared is kept and not kept.done()
    await session.starter.aclose()
    await session.close()


# ---------------------------------------------------------------- hello
def _endpoint():
    from voiceclaw_app.server.hub import SessionHub
    from voiceclaw_app.server.persistence import DbConversationStore
    from voiceclaw_app.server.ws_voice import make_ws_voice
    from voiceclaw_app.states import services

    hub = SessionHub(services=services, store_for=DbConversationStore)
    return hub, make_ws_voice(hub, authenticate=_person_one, origin_allowed=_any_origin)


async def _person_one(headers, client_host):
    """The logged-in user of these sockets (the login itself: test_auth.py, e2e/test_access.py)."""
    from voiceclaw_app.server.auth import AuthUser

    return AuthUser(id=1, name="person-one", is_admin=False)


def _any_origin(headers) -> bool:
    return True


@pytest.mark.parametrize("rate", ["abc", {"x": 1}, [16000], 44100, "nan", True])
async def test_bad_sample_rates_are_refused_without_crashing(voice, rate):
    _, ws_voice = _endpoint()
    ws = FakeWS([{"text": json.dumps({"type": "hello", "client_token": TOKEN, "sample_rate": rate})}])
    await ws_voice(ws)
    assert ws.closed_with == 4000
    assert ws.types() == ["error"]


@pytest.mark.parametrize("rate", [16000, "16000", 16000.0, None])
async def test_good_sample_rates_are_accepted(voice, rate):
    _, ws_voice = _endpoint()
    hello = {"type": "hello", "client_token": TOKEN}
    if rate is not None:
        hello["sample_rate"] = rate
    ws = FakeWS([{"text": json.dumps(hello)}])
    await ws_voice(ws)
    assert ws.types()[0] == "ready" and ws.closed_with is None


async def test_the_injected_authenticate_and_origin_check_refuse_the_socket(voice):
    from voiceclaw_app.server.ws_voice import make_ws_voice

    hub, _ = _endpoint()

    async def nobody(headers, host):
        return None

    ws = FakeWS([{"text": json.dumps({"type": "hello", "client_token": TOKEN})}])
    await make_ws_voice(hub, authenticate=nobody, origin_allowed=_any_origin)(ws)
    assert ws.closed_with == 4003 and ws.sent[0]["code"] == "login"
    ws = FakeWS([{"text": json.dumps({"type": "hello", "client_token": TOKEN})}], headers={"origin": "https://evil.example"})
    await make_ws_voice(hub, authenticate=_person_one, origin_allowed=lambda h: h.get("origin") != "https://evil.example")(ws)
    assert ws.closed_with == 4003 and ws.sent[0]["code"] == "origin"
    assert hub.sessions() == []


# ---------------------------------------------------------------- several tabs, several people
class _Conn:
    def __init__(self):
        self.sent: list[dict] = []
        self.closed_with = None

    async def __call__(self, event):
        msg = event.wire()
        if msg is not None:
            self.sent.append(msg)

    async def close(self, code):
        self.closed_with = code

    def types(self):
        return [m["type"] for m in self.sent]


async def test_a_reload_of_the_same_tab_is_not_a_takeover_and_keeps_its_session(voice):
    hub, _ = _endpoint()
    old = _Conn()
    first = await hub.connect(1, TOKEN, old)
    new = _Conn()
    again = await hub.connect(1, TOKEN, new)
    assert again is first, "the tab gets its own session back"
    assert old.closed_with == 4002 and "taken_over" not in old.types()
    await hub.aclose()


async def test_one_mic_per_account_and_another_account_is_never_touched(voice):
    hub, _ = _endpoint()
    a1, a2, b1 = _Conn(), _Conn(), _Conn()
    s_a1 = await hub.connect(1, "tok-user1-tab1", a1)
    s_a2 = await hub.connect(1, "tok-user1-tab2", a2)
    s_b1 = await hub.connect(2, "tok-user2-tab1", b1)
    await s_a1.on_control({"type": "mic", "on": True})
    await s_b1.on_control({"type": "mic", "on": True})
    assert "taken_over" not in a1.types() + a2.types() + b1.types(), "one mic per account, not per server"
    # the same account's second tab starts its mic: the first is told and stops
    await s_a2.on_control({"type": "mic", "on": True})
    assert "taken_over" in a1.types() and not s_a1.mic_on and s_a1.mic_lost
    assert "taken_over" not in b1.types() and s_b1.mic_on
    await s_a1.push_audio(b"\x00\x01" * 320)  # a frame still in flight from the old tab: dropped
    assert s_a1.samples == 0
    # the first tab takes it back (push-to-talk press)
    await s_a1.on_control({"type": "ptt_start"})
    assert "taken_over" in a2.types() and not s_a2.mic_on
    assert b1.types().count("taken_over") == 0
    await hub.aclose()


async def test_one_mic_per_account_across_workers_through_redis(voice, redis_url):
    """Two workers (two hubs, each with its mic bus on one real redis-server): the
    account's tab on worker B takes the mic from its tab on worker A, and back; another
    account's tab is untouched; an overtaken claim does not take the mic."""
    import redis.asyncio as aioredis

    from voiceclaw_app.server.mic_bus import MicBus

    hubs, buses, follows = [], [], []
    for _ in range(2):
        hub, _ = _endpoint()
        bus = MicBus(aioredis.from_url(redis_url))
        hub.mic_bus = bus
        follows.append(asyncio.create_task(bus.follow(hub.mic_claimed_elsewhere)))
        hubs.append(hub)
        buses.append(bus)
    try:
        for bus in buses:
            await asyncio.wait_for(bus.listening.wait(), 5)
        a1, a2, b1 = _Conn(), _Conn(), _Conn()
        s_a1 = await hubs[0].connect(1, "tok-user1-workerA", a1)
        s_b1 = await hubs[0].connect(2, "tok-user2-workerA", b1)
        s_a2 = await hubs[1].connect(1, "tok-user1-workerB", a2)
        await s_a1.on_control({"type": "mic", "on": True})
        await s_b1.on_control({"type": "mic", "on": True})
        await asyncio.sleep(0.3)
        assert s_a1.mic_on and "taken_over" not in a1.types()
        await s_a2.on_control({"type": "mic", "on": True})  # the same account, on the other worker

        async def until(cond):
            for _ in range(100):
                if cond():
                    return True
                await asyncio.sleep(0.02)
            return cond()

        assert await until(lambda: "taken_over" in a1.types()), "worker A's tab kept the mic"
        assert not s_a1.mic_on and s_a1.mic_lost and s_a2.mic_on
        assert "taken_over" not in b1.types() and s_b1.mic_on, "another account is never touched"
        # worker A's tab takes it back (push-to-talk press)
        await s_a1.on_control({"type": "ptt_start"})
        assert await until(lambda: "taken_over" in a2.types()), "worker B's tab kept the mic"
        assert not s_a2.mic_on and s_a1.mic_on
        # a claim that a later one overtook (the key names another tab) takes nothing
        n = a1.types().count("taken_over")
        await buses[1].redis.publish("voiceclaw_mic_claims", json.dumps({"user": 1, "tab": "tok-user1-workerB", "from": "a-third-worker"}))
        await asyncio.sleep(0.3)
        assert a1.types().count("taken_over") == n and s_a1.mic_on
    finally:
        for task in follows:
            task.cancel()
        await asyncio.gather(*follows, return_exceptions=True)
        for hub, bus in zip(hubs, buses):
            await hub.aclose()
            await bus.redis.aclose()


async def test_two_people_at_once_each_get_only_their_own_reply(env):  # noqa: F811
    """Two users' sessions run typed turns at the same time: each page's state gets its
    own reply's text and audio, nothing of the other's."""
    from voiceclaw_app.server.hub import SessionHub
    from voiceclaw_app.server.persistence import DbConversationStore
    from voiceclaw_app.states import services
    from voiceclaw_app.states.projection import Projection

    _, holder, repo = env
    sinks = {"tok-person-one": FakeSink(), "tok-person-two": FakeSink()}
    hub = SessionHub(services=services, store_for=DbConversationStore, projection_for=lambda tab, user: Projection(sinks[tab], tab, user))
    holder["runner"] = FakeRunner([f" t{i}" for i in range(60)], [("p1p1p1p1p1", "One."), ("p2p2p2p2p2", "Two.")], token_delay=0.005)
    one = await hub.connect(1, "tok-person-one", _Conn())
    two = await hub.connect(2, "tok-person-two", _Conn())
    r1, r2 = await one.say("first person asks"), await two.say("second person asks")
    await asyncio.gather(r1.task, r2.task)
    c1, c2 = sinks["tok-person-one"].chat, sinks["tok-person-two"].chat
    assert c1.conversation_id != c2.conversation_id
    assert [m["content"] for m in c1.messages if m["role"] == "user"] == ["first person asks"]
    assert [m["content"] for m in c2.messages if m["role"] == "user"] == ["second person asks"]
    assert sinks["tok-person-one"].stream.audio_turn == r1.turn_id and sinks["tok-person-two"].stream.audio_turn == r2.turn_id
    assert [m["role"] for m in repo.list_messages(1, c1.conversation_id)] == ["user", "assistant"]
    await hub.aclose()


# ---------------------------------------------------------------- playback reports
async def _finished_turn(env, chunks, tokens=None, conv=""):
    sink, holder, repo = env
    session, ws, _ = await make_session(sink, TOKEN, conversation_id=conv)
    holder["runner"] = FakeRunner(tokens or [t + " " for _, t in chunks], chunks)
    turn = await session.start_reply("hello", speak=True, spoken_input=True, marks=TurnMarks(speech_end=now_ms() - 500, stt_final=now_ms() - 400))
    await turn.task
    return session, turn


def _report(session, kind, turn_id, **kw):
    return session.on_playback({"event": kind, "turn": turn_id, **kw})


async def test_only_the_first_first_playing_report_counts(env):  # noqa: F811
    sink, holder, repo = env
    session, turn = await _finished_turn(env, [("f1f1f1f1f1", "One."), ("f2f2f2f2f2", "Two.")])
    origin = turn.marks.origin()
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=origin + 900.0)
    for _ in range(250):  # the write runs in an executor thread
        first = repo.timings_for(1, turn.conversation_id)[0]["first_audio_playing"]
        if first is not None:
            break
        await asyncio.sleep(0.02)
    assert first == pytest.approx(900.0, abs=0.2)
    # a replay of the same URLs (a remounted queue) reports again: ignored, while current and after
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=origin + 60000.0)
    session.reply = None
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=origin + 90000.0)
    await asyncio.sleep(0.5)  # (a write, had one been scheduled, would land by now)
    assert repo.timings_for(1, turn.conversation_id)[0]["first_audio_playing"] == first
    assert turn.marks.first_audio_playing == origin + 900.0


async def test_a_stop_after_the_reply_was_heard_does_not_cut_it(env):  # noqa: F811
    sink, holder, repo = env
    session, turn = await _finished_turn(env, [("h1h1h1h1h1", "One."), ("h2h2h2h2h2", "Two.")])
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=now_ms())
    await _report(session, "chunk", turn.turn_id, index=1)
    await _report(session, "ended", turn.turn_id, played=2)
    assert not session.replying()
    # the same turn replayed and stopped after one chunk
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=now_ms())
    await _report(session, "stopped", turn.turn_id, played=1)
    await asyncio.sleep(0.1)
    msg = repo.list_messages(1, turn.conversation_id)[-1]
    assert msg["content"] == "One. Two." and not msg["interrupted"]
    assert not session.replying()


async def test_a_stop_during_playback_after_synthesis_cuts_to_played_chunks(env):  # noqa: F811
    sink, holder, repo = env
    session, turn = await _finished_turn(env, [("p1p1p1p1p1", "One."), ("p2p2p2p2p2", "Two."), ("p3p3p3p3p3", "Three.")])
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=now_ms())
    assert session.replying()
    await _report(session, "stopped", turn.turn_id, played=1)
    for _ in range(50):
        msg = repo.list_messages(1, turn.conversation_id)[-1]
        if msg["interrupted"]:
            break
        await asyncio.sleep(0.02)
    assert msg["content"] == "One." and msg["interrupted"]
    assert msg["audio_ids"] == ["p1p1p1p1p1"]


async def test_chunk_reports_set_playing_again_after_a_drain(env):  # noqa: F811
    sink, holder, repo = env
    session, _, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner(["One. ", "Two."], [("d1d1d1d1d1", "One."), ("d2d2d2d2d2", "Two.")], chunk_delay=0.3)
    turn = await session.start_reply("count", speak=True, spoken_input=True)
    while not turn.ledger.chunks:
        await asyncio.sleep(0.01)
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=now_ms())
    assert turn.ledger.playing
    # an old queue drained before the next chunk came: "ended" mid-reply
    await _report(session, "ended", turn.turn_id, played=1)
    assert not turn.ledger.playing and not turn.ledger.over
    await _report(session, "chunk", turn.turn_id, index=1)
    assert turn.ledger.playing and turn.ledger.played == 2
    await turn.task
    assert session.replying()  # the browser still plays the last chunk
    assert sink.stream.audio_done
    assert sink.chat.session_status == "speaking"
    await _report(session, "ended", turn.turn_id, played=2)
    assert sink.chat.session_status == "idle" and sink.stream.audio_urls == []


async def _interrupted_after_the_first_chunk(env, ids: tuple[str, str, str]):  # noqa: F811
    """A three-chunk reply: the first chunk starts playing, then a barge-in."""
    sink, holder, repo = env
    session, _, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], list(zip(ids, ["One.", "Two.", "Three."])), chunk_delay=0.05)
    turn = await session.start_reply("count", speak=True, spoken_input=True)
    while len(turn.ledger.chunks) < 2:
        await asyncio.sleep(0.01)
    await _report(session, "first_playing", turn.turn_id, index=0, server_ms=now_ms())
    await session.on_control({"type": "barge_in"})
    assert turn.interrupted
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task
    return session, turn


async def test_an_interrupted_reply_keeps_only_the_audio_that_played(env):  # noqa: F811
    sink, holder, repo = env
    session, turn = await _interrupted_after_the_first_chunk(env, ("i1i1i1i1i1", "i2i2i2i2i2", "i3i3i3i3i3"))
    msg = repo.list_messages(1, turn.conversation_id)[-1]
    assert msg["content"] == "One." and msg["interrupted"]
    assert msg["audio_ids"] == ["i1i1i1i1i1"]
    assert sink.chat.last_audio_ids == ["i1i1i1i1i1"]


async def test_a_cancelled_turn_does_not_append_to_another_conversation(env):  # noqa: F811
    sink, holder, repo = env
    session, _, _ = await make_session(sink, TOKEN, muted=True)
    holder["runner"] = FakeRunner([f" w{i}" for i in range(200)], [], token_delay=0.01)
    turn = await session.say("first conversation")
    while not sink.stream.seg_tail:
        await asyncio.sleep(0.01)
    old_conv = turn.conversation_id
    assert sink.chat.conversation_id == old_conv == session.conversation_id
    # the page sends the conversation id it now shows (the projection set it): nothing changes
    await session.on_control({"type": "context", "conversation_id": old_conv, "muted": True})
    assert not turn.interrupted
    # "New conversation" pressed mid-turn: the page shows an empty conversation and says so
    sink.chat.conversation_id = ""
    sink.chat.messages = []
    await session.on_control({"type": "context", "conversation_id": "", "muted": True})
    assert turn.interrupted
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task
    assert sink.chat.messages == []
    assert sink.chat.conversation_id == "" and session.conversation_id == ""
    stored = repo.list_messages(1, old_conv)
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[-1]["interrupted"]


async def test_a_finished_turn_appends_to_the_conversation_it_belongs_to(env):  # noqa: F811
    sink, holder, repo = env
    session, turn = await _finished_turn(env, [("a1a1a1a1a1", "Hello there.")])
    assert [m["role"] for m in sink.chat.messages] == ["user", "assistant"]
    assert sink.chat.conversation_id == turn.conversation_id


async def test_mute_reaches_the_session_as_a_message(env):  # noqa: F811
    sink, holder, repo = env
    session, _, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner([" ok"], [("m1m1m1m1m1", "Ok.")])
    await session.on_control({"type": "context", "conversation_id": "", "muted": True})
    turn = await session.say("quietly")
    await turn.task
    assert not turn.speak and session.muted


# ---------------------------------------------------------------- settings form (unsaved values)
def test_preview_and_tests_use_the_forms_current_values(env):  # noqa: F811
    from voiceclaw_app.config import SettingsError
    from voiceclaw_app.states.settings import form_settings, to_form

    sink, holder, repo = env
    saved = repo.load_settings()
    values = to_form(saved)
    values.update({"tts_voice": "en_GB-alba-medium", "tts_speed": "1.5", "llm_model_voice": "openclaw:voice", "openai_api_key": "sk-must-not-pass"})
    settings = form_settings(values, saved)
    assert (settings.tts_voice, settings.tts_speed, settings.llm_model_voice) == ("en_GB-alba-medium", 1.5, "openclaw:voice")
    assert repo.load_settings() == saved  # nothing saved
    values["tts_speed"] = "99"
    with pytest.raises(SettingsError) as exc:
        form_settings(values, saved)
    assert "tts_speed" in exc.value.errors


async def test_a_stopped_report_after_the_cut_keeps_the_chunk_that_had_started(env):  # noqa: F811
    sink, holder, repo = env
    session, turn = await _interrupted_after_the_first_chunk(env, ("s1s1s1s1s1", "s2s2s2s2s2", "s3s3s3s3s3"))
    assert repo.list_messages(1, turn.conversation_id)[-1]["content"] == "One."
    # the page's queue had started chunk 2 before the barge-in reached it
    await _report(session, "stopped", turn.turn_id, played=2)
    for _ in range(50):
        msg = repo.list_messages(1, turn.conversation_id)[-1]
        if msg["content"] != "One.":
            break
        await asyncio.sleep(0.02)
    assert msg["content"] == "One. Two." and msg["interrupted"]
    assert msg["audio_ids"] == ["s1s1s1s1s1", "s2s2s2s2s2"]
    assert sink.chat.messages[-1]["content"] == "One. Two."


async def test_an_empty_reply_tells_the_person(env):  # noqa: F811
    """A model that answers nothing at all: the page says so instead of going quiet."""
    from voiceclaw_app.session.session import EMPTY_REPLY_NOTICE

    sink, _, _ = env
    session, turn = await _finished_turn(env, [])
    for _ in range(100):
        if sink.chat.notice:
            break
        await asyncio.sleep(0.02)
    assert sink.chat.notice == EMPTY_REPLY_NOTICE and not turn.interrupted
    await session.close()
