"""Bad input on ``/ws/voice``: each case gets a clear outcome, the socket (or the server)
stays healthy, and nothing already said is lost.

The real endpoint (``make_ws_voice`` over a real ``SessionHub``, ``VoiceSession`` and
``DbConversationStore`` on a test database) in a Starlette app driven through
Starlette's ASGI test client; the listener is a fake (a real ``Listener`` subclass)
that counts what reaches it, the runner the FakeRunner of test_states.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient

from .test_states import FakeRunner, make_people
from .test_ui_voice import FakeListener

TOKEN = "tok-badinput-01"
FRAME = b"\x01\x00" * 320  # 20 ms


@pytest.fixture()
def rig(tmp_path, monkeypatch):
    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("VOICECLAW_DATABASE_URL", f"sqlite:///{tmp_path / 'ws.db'}")
    from voiceclaw_app.db import repo
    from voiceclaw_app.server.hub import SessionHub
    from voiceclaw_app.server.persistence import DbConversationStore
    from voiceclaw_app.server.ws_voice import make_ws_voice
    from voiceclaw_app.states import services

    repo.create_all()
    make_people()
    built: list[FakeListener] = []

    async def build_listener(settings):
        built.append(FakeListener())
        return built[-1]

    async def get_runner(settings):
        return FakeRunner([" Fine", " thanks."], [("okokokokok", "Fine thanks.")])

    monkeypatch.setattr(services, "build_listener", build_listener)
    monkeypatch.setattr(services, "get_runner", get_runner)
    hub = SessionHub(services=services, store_for=DbConversationStore)
    app = Starlette(routes=[WebSocketRoute("/ws/voice", make_ws_voice(hub, authenticate=person_one, origin_allowed=lambda headers: True))])
    with TestClient(app) as client:
        yield client, hub, built, repo


async def person_one(headers, client_host):
    """The logged-in user of every socket here (the login itself is tested in test_auth.py)."""
    from voiceclaw_app.server.auth import AuthUser

    return AuthUser(id=1, name="person-one", is_admin=False)


def _hello(ws, **kw) -> dict:
    ws.send_text(json.dumps({"type": "hello", "client_token": TOKEN, "sample_rate": 16000, **kw}))
    msg = ws.receive_json()
    assert msg["type"] == "ready", msg
    return msg


def _healthy(ws) -> list[dict]:
    """The socket still answers (a ping gets its pong); returns what came before the pong."""
    ws.send_text(json.dumps({"type": "ping", "client_time_ms": 1.0}))
    before = []
    while True:
        msg = ws.receive_json()
        if msg["type"] == "pong":
            assert msg["client_time_ms"] == 1.0
            return before
        before.append(msg)


def _error(ws) -> dict:
    while True:
        msg = ws.receive_json()
        if msg["type"] == "error":
            return msg


def _typed_turn_works(ws, repo, hub, text: str = "how are you") -> None:
    """The next turn works and is stored: nothing lost."""
    ws.send_text(json.dumps({"type": "text", "text": text}))
    session = hub.sessions()[0]
    for _ in range(200):
        reply = session.reply
        if reply is not None and reply.finished:
            break
        time.sleep(0.02)
    assert reply is not None and reply.finished
    msgs = repo.list_messages(1, reply.conversation_id)
    assert [m["content"] for m in msgs][-2:] == [text, "Fine thanks."]


def test_garbage_text_frames_are_refused_and_the_socket_stays(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        ws.send_text("this is {not json")
        assert _error(ws)["code"] == "bad_json"
        ws.send_text("[1, 2, 3]")  # JSON, but not an object (said once per few seconds: no second error)
        ws.send_text(json.dumps({"type": "no-such-control"}))  # unknown: ignored
        _healthy(ws)
        _typed_turn_works(ws, repo, hub)


def test_deeply_nested_json_is_refused_without_recursing(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        ws.send_text("[" * 50000)
        err = _error(ws)
        assert err["code"] == "too_deep" and "nested" in err["message"]
        _healthy(ws)
        _typed_turn_works(ws, repo, hub)


def test_an_oversized_control_message_is_refused(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        ws.send_text(json.dumps({"type": "context", "pad": "x" * 200_000}))
        err = _error(ws)
        assert err["code"] == "too_large" and "bytes" in err["message"]
        _healthy(ws)


def test_a_100000_character_typed_message_is_refused_with_a_message(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        ws.send_text(json.dumps({"type": "text", "text": "word " * 20_000}))
        err = _error(ws)
        assert err["code"] == "too_large" and "8,000 characters" in err["message"]
        # under the socket's limit but over the typed-message limit: the session refuses it
        ws.send_text(json.dumps({"type": "text", "text": "a" * 9000}))
        err = _error(ws)
        assert err["code"] == "too_long" and "9,000 characters" in err["message"]
        assert hub.sessions()[0].reply is None, "no turn was started for a refused message"
        _typed_turn_works(ws, repo, hub)


def test_odd_length_empty_and_10_mb_frames_are_dropped_and_said_once(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        ws.send_bytes(b"\x01\x02\x03")  # odd length: not PCM16
        err = _error(ws)
        assert err["code"] == "bad_frame" and "3 bytes" in err["message"]
        ws.send_bytes(b"")
        ws.send_bytes(b"\x00" * (10 * 1024 * 1024))
        _healthy(ws)  # (the refusals after the first within 5 s are not repeated)
        session = hub.sessions()[0]
        assert session.samples == 0 and not built, "no bad frame reached a listener"
        ws.send_bytes(FRAME)  # a good frame after them is taken
        _healthy(ws)
        assert session.samples == 320
        _typed_turn_works(ws, repo, hub)


def test_a_burst_of_2000_tiny_frames_is_taken_in_order(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        for _ in range(2000):
            ws.send_bytes(b"\x01\x00")  # one sample each: valid, tiny
        _healthy(ws)
        session = hub.sessions()[0]
        assert session.samples == 2000
        for _ in range(100):
            if built and built[0].pushed + len(session._buffer) >= 1:
                break
            time.sleep(0.01)
        assert built and built[0].frames == sorted(built[0].frames)
        _typed_turn_works(ws, repo, hub)


def test_no_hello_closes_with_a_message(rig, monkeypatch):
    from voiceclaw_app.server import ws_voice

    monkeypatch.setattr(ws_voice, "HELLO_TIMEOUT_S", 0.2)
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        err = ws.receive_json()
        assert err["type"] == "error" and "hello" in err["message"]
    assert hub.sessions() == []
    with client.websocket_connect("/ws/voice") as ws:  # the server is fine: the next socket works
        _hello(ws)
        _healthy(ws)


def test_no_frames_after_hello_is_an_idle_session(rig):
    client, hub, built, repo = rig
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        time.sleep(0.3)
        _healthy(ws)
        assert not built and hub.sessions()[0].status == "idle"
    for _ in range(50):  # the socket closed: the session is gone (nothing ran)
        if not hub.sessions():
            break
        time.sleep(0.01)
    assert hub.sessions() == []


def test_a_10_minute_stream_faster_than_real_time_is_capped(rig):
    """Ten minutes of audio sent as fast as the socket takes it: the session takes at
    most ~1.5x real time (plus the guard's burst), says so once, and holds no more memory at
    the end than at the start."""
    client, hub, built, repo = rig
    frames = 10 * 60 * 50  # 10 min of 20 ms frames
    with client.websocket_connect("/ws/voice") as ws:
        _hello(ws)
        tracemalloc.start()
        t0 = time.monotonic()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(frames):
            ws.send_bytes(FRAME)
        said = _healthy(ws)
        elapsed = time.monotonic() - t0
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        session = hub.sessions()[0]
        taken_s = session.samples / 16000
        assert taken_s <= session.rate_guard.rate * elapsed + session.rate_guard.burst_s + 0.1, (taken_s, elapsed)
        assert session.rate_guard.dropped_samples > 0
        assert taken_s < 600
        assert len(session._buffer) <= 250
        assert after - before < 4 * 1024 * 1024, f"memory grew by {(after - before) / 1e6:.1f} MB"
        assert [m.get("code") for m in said if m["type"] == "error"] == ["too_fast"], said
        _typed_turn_works(ws, repo, hub)
