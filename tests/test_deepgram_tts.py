"""Deepgram Aura over the speak WebSocket (the SDK's real client against tests/servers/deepgram_speak.py),
and the scheduler's streamed-text path: order, grouping under the flush limit, cancel, cache, failover."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.servers.deepgram import FakeDeepgramServer
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from tests.servers.speech_audio import decode_speech
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.events import AudioReady, ChunkText, TurnDone, TurnNotice
from voiceclaw_app.pipeline.tts_scheduler import FlushPolicy, TTSCache
from voiceclaw_app.pipeline.turn import TurnRunner
from voiceclaw_app.providers.base import AuthError, AudioClip, CancelToken
from voiceclaw_app.providers.deepgram_tts import DeepgramTTS

REPLY = "Sure thing, here is the plan. First we check the mail. Then we walk the dog. Last we cook."


@pytest.fixture
async def dg():
    async with FakeDeepgramServer(api_key="dg") as srv:
        yield srv


@pytest.fixture
async def chat():
    srv = FakeChatServer(ChatBehavior(reply=REPLY, ttft_s=0.02, tokens_per_s=400))
    await srv.start()
    yield srv
    await srv.stop()


def runner_for(chat, tmp_path, tts, **settings):
    s = VoiceSettings(llm_base_url=chat.base_url, llm_model_voice="m", tts_provider="deepgram", **settings)
    from voiceclaw_app.providers.openai_llm import OpenAICompatLLM

    return TurnRunner(llm=OpenAICompatLLM(chat.base_url), tts=tts, audio_store=AudioStore(tmp_path / "audio"), settings=s)


async def run_turn(runner, text="hello", conv="c", **kw):
    prepared = runner.prepare([], conv, spoken=True)
    return [ev async for ev in runner.run(prepared, text, **kw)]


def heard(runner, events) -> str:
    """The text the delivered audio carries (the fake server's audio is the text)."""
    pcm = b"".join(AudioClip.from_wav(runner.store.path_for(e.audio_id).read_bytes()).pcm16() for e in events if isinstance(e, AudioReady))
    return decode_speech(pcm)


async def test_synthesize_reads_back_the_text_through_the_sdk_socket(dg):
    tts = DeepgramTTS(api_key="dg", url=dg.url, model="aura-2-thalia-en")
    try:
        clip = await tts.synthesize("Hello there.")
        assert decode_speech(clip.pcm16()) == "Hello there."
        sess = dg.speak.sessions[0]
        assert sess.query["model"] == "aura-2-thalia-en" and sess.query["encoding"] == "linear16" and sess.query["sample_rate"] == "24000"
        # the socket stays warm: a second phrase reuses it
        await tts.synthesize("Again.")
        assert len(dg.speak.sessions) == 1 and tts.pool.opened == 1
    finally:
        await tts.aclose()


async def test_a_reply_streams_in_order_on_one_warm_socket(dg, chat, tmp_path):
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        await tts.warm()  # the user started speaking
        events = await run_turn(runner)
        assert isinstance(events[-1], TurnDone)
        assert heard(runner, events) == REPLY
        sess = dg.speak.sessions[0]
        assert len(dg.speak.sessions) == 1
        assert "".join(sess.texts) == REPLY  # joined exactly as sent: spaces kept, none added
        assert sess.flushes == len([e for e in events if isinstance(e, ChunkText)])  # few chunks: one flush each
        # each AudioReady's text is the chunk whose audio it starts
        firsts = [e for e in events if isinstance(e, AudioReady) and e.part == 0]
        assert "".join(e.text for e in firsts).replace(" ", "") == REPLY.replace(" ", "")
    finally:
        await tts.aclose()


async def test_a_long_reply_groups_chunks_to_stay_under_the_flush_limit(dg, tmp_path):
    long_reply = " ".join(f"Sentence number {i} is here." for i in range(30))
    async with FakeChatServer(ChatBehavior(reply=long_reply, ttft_s=0.01, tokens_per_s=2000)) as chat:
        tts = DeepgramTTS(api_key="dg", url=dg.url)
        dg.speak.profile.rtf = 0.01
        runner = runner_for(chat, tmp_path, tts, max_spoken_chars=5000)
        try:
            events = await run_turn(runner)
            chunks = [e for e in events if isinstance(e, ChunkText)]
            sess = dg.speak.sessions[0]
            assert len(chunks) >= 25
            assert sess.refused_flushes == 0
            assert sess.flushes <= FlushPolicy().eager + 1 + len(long_reply) // FlushPolicy().group_chars + 1
            assert heard(runner, events) == long_reply
        finally:
            await tts.aclose()


async def test_flushes_wait_when_the_window_is_spent(dg, chat, tmp_path):
    dg.speak.profile.flush_limit = 2
    dg.speak.profile.flush_window_s = 0.6
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        # the provider's window must match the service's (tests shrink both)
        await tts.warm()
        sock = tts.pool._idle[0]
        sock.flushes.limit, sock.flushes.window_s = 2, 0.6
        events = await run_turn(runner)
        assert heard(runner, events) == REPLY
        assert dg.speak.sessions[0].refused_flushes == 0
    finally:
        await tts.aclose()


async def test_barge_in_clears_and_nothing_of_the_cancelled_turn_is_delivered(dg, chat, tmp_path):
    dg.speak.profile.rtf = 1.0  # audio as slow as real speech: the reply is still synthesizing
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    cancel = CancelToken()
    seen = []
    try:
        prepared = runner.prepare([], "c", spoken=True)
        async for ev in runner.run(prepared, "hello", cancel=cancel):
            seen.append(ev)
            if isinstance(ev, AudioReady):
                cancel.cancel()  # the user talks over the first audio
        assert sum(isinstance(e, AudioReady) for e in seen) == 1
        sess = dg.speak.sessions[0]
        for _ in range(50):
            if sess.clears:
                break
            await asyncio.sleep(0.02)
        assert sess.clears == 1
        # the same warm socket serves the next reply, without the cleared audio
        dg.speak.profile.rtf = 0.05
        events = await run_turn(runner, conv="d")
        assert heard(runner, events) == REPLY
        assert len(dg.speak.sessions) == 1
    finally:
        await tts.aclose()


async def test_repeated_reply_comes_from_the_cache(dg, chat, tmp_path):
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        await run_turn(runner, conv="a")
        flushes = dg.speak.sessions[0].flushes
        events = await run_turn(runner, conv="b")
        assert heard(runner, events) == REPLY
        assert dg.speak.sessions[0].flushes == flushes  # every chunk was a cache hit
    finally:
        await tts.aclose()


async def test_socket_closed_mid_reply_the_rest_is_spoken_on_a_new_socket(dg, chat, tmp_path):
    dg.speak.then(close_after_frames=3)
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        events = await run_turn(runner)
        assert isinstance(events[-1], TurnDone)
        text = heard(runner, events)
        # the chunk cut mid-audio ends there; every later chunk is spoken in full, in order
        first_chunk = next(e for e in events if isinstance(e, ChunkText)).speech
        assert text.startswith(first_chunk[:4]) and not text.startswith(first_chunk)
        assert text.endswith("First we check the mail.Then we walk the dog.Last we cook.")
        assert len(dg.speak.sessions) >= 2
        # and the next turn is whole again
        events = await run_turn(runner, conv="x", text="again")
        assert isinstance(events[-1], TurnDone)
    finally:
        await tts.aclose()


async def test_bad_key_is_a_clear_message_and_the_turn_ends(dg, chat, tmp_path):
    tts = DeepgramTTS(api_key="wrong", url=dg.url)
    with pytest.raises(AuthError) as err:
        await tts.warm()
    assert "rejected the API key" in err.value.user_message
    runner = runner_for(chat, tmp_path, tts)
    events = await run_turn(runner)
    notices = [e.message for e in events if isinstance(e, TurnNotice)]
    assert any("rejected the API key" in n for n in notices)
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == REPLY
    await tts.aclose()


async def test_slow_first_audio_is_waited_for(dg, tmp_path):
    dg.speak.then(first_audio_s=0.6)
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    try:
        t0 = time.monotonic()
        clip = await tts.synthesize("Slow one.")
        assert decode_speech(clip.pcm16()) == "Slow one."
        assert time.monotonic() - t0 >= 0.6
    finally:
        await tts.aclose()


async def test_idle_socket_closed_by_the_service_is_reopened(dg, tmp_path):
    dg.speak.then(idle_close_s=0.2)
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    try:
        await tts.warm()
        await asyncio.sleep(0.5)  # the service closed it meanwhile
        await tts.warm()
        assert tts.pool.opened == 2
        clip = await tts.synthesize("Back.")
        assert decode_speech(clip.pcm16()) == "Back."
    finally:
        await tts.aclose()
