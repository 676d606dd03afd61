"""What a page sees across reloads and its audio queue's reports, through the session.

A reload is the page's voice socket closing (``VoiceSession.detach``: whatever it
played is gone) and ``ChatState.on_load`` running ``restore_after_load``; the audio
queue's reports reach the session as ``playback`` messages on the socket.
In-memory sink and fake runner of test_states; the real session and projection.
"""

from __future__ import annotations

import asyncio
import contextlib

from voiceclaw_app.states.chat import BOOT_ID, RESTART_NOTICE, restore_after_load

from .session_rig import make_session
from .test_states import FakeRunner, env  # noqa: F401  (env is a fixture)

TOKEN = "tok-uichat-0001"
CHUNKS = [("d1d1d1d1d1", "One."), ("d2d2d2d2d2", "Two."), ("d3d3d3d3d3", "Three.")]


async def _reload(session, wire, sink) -> None:
    """A page (re)load: the old page's socket closes, on_load runs on the new page."""
    await session.detach(wire)
    restore_after_load(sink.stream, sink.chat)


def report(session, kind: str, turn: str, **kw):
    return session.on_control({"type": "playback", "event": kind, "turn": turn, **kw})


async def _playing_mid_reply(env):
    """A spoken reply still being synthesized (two of three chunks so far), its first chunk playing."""
    sink, holder, _ = env
    session, wire, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], CHUNKS, chunk_delay=0.05)
    reply = await session.say("count")
    while len(reply.ledger.chunks) < 2:
        await asyncio.sleep(0.01)
    await report(session, "first_playing", reply.turn_id, index=0, server_ms=None)
    return session, wire, reply


async def _finished_and_playing(env):
    """A spoken reply fully synthesized, its audio reported playing by the page."""
    sink, holder, _ = env
    session, wire, projection = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], CHUNKS)
    reply = await session.say("count")
    await reply.task
    await report(session, "first_playing", reply.turn_id, index=0, server_ms=None)
    assert session.replying()
    assert sink.chat.session_status == "speaking"
    return session, wire, reply


async def test_reload_after_a_reply_mid_playback_resets_speaking_to_idle(env):
    sink, *_ = env
    session, wire, _ = await _finished_and_playing(env)
    await _reload(session, wire, sink)
    assert not session.replying()
    assert sink.chat.session_status == "idle"
    assert sink.stream.audio_urls == [] and sink.stream.audio_done


async def test_reload_with_the_mic_on_shows_the_mic_off(env):
    """A reloaded page's mic is off until the next tap: neither "speaking" nor a
    leftover "listening" may stay."""
    sink, *_ = env
    session, wire, _ = await _finished_and_playing(env)
    await session.on_control({"type": "mic", "on": True})
    assert sink.chat.mic_on
    await _reload(session, wire, sink)
    assert sink.chat.session_status == "idle" and not sink.chat.mic_on
    await session.attach(wire)  # the new page opens its socket and starts the mic: listening
    await session.on_control({"type": "mic", "on": True})
    assert sink.chat.session_status == "listening" and sink.chat.mic_on
    await _reload(session, wire, sink)
    assert sink.chat.session_status == "idle" and not sink.chat.mic_on


async def test_a_plain_reconnect_keeps_the_mic_state(env):
    sink, *_ = env
    sink.chat.mic_on, sink.chat.session_status, sink.chat.session_boot = True, "listening", BOOT_ID
    restore_after_load(sink.stream, sink.chat)  # on_load after a socket reconnect
    assert sink.chat.mic_on and sink.chat.session_status == "listening"


async def test_reload_leaves_thinking_alone_while_the_turn_runs(env):
    sink, holder, _ = env
    session, wire, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner([f" w{i}" for i in range(300)], [], token_delay=0.01)
    reply = await session.say("talk")
    while not sink.stream.seg_tail:  # streaming
        await asyncio.sleep(0.01)
    assert sink.chat.session_status == "thinking"
    await _reload(session, wire, sink)
    assert sink.chat.session_status == "thinking"
    reply.interrupt("test")
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task
    assert sink.chat.session_status == "idle"


async def test_a_reply_cancelled_before_it_ran_still_ends(env):
    sink, holder, _ = env
    session, wire, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner([" w"], [])
    reply = await session.say("talk")
    assert sink.chat.session_status == "thinking"
    reply.interrupt("at once")
    for _ in range(100):
        if reply.finished:
            break
        await asyncio.sleep(0.01)
    assert reply.finished and sink.chat.session_status == "idle"


async def test_reload_mid_stream_resends_every_segment_once(env):
    from voiceclaw_app.states.projection import TAIL

    sink, holder, _ = env
    session, wire, projection = await make_session(sink, TOKEN, muted=True)
    holder["runner"] = FakeRunner([f" w{i}" for i in range(1200)], [], token_delay=0.003)
    reply = await session.say("talk")
    for _ in range(1000):
        if len(projection.segments) > TAIL + 2 and sink.stream.seg_base > 0:
            break
        await asyncio.sleep(0.01)
    assert sink.stream.seg_base > 0, "the stream never went past one window"
    assert len(sink.stream.seg_tail) < len(projection.segments)
    restore_after_load(sink.stream, sink.chat)
    assert sink.stream.seg_base == 0
    assert sink.stream.seg_tail == projection.segments
    assert sink.stream.turn_id == reply.turn_id
    reply.interrupt("test")
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task


async def test_reload_of_a_finished_turn_resends_nothing(env):
    sink, *_ = env
    await _finished_and_playing(env)
    sink.stream.seg_base, sink.stream.seg_tail = 5, ["tail"]
    restore_after_load(sink.stream, sink.chat)
    assert (sink.stream.seg_base, sink.stream.seg_tail) == (5, ["tail"])


async def test_page_left_mid_reply_ends_the_running_turn_cut_at_what_was_heard(env):
    """The audio queue unmounts mid-reply and reports "stopped": the reply still
    producing audio ends there, stored up to the played chunk, marked interrupted,
    and the status leaves "speaking"."""
    sink, _, repo = env
    session, wire, reply = await _playing_mid_reply(env)
    assert sink.chat.session_status == "speaking"
    await report(session, "stopped", reply.turn_id, played=1)
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task
    assert reply.interrupted
    assert sink.chat.session_status == "idle"
    msgs = repo.list_messages(1, sink.chat.conversation_id)
    assert msgs[-1]["content"] == "One."
    assert msgs[-1]["interrupted"]
    await _reload(session, wire, sink)  # back on the page: nothing is stuck
    assert sink.chat.session_status == "idle"


async def test_a_stopped_report_of_another_turn_cancels_nothing(env):
    sink, holder, _ = env
    session, wire, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner([f" w{i}" for i in range(200)], [], token_delay=0.01)
    reply = await session.say("talk")
    while sink.stream.audio_turn != reply.turn_id:
        await asyncio.sleep(0.01)
    await report(session, "stopped", "someoldturn", played=1)
    await asyncio.sleep(0.05)
    assert not reply.interrupted and not reply.done
    reply.interrupt("test")
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task


async def test_a_turn_that_outlives_a_reload_does_not_leave_speaking_behind(env):
    """Reloaded while the reply was still being produced: the new page does not play
    that turn, so no "ended" report comes; the turn's end must not leave "speaking"."""
    sink, holder, _ = env
    session, wire, _ = await make_session(sink, TOKEN)
    holder["runner"] = FakeRunner([f" w{i}" for i in range(30)], CHUNKS, token_delay=0.01, chunk_delay=0.05)
    reply = await session.say("talk")
    while not reply.ledger.chunks:
        await asyncio.sleep(0.01)
    await report(session, "first_playing", reply.turn_id, index=0, server_ms=None)
    await _reload(session, wire, sink)  # the reload (its pagehide report was lost)
    await reply.task
    assert sink.chat.session_status == "idle"
    assert not session.replying()


async def test_a_plain_reconnect_keeps_a_playing_reply_interruptible(env):
    """on_load also runs when the Reflex socket merely reconnects: the page still plays
    the reply, so the user's voice must still pause/interrupt it, and the status stays."""
    sink, *_ = env
    session, wire, _ = await _finished_and_playing(env)
    restore_after_load(sink.stream, sink.chat)  # reconnect: the voice socket stays
    assert session.replying()
    assert sink.chat.session_status == "speaking"
    assert sink.stream.audio_urls, "the playing queue's URLs must stay"


async def test_playback_stopped_on_the_voice_socket_cuts_the_reply(env):
    """pagehide: the audio queue says it stopped; the running reply ends, stored up to
    the played chunk, marked interrupted."""
    sink, _, repo = env
    session, wire, reply = await _playing_mid_reply(env)
    await session.on_control({"type": "playback_stopped", "turn": reply.turn_id, "played": 1})
    with contextlib.suppress(asyncio.CancelledError):
        await reply.task
    assert reply.interrupted
    for _ in range(100):
        msgs = repo.list_messages(1, sink.chat.conversation_id)
        if msgs[-1]["interrupted"]:
            break
        await asyncio.sleep(0.02)
    assert msgs[-1]["content"] == "One." and msgs[-1]["interrupted"]


async def test_after_a_restart_no_page_stays_on_speaking_or_thinking(env):
    """The state a previous process projected says "speaking"/"thinking" but nothing of
    that process runs any more: on_load clears it and says why."""
    sink, *_ = env
    for status in ("speaking", "thinking"):
        sink.chat.session_status, sink.chat.session_boot, sink.chat.notice = status, "an-earlier-process", ""
        sink.stream.reset_turn("t-old")
        restore_after_load(sink.stream, sink.chat)
        assert sink.chat.session_status == "idle" and sink.chat.notice == RESTART_NOTICE
        assert not sink.stream.streaming and sink.stream.audio_urls == []
    # this process's own status is left alone
    sink.chat.session_status, sink.chat.session_boot, sink.chat.notice = "speaking", BOOT_ID, ""
    restore_after_load(sink.stream, sink.chat)
    assert sink.chat.session_status == "speaking" and sink.chat.notice == ""
