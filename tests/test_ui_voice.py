"""The mic socket's decisions (/ws/voice) and the turn registry's playback reports.

A fake listener (a real ``Listener`` subclass) and the in-memory sink of
test_states; the socket is a small in-memory stand-in for Starlette's WebSocket.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from types import SimpleNamespace

import pytest

from voiceclaw_app.pipeline.timing import TurnMarks, now_ms
from voiceclaw_app.providers.base import EngineUnavailable, Listener, SpeechDiscarded, SpeechStarted, queued_events

from .test_states import UID, USER, FakeRunner, env  # noqa: F401  (env is a fixture)

TOKEN = "tok-voice-0001"


class FakeWS:
    """Enough of starlette's WebSocket for ws_voice: scripted input, recorded output."""

    #: the upgrade request's headers by default (the ``voice`` fixture logs the tests' user in)
    login_headers: dict[str, str] = {}

    def __init__(self, incoming: list[dict] | None = None, headers: dict[str, str] | None = None):
        self.sent: list[dict] = []
        self.closed_with: int | None = None
        self.accepted = False
        self.incoming = list(incoming or [])
        self.headers = dict(self.login_headers if headers is None else headers)
        self.client = SimpleNamespace(host="127.0.0.1", port=50000)

    async def accept(self):
        self.accepted = True

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
    from voiceclaw_app.server import ws_voice
    from voiceclaw_app.states import services, turns

    built: list[FakeListener] = []
    holder = {"fail_push": None}

    async def fake_build_listener(settings):
        lst = FakeListener(fail_push=holder["fail_push"])
        built.append(lst)
        return lst

    from voiceclaw_app.server.auth import SESSION_COOKIE, create_login_session

    monkeypatch.setattr(services, "build_listener", fake_build_listener)
    monkeypatch.setattr(ws_voice, "_current", None)
    cookie = create_login_session(UID)
    monkeypatch.setattr(FakeWS, "login_headers", {"host": "127.0.0.1:3000", "origin": "http://127.0.0.1:3000", "cookie": f"{SESSION_COOKIE}={cookie}"})
    yield ws_voice, turns, env[0], built, holder
    turns.ACTIVE.clear()
    turns.VOICE_SENDERS.clear()


def _speaking_turn(turns, *, started_ago_ms: float = 1000.0, done: bool = False):
    t = turns.ActiveTurn(turn_id="t-speaking", token=TOKEN, conversation_id="c", speak=True, user_id=UID)
    t.playing = True
    t.playback_started_ms = now_ms() - started_ago_ms
    t.done = done
    turns.ACTIVE[TOKEN] = t
    return t


# ---------------------------------------------------------------- pause / resume / barge-in
async def test_tentative_onset_pauses_and_a_discard_resumes_without_cancelling(voice):
    ws_voice, turns, sink, _, _ = voice
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    turn = _speaking_turn(turns)
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
    ws_voice, turns, sink, _, _ = voice
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    turn = _speaking_turn(turns)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=False))
    assert ws.types() == ["pause", "barge_in"]
    assert turn.cancel.cancelled and turn.interrupted
    assert not session.paused
    await session.close()


async def test_confirmed_speech_while_speaking_barges_in_even_without_a_pause(voice):
    ws_voice, turns, sink, _, _ = voice
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    turn = _speaking_turn(turns)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms()))
    assert ws.types() == ["barge_in"]
    assert turn.interrupted


async def test_echo_guard_and_silence_keep_playback_going(voice):
    ws_voice, turns, sink, _, _ = voice
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    # nothing is speaking: no pause, no barge-in
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await session._on_listen_event(SpeechStarted(t_ms=now_ms()))
    assert ws.types() == []
    # within the first 300 ms of playback: our own voice, ignored
    turn = _speaking_turn(turns, started_ago_ms=50.0)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await session._on_listen_event(SpeechStarted(t_ms=now_ms()))
    assert ws.types() == []
    assert not turn.interrupted


async def test_an_unresolved_pause_resumes_by_itself(voice, monkeypatch):
    ws_voice, turns, sink, _, _ = voice
    monkeypatch.setattr(ws_voice, "PAUSE_TIMEOUT_S", 0.05)
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    _speaking_turn(turns)
    await session._on_listen_event(SpeechStarted(t_ms=now_ms(), tentative=True))
    await asyncio.sleep(0.2)
    assert ws.types() == ["pause", "resume"]


async def test_button_barge_in_control_cancels_a_speaking_turn(voice):
    ws_voice, turns, sink, _, _ = voice
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    turn = _speaking_turn(turns)
    await session.on_control({"type": "barge_in"})
    assert ws.types() == ["barge_in"] and turn.interrupted


# ---------------------------------------------------------------- listener mode and failures
async def test_listener_gets_the_input_mode_when_built_and_on_every_change(voice):
    ws_voice, turns, sink, built, _ = voice
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "push_to_talk", USER)
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
    ws_voice, turns, sink, built, holder = voice
    holder["fail_push"] = EngineUnavailable("The speech model files are missing: run make setup.")
    ws = FakeWS()
    session = ws_voice.VoiceSession(ws, TOKEN, "hands_free", USER)
    frame = b"\x00\x01" * 320
    await session.on_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    for _ in range(20):  # frames right after the failure do not rebuild the listener
        await session.on_audio(frame)
    assert len(built) == 1
    assert built[0].closed
    assert [m for m in ws.sent if m["type"] == "error"] == [{"type": "error", "message": "The speech model files are missing: run make setup."}]
    assert sink.chat.error == "The speech model files are missing: run make setup." and sink.chat.status == "error"
    assert not session.closed
    # the user presses stop / the button again: listening is retried
    holder["fail_push"] = None
    await session.on_control({"type": "stop"})
    await session.on_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    await session.on_audio(frame)
    assert len(built) == 2 and built[1].pushed == 2
    await session.close()


async def test_a_listener_that_ends_by_itself_is_rebuilt_on_the_next_frame(voice):
    """A cloud session that failed with fallback off ends its events: the mic must not go dead."""
    ws_voice, turns, sink, built, _ = voice
    session = ws_voice.VoiceSession(FakeWS(), TOKEN, "hands_free", USER)
    frame = b"\x00\x01" * 320
    await session.on_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    assert len(built) == 1 and built[0].pushed == 1
    built[0].q.put_nowait(built[0]._end)  # the listener's events end
    for _ in range(100):
        if session.listener is None:
            break
        await asyncio.sleep(0.01)
    assert session.listener is None and built[0].closed
    await session.on_audio(frame)
    await asyncio.wait_for(session._starting, 2)
    await session.on_audio(frame)
    assert len(built) == 2 and built[1].pushed == 2
    await session.close()


async def test_frames_said_while_the_listener_starts_reach_it_in_order(voice, monkeypatch):
    """The user's first words are buffered while the listener starts; live frames that
    arrive during the replay must queue behind them, not overtake them."""
    ws_voice, turns, sink, built, _ = voice
    from voiceclaw_app.states import services

    real_build = services.build_listener

    async def slow_build(settings):
        await asyncio.sleep(0.05)
        return await real_build(settings)

    monkeypatch.setattr(services, "build_listener", slow_build)
    session = ws_voice.VoiceSession(FakeWS(), TOKEN, "hands_free", USER)
    frame = b"\x00\x01" * 320

    times = itertools.count()
    monkeypatch.setattr(ws_voice, "now_ms", lambda: float(next(times)))
    for _ in range(30):  # buffered while the listener is built
        await session.on_audio(frame)
    starting = session._starting
    # live frames keep coming while the buffer is replayed
    while not starting.done():  # (real frames come every 20 ms; a replayed push takes ~2 ms here)
        await session.on_audio(frame)
        await asyncio.sleep(0.01)
    for _ in range(5):
        await session.on_audio(frame)
    got = built[0].frames
    assert len(got) >= 35
    assert got == sorted(got), "frames reached the listener out of order"
    await session.close()


async def test_stop_while_the_listener_starts_does_not_bring_it_back(voice, monkeypatch):
    ws_voice, turns, sink, built, _ = voice
    from voiceclaw_app.states import services

    real_build = services.build_listener
    gate = asyncio.Event()

    async def slow_build(settings):
        await gate.wait()
        return await real_build(settings)

    monkeypatch.setattr(services, "build_listener", slow_build)
    session = ws_voice.VoiceSession(FakeWS(), TOKEN, "hands_free", USER)
    await session.on_audio(b"\x00\x01" * 320)
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

    ws_voice, turns, sink, _, _ = voice
    session = ws_voice.VoiceSession(FakeWS(), TOKEN, "hands_free", USER)
    calls: list[float] = []

    async def prepare():
        calls.append(now_ms())
        await asyncio.sleep(3600)  # never needed here

    session.starter = TurnStarter(prepare)
    turn = _speaking_turn(turns)
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
    turns.ACTIVE.clear()
    kept = session.starter._prepared
    await session._on_listen_event(SpeechDiscarded(t_ms=now_ms()))
    assert session.starter._prepared is kept and not kept.done()
    await session.starter.aclose()
    await session.close()


# ---------------------------------------------------------------- hello
@pytest.mark.parametrize("rate", ["abc", {"x": 1}, [16000], 44100, "nan", True])
async def test_bad_sample_rates_are_refused_without_crashing(voice, rate):
    ws_voice, *_ = voice
    ws = FakeWS([{"text": json.dumps({"type": "hello", "client_token": TOKEN, "sample_rate": rate})}])
    await ws_voice.ws_voice(ws)
    assert ws.closed_with == 4000
    assert ws.types() == ["error"]


@pytest.mark.parametrize("rate", [16000, "16000", 16000.0, None])
async def test_good_sample_rates_are_accepted(voice, rate):
    ws_voice, *_ = voice
    hello = {"type": "hello", "client_token": TOKEN}
    if rate is not None:
        hello["sample_rate"] = rate
    ws = FakeWS([{"text": json.dumps(hello)}])
    await ws_voice.ws_voice(ws)
    assert ws.types()[0] == "ready" and ws.closed_with is None


async def test_the_mic_socket_needs_a_login_and_the_apps_own_origin(voice):
    ws_voice, *_ = voice
    hello = {"text": json.dumps({"type": "hello", "client_token": TOKEN, "sample_rate": 16000})}
    # no session cookie: refused with a message, and never "ready"
    ws = FakeWS([hello], headers={"host": "127.0.0.1:3000", "origin": "http://127.0.0.1:3000"})
    await ws_voice.ws_voice(ws)
    assert ws.closed_with == 4003 and ws.types() == ["error"] and ws.sent[0]["code"] == "login"
    # a made-up cookie is no session either
    ws = FakeWS([hello], headers={"host": "127.0.0.1:3000", "cookie": "voiceclaw_session=forged-value-123"})
    await ws_voice.ws_voice(ws)
    assert ws.closed_with == 4003 and "ready" not in ws.types()
    # a valid cookie, but the upgrade comes from another site's page (cross-site WebSocket
    # hijacking): refused before the socket is even accepted, on loopback too
    evil = dict(FakeWS.login_headers, origin="http://evil.example")
    ws = FakeWS([hello], headers=evil)
    await ws_voice.ws_voice(ws)
    assert ws.closed_with == 4003 and not ws.accepted and ws.sent == []
    # the logged-in user from the app's own page: ready
    ws = FakeWS([hello])
    await ws_voice.ws_voice(ws)
    assert ws.types()[0] == "ready"


async def test_a_reload_of_the_same_tab_is_not_a_takeover(voice):
    ws_voice, turns, sink, _, _ = voice
    old_ws = FakeWS()
    old = ws_voice.VoiceSession(old_ws, TOKEN, "hands_free", USER)
    ws_voice._current = old
    ws = FakeWS([{"text": json.dumps({"type": "hello", "client_token": TOKEN, "sample_rate": 16000})}])
    await ws_voice.ws_voice(ws)
    assert "taken_over" not in old_ws.types() and old.closed
    assert not getattr(sink.chat, "taken_over", False)
    # another tab (another token) does take it over
    other_ws = FakeWS()
    other = ws_voice.VoiceSession(other_ws, "tok-other-tab-2", "hands_free", USER)
    ws_voice._current = other
    ws = FakeWS([{"text": json.dumps({"type": "hello", "client_token": TOKEN, "sample_rate": 16000})}])
    await ws_voice.ws_voice(ws)
    assert "taken_over" in other_ws.types() and other_ws.closed_with == 4001


# ---------------------------------------------------------------- playback reports
async def _finished_turn(env, chunks, tokens=None, conv=""):
    sink, holder, turns, repo = env
    holder["runner"] = FakeRunner(tokens or [t + " " for _, t in chunks], chunks)
    turn = turns.start_turn(TOKEN, "hello", speak=True, spoken_input=True, user_id=UID, conversation_id=conv, marks=TurnMarks(speech_end=now_ms() - 500, stt_final=now_ms() - 400))
    await turn.task
    return turn


async def test_only_the_first_first_playing_report_counts(env):  # noqa: F811
    sink, holder, turns, repo = env
    turn = await _finished_turn(env, [("f1f1f1f1f1", "One."), ("f2f2f2f2f2", "Two.")])
    origin = turn.marks.origin()
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": origin + 900.0})
    for _ in range(250):  # the write runs in an executor thread
        first = repo.timings_for(UID, turn.conversation_id)[0]["first_audio_playing"]
        if first is not None:
            break
        await asyncio.sleep(0.02)
    assert first == pytest.approx(900.0, abs=0.2)
    # a replay of the same URLs (a remounted queue) reports again: ignored, while active and after
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": origin + 60000.0})
    turns.ACTIVE.pop(TOKEN)
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": origin + 90000.0})
    await asyncio.sleep(0.5)  # (a write, had one been scheduled, would land by now)
    assert repo.timings_for(UID, turn.conversation_id)[0]["first_audio_playing"] == first
    assert turn.marks.first_audio_playing == origin + 900.0


async def test_a_stop_after_the_reply_was_heard_does_not_cut_it(env):  # noqa: F811
    sink, holder, turns, repo = env
    turn = await _finished_turn(env, [("h1h1h1h1h1", "One."), ("h2h2h2h2h2", "Two.")])
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": now_ms()})
    turns.audio_report(TOKEN, {"event": "chunk", "turn": turn.turn_id, "index": 1})
    turns.audio_report(TOKEN, {"event": "ended", "turn": turn.turn_id, "played": 2})
    assert not turns.speaking(TOKEN)
    # the same turn replayed and stopped after one chunk
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": now_ms()})
    turns.audio_report(TOKEN, {"event": "stopped", "turn": turn.turn_id, "played": 1})
    await asyncio.sleep(0.1)
    msg = repo.list_messages(UID, turn.conversation_id)[-1]
    assert msg["content"] == "One. Two." and not msg["interrupted"]
    assert not turns.speaking(TOKEN)


async def test_a_stop_during_playback_after_synthesis_cuts_to_played_chunks(env):  # noqa: F811
    sink, holder, turns, repo = env
    turn = await _finished_turn(env, [("p1p1p1p1p1", "One."), ("p2p2p2p2p2", "Two."), ("p3p3p3p3p3", "Three.")])
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": now_ms()})
    assert turns.speaking(TOKEN)
    turns.audio_report(TOKEN, {"event": "stopped", "turn": turn.turn_id, "played": 1})
    for _ in range(50):
        msg = repo.list_messages(UID, turn.conversation_id)[-1]
        if msg["interrupted"]:
            break
        await asyncio.sleep(0.02)
    assert msg["content"] == "One." and msg["interrupted"]
    assert msg["audio_ids"] == ["p1p1p1p1p1"]


async def test_chunk_reports_set_playing_again_after_a_drain(env):  # noqa: F811
    sink, holder, turns, repo = env
    holder["runner"] = FakeRunner(["One. ", "Two."], [("d1d1d1d1d1", "One."), ("d2d2d2d2d2", "Two.")], chunk_delay=0.3)
    turn = turns.start_turn(TOKEN, "count", speak=True, spoken_input=True, user_id=UID)
    while not turn.chunks:
        await asyncio.sleep(0.01)
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": now_ms()})
    assert turn.playing
    # an old queue drained before the next chunk came: "ended" mid-reply
    turns.audio_report(TOKEN, {"event": "ended", "turn": turn.turn_id, "played": 1})
    assert not turn.playing and not turn.playback_over
    turns.audio_report(TOKEN, {"event": "chunk", "turn": turn.turn_id, "index": 1})
    assert turn.playing and turn.played == 2
    await turn.task
    assert turns.speaking(TOKEN)  # the browser still plays the last chunk
    assert sink.stream.audio_done


async def _interrupted_after_the_first_chunk(env, ids: tuple[str, str, str]):  # noqa: F811
    """A three-chunk reply: the first chunk starts playing, then a barge-in."""
    sink, holder, turns, repo = env
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], list(zip(ids, ["One.", "Two.", "Three."])), chunk_delay=0.05)
    turn = turns.start_turn(TOKEN, "count", speak=True, spoken_input=True, user_id=UID)
    while len(turn.chunks) < 2:
        await asyncio.sleep(0.01)
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": now_ms()})
    assert turns.interrupt(TOKEN)
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task
    return turn


async def test_an_interrupted_reply_keeps_only_the_audio_that_played(env):  # noqa: F811
    sink, holder, turns, repo = env
    turn = await _interrupted_after_the_first_chunk(env, ("i1i1i1i1i1", "i2i2i2i2i2", "i3i3i3i3i3"))
    msg = repo.list_messages(UID, turn.conversation_id)[-1]
    assert msg["content"] == "One." and msg["interrupted"]
    assert msg["audio_ids"] == ["i1i1i1i1i1"]
    assert sink.chat.last_audio_ids == ["i1i1i1i1i1"]


async def test_a_cancelled_turn_does_not_append_to_another_conversation(env):  # noqa: F811
    sink, holder, turns, repo = env
    holder["runner"] = FakeRunner([f" w{i}" for i in range(200)], [], token_delay=0.01)
    turn = turns.start_turn(TOKEN, "first conversation", speak=False, spoken_input=False, user_id=UID)
    while not turn.segments and not turn.pending:
        await asyncio.sleep(0.01)
    old_conv = turn.conversation_id
    assert sink.chat.conversation_id == old_conv
    # "New conversation" pressed mid-turn: the tab shows an empty conversation now
    sink.chat.conversation_id = ""
    sink.chat.messages = []
    assert turns.interrupt(TOKEN, reason="new")
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task
    assert sink.chat.messages == []
    assert sink.chat.conversation_id == ""
    stored = repo.list_messages(UID, old_conv)
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[-1]["interrupted"]


async def test_a_finished_turn_appends_to_the_conversation_it_belongs_to(env):  # noqa: F811
    sink, holder, turns, repo = env
    turn = await _finished_turn(env, [("a1a1a1a1a1", "Hello there.")])
    assert [m["role"] for m in sink.chat.messages] == ["user", "assistant"]
    assert sink.chat.conversation_id == turn.conversation_id


# ---------------------------------------------------------------- settings form (unsaved values)
def test_preview_and_tests_use_the_forms_current_values(env):  # noqa: F811
    from voiceclaw_app.config import SettingsError
    from voiceclaw_app.states.settings import form_settings, to_form

    sink, holder, turns, repo = env
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
    sink, holder, turns, repo = env
    turn = await _interrupted_after_the_first_chunk(env, ("s1s1s1s1s1", "s2s2s2s2s2", "s3s3s3s3s3"))
    assert repo.list_messages(UID, turn.conversation_id)[-1]["content"] == "One."
    # the page's queue had started chunk 2 before the barge-in reached it
    turns.audio_report(TOKEN, {"event": "stopped", "turn": turn.turn_id, "played": 2})
    for _ in range(50):
        msg = repo.list_messages(UID, turn.conversation_id)[-1]
        if msg["content"] != "One.":
            break
        await asyncio.sleep(0.02)
    assert msg["content"] == "One. Two." and msg["interrupted"]
    assert msg["audio_ids"] == ["s1s1s1s1s1", "s2s2s2s2s2"]
    assert sink.chat.messages[-1]["content"] == "One. Two."
