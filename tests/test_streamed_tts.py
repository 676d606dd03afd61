"""TTS with streamed text in: Deepgram Aura (speak WebSocket, tests/servers/deepgram_speak.py) and
OpenAI Realtime (tests/servers/openai_realtime.py), each through its vendor's real SDK client,
and the scheduler's streamed path: order, grouping under the flush limit, cancel, cache, failover."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.servers.deepgram import FakeDeepgramServer
from tests.servers.openai_realtime import FakeRealtimeServer
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from tests.servers.speech_audio import decode_speech
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.events import AudioReady, ChunkText, TurnDone, TurnNotice
from voiceclaw_app.pipeline.tts_scheduler import FlushPolicy
from voiceclaw_app.pipeline.turn import TurnRunner
from voiceclaw_app.providers.base import AuthError, AudioClip, CancelToken
from voiceclaw_app.providers.deepgram_tts import DeepgramTTS
from voiceclaw_app.providers.openai_realtime_tts import OpenAIRealtimeTTS

REPLY = "Sure thing, here is the plan. First we check the mail. Then we walk the dog. Last we cook."


@pytest.fixture
async def dg():
    async with FakeDeepgramServer(api_key="dg") as srv:
        yield srv


class Service:
    """One streamed-text service under test: its fake server and how to build the client."""

    def __init__(self, kind: str, server):
        self.kind, self.server = kind, server

    def tts(self, key: str | None = None):
        if self.kind == "deepgram":
            return DeepgramTTS(api_key=key or "dg", url=self.server.url)
        return OpenAIRealtimeTTS(api_key=key or "sk", base_url=self.server.base_url)

    def fault(self, **kw) -> None:
        """close_mid_reply / first_audio_s, in either server's terms."""
        close = kw.pop("close_mid_reply", None)
        if self.kind == "deepgram":
            self.server.speak.then(close_after_frames=close, **kw)
        else:
            self.server.then(close_after_deltas=close, **kw)

    def slow(self, rtf: float) -> None:
        (self.server.speak.profile if self.kind == "deepgram" else self.server.profile).rtf = rtf

    @property
    def sockets(self) -> int:
        return len(self.server.speak.sessions if self.kind == "deepgram" else self.server.sessions)

    def requests(self) -> int:
        """Flushes (Aura) or responses (Realtime) asked for so far."""
        if self.kind == "deepgram":
            return sum(s.flushes for s in self.server.speak.sessions)
        return sum(len(s.responses) for s in self.server.sessions)

    def cancels(self) -> int:
        if self.kind == "deepgram":
            return sum(s.clears for s in self.server.speak.sessions)
        return sum(len(s.cancels) for s in self.server.sessions)


@pytest.fixture(params=["deepgram", "openai-realtime"])
async def service(request):
    srv = FakeDeepgramServer(api_key="dg") if request.param == "deepgram" else FakeRealtimeServer(api_key="sk")
    async with srv:
        yield Service(request.param, srv)


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


async def test_a_reply_streams_in_order_on_one_warm_socket(service, chat, tmp_path):
    tts = service.tts()
    runner = runner_for(chat, tmp_path, tts)
    try:
        await tts.warm()  # the user started speaking
        events = await run_turn(runner)
        assert isinstance(events[-1], TurnDone)
        assert heard(runner, events).replace(" ", "") == REPLY.replace(" ", "")
        assert service.sockets == 1
        if service.kind == "openai-realtime":  # no flush limit: one response per chunk, side by side
            assert service.requests() == len([e for e in events if isinstance(e, ChunkText)])
        # each AudioReady's text is the chunk whose audio it starts
        firsts = [e for e in events if isinstance(e, AudioReady) and e.part == 0]
        assert "".join(e.text for e in firsts).replace(" ", "") == REPLY.replace(" ", "")
    finally:
        await tts.aclose()


async def test_aura_short_reply_costs_two_flushes(dg, chat, tmp_path):
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        events = await run_turn(runner)
        chunks = [e for e in events if isinstance(e, ChunkText)]
        assert len(chunks) == 4
        # chunk 1 at once; the rest while its audio (seconds of it) plays, grouped: one more flush
        assert dg.speak.sessions[0].flushed == [chunks[0].speech, " " + " ".join(c.speech for c in chunks[1:])]
        assert heard(runner, events) == REPLY
        # grouped chunks play as one: the first's seq, the group's text
        parts0 = [e for e in events if isinstance(e, AudioReady) and e.part == 0]
        assert [e.seq for e in parts0] == [chunks[0].seq, chunks[1].seq]
        assert parts0[1].text == "".join(c.text for c in chunks[1:])
    finally:
        await tts.aclose()


async def test_aura_gets_the_reply_joined_exactly_as_sent(dg, chat, tmp_path):
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        events = await run_turn(runner)
        assert heard(runner, events) == REPLY
        assert "".join(dg.speak.sessions[0].texts) == REPLY  # spaces kept, none added
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
            # the first chunk, then one flush per group_chars of text or when the player runs low, and the end
            assert 2 <= sess.flushes <= 2 + len(long_reply) // FlushPolicy().group_chars + 2
            assert heard(runner, events) == long_reply
        finally:
            await tts.aclose()


async def test_flushes_wait_when_the_window_is_spent(dg, chat, tmp_path, monkeypatch):
    import voiceclaw_app.providers.deepgram_tts as aura

    # a tiny window on both sides: 2 flushes per 0.6 s, and one socket only
    dg.speak.profile.flush_limit, dg.speak.profile.flush_window_s = 2, 0.6
    monkeypatch.setattr(aura, "FLUSH_LIMIT", 2)
    monkeypatch.setattr(aura, "FLUSH_WINDOW_S", 0.6)
    monkeypatch.setattr(aura, "REPLY_FLUSHES", 0)
    tts = DeepgramTTS(api_key="dg", url=dg.url)
    runner = runner_for(chat, tmp_path, tts)
    try:
        for conv in ("a", "b", "c"):
            events = await run_turn(runner, conv=conv, text=f"hello {conv}")
            assert heard(runner, events).replace(" ", "") == REPLY.replace(" ", "")
        assert len(dg.speak.sessions) == 1
        assert dg.speak.sessions[0].refused_flushes == 0  # the client waited for the window instead
    finally:
        await tts.aclose()


async def test_quick_replies_move_to_a_second_socket_before_the_window_is_spent(dg, tmp_path):
    replies = iter(f"Yes {k}. Sure thing, item {k} is done now." for k in range(100))  # new text: no cache hits
    async with FakeChatServer(ChatBehavior(ttft_s=0.01, tokens_per_s=2000), reply_fn=lambda messages: next(replies)) as chat:
        dg.speak.profile.rtf = 0.01
        tts = DeepgramTTS(api_key="dg", url=dg.url)
        runner = runner_for(chat, tmp_path, tts)
        try:
            for k in range(14):  # ~2 flushes each: more than 20 in well under a minute
                await tts.warm()
                events = await run_turn(runner, conv=f"c{k}", text=f"question {k}")
                assert isinstance(events[-1], TurnDone)
            assert sum(s.refused_flushes for s in dg.speak.sessions) == 0
            assert len(dg.speak.sessions) == 2
            assert all(s.flushes <= 20 for s in dg.speak.sessions)
        finally:
            await tts.aclose()


async def test_barge_in_clears_and_nothing_of_the_cancelled_turn_is_delivered(service, chat, tmp_path):
    service.slow(1.0)  # audio as slow as real speech: the reply is still synthesizing
    tts = service.tts()
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
        for _ in range(50):
            if service.cancels():
                break
            await asyncio.sleep(0.02)
        assert service.cancels() >= 1
        # the same warm socket serves the next reply, without the cleared audio
        service.slow(0.05)
        events = await run_turn(runner, conv="d")
        assert heard(runner, events).replace(" ", "") == REPLY.replace(" ", "")
        assert service.sockets == 1
    finally:
        await tts.aclose()


async def test_repeated_reply_comes_from_the_cache(service, chat, tmp_path):
    tts = service.tts()
    runner = runner_for(chat, tmp_path, tts)
    try:
        await run_turn(runner, conv="a")
        asked = service.requests()
        events = await run_turn(runner, conv="b")
        assert heard(runner, events).replace(" ", "") == REPLY.replace(" ", "")
        if service.kind == "deepgram":
            # chunks are cached one by one; the grouped rest of the reply (one flush) is not
            assert service.requests() == asked + 1 and asked == 2
        else:
            assert service.requests() == asked  # every chunk was a cache hit
    finally:
        await tts.aclose()


async def test_socket_closed_mid_reply_the_rest_is_spoken_on_a_new_socket(service, chat, tmp_path):
    service.fault(close_mid_reply=3)
    tts = service.tts()
    runner = runner_for(chat, tmp_path, tts)
    try:
        events = await run_turn(runner)
        assert isinstance(events[-1], TurnDone)
        text = heard(runner, events)
        # the chunk cut mid-audio ends there; every later chunk is spoken in full, in order
        first_chunk = next(e for e in events if isinstance(e, ChunkText)).speech
        rest = "Firstwecheckthemail.Thenwewalkthedog.Lastwecook."
        t = text.replace(" ", "")
        assert t.endswith(rest)
        # the first chunk is whole (no piece had reached the player: spoken again) or ends where it was cut
        head = t[: -len(rest)]
        assert len(head) >= 4 and first_chunk.replace(" ", "").startswith(head)
        assert service.sockets >= 2
        # and the next turn is whole again
        events = await run_turn(runner, conv="x", text="again")
        assert isinstance(events[-1], TurnDone)
    finally:
        await tts.aclose()


async def test_bad_key_is_a_clear_message_and_the_turn_ends(service, chat, tmp_path):
    tts = service.tts(key="wrong")
    with pytest.raises(AuthError) as err:
        await tts.warm()
    assert "rejected the API key" in err.value.user_message
    runner = runner_for(chat, tmp_path, tts)
    events = await run_turn(runner)
    notices = [e.message for e in events if isinstance(e, TurnNotice)]
    assert any("rejected the API key" in n for n in notices)
    assert isinstance(events[-1], TurnDone) and events[-1].reply_text == REPLY
    await tts.aclose()


async def test_slow_first_audio_is_waited_for(service, tmp_path):
    service.fault(first_audio_s=0.6)
    tts = service.tts()
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


async def test_realtime_reads_out_of_band_with_read_exactly_instructions(chat, tmp_path):
    async with FakeRealtimeServer(api_key="sk") as rt:
        tts = OpenAIRealtimeTTS(api_key="sk", base_url=rt.base_url)
        runner = runner_for(chat, tmp_path, tts)
        try:
            events = await run_turn(runner)
            assert heard(runner, events).replace(" ", "") == REPLY.replace(" ", "")
            sess = rt.sessions[0]
            assert sess.query["model"] == "gpt-realtime-2.1-mini"
            assert sess.session_updates[0]["type"] == "realtime"
            for params in sess.responses:
                assert params["conversation"] == "none" and params["output_modalities"] == ["audio"]
                assert "exactly" in params["instructions"]
                assert params["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
            # each response carried one chunk's text, in order
            asked = [p["input"][0]["content"][0]["text"] for p in sess.responses]
            assert " ".join(asked) == REPLY
        finally:
            await tts.aclose()


async def test_realtime_logs_when_its_transcript_differs_from_the_text(caplog):
    async with FakeRealtimeServer(api_key="sk") as rt:
        rt.profile.reword = True
        tts = OpenAIRealtimeTTS(api_key="sk", base_url=rt.base_url)
        try:
            with caplog.at_level("WARNING", logger="voiceclaw.tts.realtime"):
                clip = await tts.synthesize("Open the door.")
            assert decode_speech(clip.pcm16()) == "Open a door."
            assert any("did not read the text verbatim" in r.getMessage() for r in caplog.records)
        finally:
            await tts.aclose()


async def test_realtime_bad_key_is_an_error_event_then_close_3000():
    async with FakeRealtimeServer(api_key="sk") as rt:
        tts = OpenAIRealtimeTTS(api_key="nope", base_url=rt.base_url)
        with pytest.raises(AuthError) as err:
            await tts.warm()
        assert "rejected the API key" in err.value.user_message
        assert rt.sessions[0].closed_code == 3000
        await tts.aclose()


async def test_fallback_voice_takes_over_when_the_stream_cannot_open(service, chat, tmp_path):
    from tests.fakes import ToneTTS
    from voiceclaw_app.providers.fallback import FallbackTTS

    tts = FallbackTTS(service.tts(key="wrong"), lambda: ToneTTS(0.0))
    assert tts.capabilities.text_stream  # the wrapper keeps the streamed path for the cloud voice
    runner = runner_for(chat, tmp_path, tts)
    events = await run_turn(runner)
    notices = [e.message for e in events if isinstance(e, TurnNotice)]
    assert any("rejected the API key" in n and "built-in voice" in n for n in notices)
    audio = [e for e in events if isinstance(e, AudioReady)]
    assert len(audio) == len([e for e in events if isinstance(e, ChunkText)])  # every chunk spoken by the embedded voice
    assert isinstance(events[-1], TurnDone)
    await tts.aclose()


class ThreadRecordingStore(AudioStore):
    """An audio store that notes the thread of every file write."""

    def __init__(self, root):
        super().__init__(root)
        self.writers: list[int] = []

    def save(self, clip, audio_id=None):
        import threading

        self.writers.append(threading.get_ident())
        return super().save(clip, audio_id)


async def test_reply_audio_is_written_off_the_event_loop(service, chat, tmp_path):
    """Clips and cache hits are files: written on the store's thread, never on the loop
    (a write there held a loaded worker's every microphone for 130-270 ms)."""
    import threading

    from voiceclaw_app.providers.openai_llm import OpenAICompatLLM

    tts = service.tts()
    store = ThreadRecordingStore(tmp_path / "audio")
    settings = VoiceSettings(llm_base_url=chat.base_url, llm_model_voice="m", tts_provider="deepgram")
    runner = TurnRunner(llm=OpenAICompatLLM(chat.base_url), tts=tts, audio_store=store, settings=settings)
    try:
        first = await run_turn(runner, conv="a")
        again = await run_turn(runner, conv="b")  # chunks from the cache: copied into the store
        assert heard(runner, again).replace(" ", "") == REPLY.replace(" ", "")
        assert len(store.writers) >= len([e for e in first + again if isinstance(e, AudioReady)]) > 0
        assert threading.get_ident() not in store.writers
    finally:
        await tts.aclose()
