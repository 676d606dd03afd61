"""The dashboard's reload path (``restore_after_load``, run by ``ChatState.on_load``,
and the new audio queue's "mounted" report) and the audio queue's reports
(``apply_audio_report``, run by ``on_audio_event``).

In-memory sink and fake runner of test_states: the turn registry updates the same
FakeStream / FakeChat the helpers are given.
"""

from __future__ import annotations

import asyncio
import contextlib

from voiceclaw_app.states.chat import apply_audio_report, restore_after_load

from .test_states import UID, USER, FakeRunner, env  # noqa: F401  (env is a fixture)

TOKEN = "tok-uichat-0001"
CHUNKS = [("d1d1d1d1d1", "One."), ("d2d2d2d2d2", "Two."), ("d3d3d3d3d3", "Three.")]


def _reload(sink) -> None:
    """A page (re)load: on_load runs, and the new page's audio queue reports being mounted."""
    restore_after_load(TOKEN, sink.stream, sink.chat)
    apply_audio_report(TOKEN, {"event": "mounted", "turn": sink.stream.audio_turn}, sink.stream, sink.chat)


async def _playing_mid_reply(sink, holder, turns):
    """A spoken reply still being synthesized (two of three chunks so far), its first chunk playing."""
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], CHUNKS, chunk_delay=0.05)
    turn = turns.start_turn(TOKEN, "count", speak=True, spoken_input=False, user_id=UID)
    while len(turn.chunks) < 2:
        await asyncio.sleep(0.01)
    apply_audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": None}, sink.stream, sink.chat)
    return turn


async def _finished_and_playing(sink, holder, turns):
    """A spoken reply fully synthesized, its audio reported playing by the page."""
    holder["runner"] = FakeRunner(["One. ", "Two. ", "Three."], CHUNKS)
    turn = turns.start_turn(TOKEN, "count", speak=True, spoken_input=False, user_id=UID)
    await turn.task
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": None})
    assert turns.speaking(TOKEN)
    assert sink.chat.status == "speaking"
    return turn


async def test_reload_after_a_reply_mid_playback_resets_speaking_to_idle(env):
    sink, holder, turns, _ = env
    await _finished_and_playing(sink, holder, turns)
    _reload(sink)
    assert not turns.speaking(TOKEN)
    assert sink.chat.status == "idle"
    assert sink.stream.audio_urls == [] and sink.stream.audio_done


async def test_reload_with_the_mic_on_shows_the_mic_off(env):
    """A reloaded page's mic is off until the next tap: neither "speaking" nor a
    leftover "listening" may stay."""
    sink, holder, turns, _ = env
    await _finished_and_playing(sink, holder, turns)
    sink.chat.mic_on = True
    _reload(sink)
    assert sink.chat.status == "idle" and not sink.chat.mic_on
    sink.chat.status = "listening"  # listening (mic on) when the page is reloaded
    sink.chat.mic_on = True
    _reload(sink)
    assert sink.chat.status == "idle" and not sink.chat.mic_on


async def test_a_plain_reconnect_keeps_the_mic_state(env):
    sink, holder, turns, _ = env
    sink.chat.mic_on, sink.chat.status = True, "listening"
    restore_after_load(TOKEN, sink.stream, sink.chat)  # on_load after a socket reconnect
    assert sink.chat.mic_on and sink.chat.status == "listening"


async def test_reload_leaves_thinking_alone_while_the_turn_runs(env):
    sink, holder, turns, _ = env
    holder["runner"] = FakeRunner([f" w{i}" for i in range(300)], [], token_delay=0.01)
    turn = turns.start_turn(TOKEN, "talk", speak=True, spoken_input=False, user_id=UID)
    while sink.chat.status != "thinking":
        await asyncio.sleep(0.01)
    _reload(sink)
    assert sink.chat.status == "thinking"
    turns.interrupt(TOKEN)
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task


async def test_reload_mid_stream_resends_every_segment_once(env):
    sink, holder, turns, _ = env
    tokens = [f" w{i}" for i in range(1200)]
    holder["runner"] = FakeRunner(tokens, [], token_delay=0.003)
    turn = turns.start_turn(TOKEN, "talk", speak=False, spoken_input=False, user_id=UID)
    for _ in range(1000):
        if len(turn.segments) > turns.TAIL + 2 and sink.stream.seg_base > 0:
            break
        await asyncio.sleep(0.01)
    assert sink.stream.seg_base > 0, "the stream never went past one window"
    assert len(sink.stream.seg_tail) < len(turn.segments)
    restore_after_load(TOKEN, sink.stream, sink.chat)
    assert sink.stream.seg_base == 0
    assert sink.stream.seg_tail == turn.segments
    assert sink.stream.turn_id == turn.turn_id
    turns.interrupt(TOKEN)
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task


async def test_reload_of_a_finished_turn_resends_nothing(env):
    sink, holder, turns, _ = env
    await _finished_and_playing(sink, holder, turns)
    sink.stream.seg_base, sink.stream.seg_tail = 5, ["tail"]
    restore_after_load(TOKEN, sink.stream, sink.chat)
    assert (sink.stream.seg_base, sink.stream.seg_tail) == (5, ["tail"])


async def test_page_left_mid_reply_ends_the_running_turn_cut_at_what_was_heard(env):
    """The audio queue unmounts mid-reply and reports "stopped": the turn still
    producing audio ends there, stored up to the played chunk, marked interrupted,
    and the status leaves "speaking"."""
    sink, holder, turns, repo = env
    turn = await _playing_mid_reply(sink, holder, turns)
    assert sink.chat.status == "speaking"
    apply_audio_report(TOKEN, {"event": "stopped", "turn": turn.turn_id, "played": 1}, sink.stream, sink.chat)
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task
    assert turn.interrupted
    assert sink.chat.status == "idle"
    msgs = repo.list_messages(UID, sink.chat.conversation_id)
    assert msgs[-1]["content"] == "One."
    assert msgs[-1]["interrupted"]
    # back on the page: nothing is stuck
    _reload(sink)
    assert sink.chat.status == "idle"


async def test_a_stopped_report_of_another_turn_cancels_nothing(env):
    sink, holder, turns, _ = env
    holder["runner"] = FakeRunner([f" w{i}" for i in range(200)], [], token_delay=0.01)
    turn = turns.start_turn(TOKEN, "talk", speak=True, spoken_input=False, user_id=UID)
    while sink.stream.audio_turn != turn.turn_id:
        await asyncio.sleep(0.01)
    apply_audio_report(TOKEN, {"event": "stopped", "turn": "someoldturn", "played": 1}, sink.stream, sink.chat)
    await asyncio.sleep(0.05)
    assert not turn.interrupted and turns.active(TOKEN) is turn
    turns.interrupt(TOKEN)
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task


async def test_a_turn_that_outlives_a_reload_does_not_leave_speaking_behind(env):
    """Reloaded while the reply was still being produced: the new page does not play
    that turn, so no "ended" report comes; the turn's end must not leave "speaking"."""
    sink, holder, turns, _ = env
    holder["runner"] = FakeRunner([f" w{i}" for i in range(30)], CHUNKS, token_delay=0.01, chunk_delay=0.05)
    turn = turns.start_turn(TOKEN, "talk", speak=True, spoken_input=False, user_id=UID)
    while not turn.chunks:
        await asyncio.sleep(0.01)
    turns.audio_report(TOKEN, {"event": "first_playing", "turn": turn.turn_id, "index": 0, "server_ms": None})
    _reload(sink)  # the reload (its pagehide report was lost)
    await turn.task
    assert sink.chat.status == "idle"
    assert not turns.speaking(TOKEN)


async def test_a_plain_reconnect_keeps_a_playing_reply_interruptible(env):
    """on_load also runs when the socket merely reconnects: the page still plays the
    reply, so the user's voice must still pause/interrupt it, and the status stays."""
    sink, holder, turns, _ = env
    await _finished_and_playing(sink, holder, turns)
    restore_after_load(TOKEN, sink.stream, sink.chat)  # reconnect: no new audio queue
    assert turns.speaking(TOKEN)
    assert sink.chat.status == "speaking"
    assert sink.stream.audio_urls, "the playing queue's URLs must stay"


async def test_playback_stopped_on_the_mic_socket_cuts_the_reply(env):
    """pagehide: the page's Reflex socket is gone, so the audio queue says it on the mic
    socket; the running turn ends, stored up to the played chunk, marked interrupted."""
    from .test_ui_voice import FakeWS
    from voiceclaw_app.server import ws_voice

    sink, holder, turns, repo = env
    turn = await _playing_mid_reply(sink, holder, turns)
    session = ws_voice.VoiceSession(FakeWS(), TOKEN, "hands_free", USER)
    await session.on_control({"type": "playback_stopped", "turn": turn.turn_id, "played": 1})
    with contextlib.suppress(asyncio.CancelledError):
        await turn.task
    assert turn.interrupted
    for _ in range(100):
        msgs = repo.list_messages(UID, sink.chat.conversation_id)
        if msgs[-1]["interrupted"]:
            break
        await asyncio.sleep(0.02)
    assert msgs[-1]["content"] == "One." and msgs[-1]["interrupted"]
    await session.close()
