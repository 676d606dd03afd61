"""The session's parts on their own: playback ledger, barge-in policy, status derivation,
audio rate guard, the control-message depth check, the hub keeping a session whose
page left while its reply runs; and a whole spoken turn through a VoiceSession over the
in-memory store (no database, no browser)."""

from __future__ import annotations

import asyncio

import pytest

from voiceclaw_app.pipeline.timing import now_ms
from voiceclaw_app.providers.base import EndOfTurn, PreliminaryTranscript, SpeechStarted
from voiceclaw_app.server.ws_voice import json_depth_ok, parse_control
from voiceclaw_app.session.audio_guard import AudioRateGuard
from voiceclaw_app.session.barge_in import BargeInPolicy
from voiceclaw_app.session.playback import PlaybackLedger
from voiceclaw_app.session.status import StatusInputs, derive_status

from .test_states import FakeRunner


def test_ledger_keeps_what_started_playing_and_ignores_reports_after_the_end():
    led = PlaybackLedger()
    for i in range(3):
        led.sent(f"a{i}", f"Chunk {i}.")
    eff = led.report("first_playing", {"index": 0, "server_ms": 123.0}, reply_done=False)
    assert eff.first_playing_ms == 123.0 and led.playing and led.played == 1
    assert led.report("first_playing", {"index": 0, "server_ms": 999.0}, reply_done=False).first_playing_ms is None
    eff = led.report("stopped", {"played": 2}, reply_done=True)
    assert eff.more_played and eff.stopped_mid_reply and led.over and not led.playing
    assert led.kept(cut=True) == [("a0", "Chunk 0."), ("a1", "Chunk 1.")]
    assert led.kept(cut=False) == led.chunks
    # over: a replay's reports change nothing
    led.report("chunk", {"index": 2}, reply_done=True)
    assert led.played == 2 and not led.playing


def test_ledger_drain_mid_reply_is_not_the_end():
    led = PlaybackLedger()
    led.sent("a0", "One.")
    led.report("first_playing", {"index": 0, "server_ms": None}, reply_done=False)
    led.report("ended", {"played": 1}, reply_done=False)
    assert not led.playing and not led.over
    led.report("ended", {"played": 1}, reply_done=True)
    assert led.over


@pytest.mark.parametrize(
    "steps, expected",
    [
        ([("onset", True, True, False)], ["pause"]),  # tentative while replying
        ([("onset", True, True, True)], [None]),  # our own echo
        ([("onset", True, False, False)], [None]),  # nothing to interrupt
        ([("onset", True, True, False), ("onset", False, True, False)], ["pause", "barge_in"]),
        ([("onset", True, True, False), ("discard",)], ["pause", "resume"]),
        ([("discard",)], [None]),
        ([("onset", False, True, False)], ["barge_in"]),  # confirmed at once
        ([("onset", True, True, False), ("onset", True, True, False)], ["pause", None]),
    ],
)
def test_barge_in_policy(steps, expected):
    policy = BargeInPolicy()
    got = []
    for step in steps:
        if step[0] == "onset":
            got.append(policy.on_onset(tentative=step[1], replying=step[2], echo=step[3]))
        else:
            got.append(policy.on_discard())
    assert got == expected


def test_status_is_derived_in_one_place():
    base = dict(mic_on=False, reply_running=False, playing=False, audio_pending=False, failed=False)
    assert derive_status(StatusInputs(**base)) == "idle"
    assert derive_status(StatusInputs(**{**base, "mic_on": True})) == "listening"
    assert derive_status(StatusInputs(**{**base, "mic_on": True, "reply_running": True})) == "thinking"
    assert derive_status(StatusInputs(**{**base, "reply_running": True, "playing": True})) == "speaking"
    assert derive_status(StatusInputs(**{**base, "audio_pending": True})) == "speaking"
    assert derive_status(StatusInputs(**{**base, "failed": True, "mic_on": True})) == "error"


def test_audio_guard_allows_real_time_and_caps_faster():
    guard = AudioRateGuard(rate=1.5, burst_s=3.0)
    t = 0.0
    for _ in range(50 * 60):  # a minute at real time: all of it taken
        t += 20.0
        assert guard.admit(320, t)
    taken = sum(guard.admit(320, t + i * 0.01) for i in range(1000))  # 20 s of audio in 10 ms
    assert 140 <= taken <= 151  # the 3 s burst (plus what 10 ms refills)
    assert guard.dropped_samples == (1000 - taken) * 320


def test_control_messages_too_deep_or_large_are_refused_before_parsing():
    assert json_depth_ok('{"a": [1, {"b": "[[[[[[[[[[[[[[[[[[[[[["}]}')  # brackets inside strings do not count
    assert not json_depth_ok("[" * 17)
    assert parse_control("[" * 50000)[1] == "too_deep"
    assert parse_control("x" * 70000)[1] == "too_large"
    assert parse_control('{"type": "ping"}')[0] == {"type": "ping"}
    assert parse_control("nope")[1] == "bad_json"


class _Services:
    def __init__(self, runner, listener=None):
        from voiceclaw_app.config import VoiceSettings

        self.settings = VoiceSettings()
        self.runner = runner
        self.listener = listener

    async def load_settings(self, user_id=None):
        return self.settings

    async def get_runner(self, settings):
        return self.runner

    async def build_listener(self, settings):
        return self.listener


async def test_the_hub_keeps_a_session_whose_page_left_until_its_reply_ends():
    from voiceclaw_app.server.hub import SessionHub
    from voiceclaw_app.session.ports import InMemoryStore

    class Conn:
        async def __call__(self, event):
            pass

        async def close(self, code):
            pass

    runner = FakeRunner([f" w{i}" for i in range(40)], [], token_delay=0.01)
    stores: dict[int, InMemoryStore] = {}
    hub = SessionHub(services=_Services(runner), store_for=lambda uid: stores.setdefault(uid, InMemoryStore()))
    conn = Conn()
    session = await hub.connect(7, "tok-leaving-01", conn, muted=True)
    reply = await session.say("a long answer please")
    await asyncio.sleep(0.05)
    await hub.disconnect(session, conn)
    assert hub.session(7, "tok-leaving-01") is session and not session.attached  # kept: its reply runs
    # the same tab comes back: its session, with the reply still going
    back = Conn()
    assert await hub.connect(7, "tok-leaving-01", back) is session and not reply.done
    await hub.disconnect(session, back)
    await reply.task
    for _ in range(50):
        if hub.session(7, "tok-leaving-01") is None:
            break
        await asyncio.sleep(0.01)
    assert hub.session(7, "tok-leaving-01") is None and session.closed
    stored = stores[7].history(reply.conversation_id)
    assert [m.role for m in stored] == ["user", "assistant"] and stored[1].finished and stored[1].content.startswith("w0")


async def test_a_spoken_turn_through_the_session_over_the_in_memory_store():
    """Listener events in, events out: the early turn started at the pause is kept at
    the end of turn, its audio goes out once, both messages are stored."""
    from voiceclaw_app.session import events as ev
    from voiceclaw_app.session.ports import InMemoryStore
    from voiceclaw_app.session.session import VoiceSession

    from .test_ui_voice import FakeListener

    listener = FakeListener()
    store = InMemoryStore()
    runner = FakeRunner(["It is ", "noon."], [("n1n1n1n1n1", "It is noon.")])
    session = VoiceSession(services=_Services(runner, listener), store=store, tab="tok-spoken-01")
    out: list = []

    async def record(e):
        out.append(e)

    await session.attach(record)  # a page: it will play the reply
    await session.push_audio(b"\x01\x00" * 320)
    await session.ensure_listener()
    t = now_ms()
    for e in (SpeechStarted(t - 900), PreliminaryTranscript("What time is it?", t), EndOfTurn("what time is it", speech_end_ms=t, eot_ms=now_ms(), stt_final_ms=now_ms())):
        listener.q.put_nowait(e)
    for _ in range(200):
        if session.reply is not None and session.reply.finished:
            break
        await asyncio.sleep(0.01)
    reply = session.reply
    assert reply is not None and reply.finished and reply.reused
    assert [type(e).__name__ for e in out if isinstance(e, (ev.TurnStarted, ev.ReplyAudio, ev.TurnFinished))] == ["TurnStarted", "ReplyAudio", "TurnFinished"]
    statuses = [e.status for e in out if isinstance(e, ev.StatusChanged)]
    assert statuses == ["idle", "listening", "thinking", "speaking"]  # speaking until the page reports the end
    stored = store.history(reply.conversation_id)
    assert [(m.role, m.content) for m in stored] == [("user", "what time is it"), ("assistant", "It is noon.")]
    await session.close()
