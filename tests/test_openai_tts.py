"""OpenAITTS against a real local server speaking ``POST /v1/audio/speech``.

No HTTP mocking: the SDK's real transport talks to :class:`FakeSpeechServer` over TCP,
with its latency profile shortened and faults injected per request.
"""

from __future__ import annotations

import asyncio
import io
import time
import wave

import pytest

from tests.servers.openai_speech import MS_PER_CHAR, SAMPLE_RATE, FakeSpeechServer, SpeechBehavior
from voiceclaw_app.providers.base import AuthError, BadRequestError, CancelToken, ProviderTimeout, ServerError, StreamDropped
from voiceclaw_app.providers.openai_tts import OpenAITTS, tts_base_url_from_env

KEY = "sk-test-123"
FAST = SpeechBehavior(ttfb_s=0.02, realtime_factor=50.0)
TEXT = "Hello there, this is a test."


def tts_for(srv: FakeSpeechServer, **kw) -> OpenAITTS:
    kw.setdefault("backoff_s", (0.01, 0.02))
    return OpenAITTS(base_url=srv.base_url, api_key=KEY, **kw)


@pytest.mark.asyncio
async def test_pcm_streamed_and_wrapped_as_wav():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        tts = tts_for(srv, model="tts-1")
        clip = await tts.synthesize(TEXT, voice="nova", speed=1.25, cancel=CancelToken())
        body = srv.bodies[-1]
        assert body == {"model": "tts-1", "voice": "nova", "input": TEXT, "response_format": "pcm", "speed": 1.25}
        assert clip.sample_rate == SAMPLE_RATE
        with wave.open(io.BytesIO(clip.wav)) as w:
            assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SAMPLE_RATE)
            pcm = w.readframes(w.getnframes())
        assert pcm == srv.audio_for(TEXT, 1.25)
        assert clip.duration_ms == pytest.approx(len(TEXT) * MS_PER_CHAR / 1.25, abs=1)


@pytest.mark.asyncio
async def test_wav_format_header_with_unknown_sizes_is_parsed():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        clip = await tts_for(srv, response_format="wav").synthesize(TEXT, voice="alloy", speed=1.0)
        with wave.open(io.BytesIO(clip.wav)) as w:
            assert w.readframes(w.getnframes()) == srv.audio_for(TEXT)


@pytest.mark.asyncio
async def test_time_to_audio_follows_the_latency_profile_and_connection_is_reused():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.2, realtime_factor=5.0)) as srv:
        tts = tts_for(srv)
        await tts.warm()
        assert srv.connections == 1
        text = "Short one."  # 650 ms of audio -> 130 ms at 5x, plus 200 ms first byte
        t0 = time.monotonic()
        clip = await tts.synthesize(text, voice="alloy", speed=1.0)
        took = time.monotonic() - t0
        assert 0.3 <= took < 0.9, took
        assert clip.duration_ms == pytest.approx(650, abs=1)
        await tts.synthesize(text, voice="alloy", speed=1.0)
        assert srv.connections == 1  # warm() opened the one keep-alive connection everything used


@pytest.mark.asyncio
async def test_openai_base_url_env_never_redirects(monkeypatch):
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    monkeypatch.delenv("VOICECLAW_TTS_BASE_URL", raising=False)
    assert tts_base_url_from_env() == "https://api.openai.com/v1"
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        monkeypatch.setenv("VOICECLAW_TTS_BASE_URL", srv.base_url)
        tts = OpenAITTS(api_key=KEY)
        assert tts.base_url == srv.base_url
        await tts.synthesize(TEXT, voice="alloy", speed=1.0)
        assert srv.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(tts)


@pytest.mark.asyncio
async def test_bad_key_is_a_plain_auth_error_without_retry():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        tts = OpenAITTS(base_url=srv.base_url, api_key="sk-wrong")
        with pytest.raises(AuthError) as ei:
            await tts.synthesize(TEXT, voice="alloy", speed=1.0)
        assert "rejected the API key (HTTP 401)" in ei.value.user_message
        assert "sk-wrong" not in ei.value.user_message
        assert len(srv.requests) == 1


@pytest.mark.asyncio
async def test_missing_key_for_openai_says_so_before_any_request():
    with pytest.raises(AuthError, match="No OpenAI API key"):
        await OpenAITTS(base_url="https://api.openai.com/v1", api_key="").synthesize("hi", voice="alloy", speed=1.0)


@pytest.mark.asyncio
async def test_429_then_success_honours_retry_after():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        srv.then(status=429, retry_after="0.1")
        t0 = time.monotonic()
        clip = await tts_for(srv).synthesize(TEXT, voice="alloy", speed=1.0)
        assert time.monotonic() - t0 >= 0.1
        assert clip.duration_ms > 0
        assert len(srv.bodies) == 2


@pytest.mark.asyncio
async def test_500_retried_a_bounded_number_of_times_then_clear_error():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, status=500)) as srv:
        with pytest.raises(ServerError) as ei:
            await tts_for(srv, max_retries=2).synthesize(TEXT, voice="alloy", speed=1.0)
        assert "internal error (HTTP 500)" in ei.value.user_message
        assert len(srv.bodies) == 3


@pytest.mark.asyncio
async def test_400_is_not_retried():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        with pytest.raises(BadRequestError):
            await tts_for(srv).synthesize("x" * 5000, voice="alloy", speed=1.0)
        assert len(srv.requests) == 1


@pytest.mark.asyncio
async def test_drop_mid_body_is_retried_and_recovers():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        srv.then(drop_after_bytes=3000)
        clip = await tts_for(srv).synthesize(TEXT, voice="alloy", speed=1.0)
        with wave.open(io.BytesIO(clip.wav)) as w:
            assert w.readframes(w.getnframes()) == srv.audio_for(TEXT)  # no half chunk glued on


@pytest.mark.asyncio
async def test_drop_every_time_ends_in_stream_dropped():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, realtime_factor=50.0, drop_after_bytes=2000)) as srv:
        with pytest.raises(StreamDropped) as ei:
            await tts_for(srv, max_retries=1).synthesize(TEXT, voice="alloy", speed=1.0)
        assert "dropped" in ei.value.user_message
        assert len(srv.bodies) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("fault", [{"stall_before_headers": True}, {"stall_after_bytes": 4000}])
async def test_stall_times_out(fault):
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, realtime_factor=50.0, **fault)) as srv:
        t0 = time.monotonic()
        with pytest.raises(ProviderTimeout):
            await tts_for(srv, read_timeout_s=0.3).synthesize(TEXT, voice="alloy", speed=1.0)
        assert time.monotonic() - t0 < 2.0


@pytest.mark.asyncio
async def test_connection_refused_is_a_connect_error():
    from voiceclaw_app.providers.base import ConnectError

    srv = await FakeSpeechServer().start()
    url = srv.base_url
    await srv.stop()
    with pytest.raises(ConnectError):
        await OpenAITTS(base_url=url, api_key=KEY, max_retries=1, backoff_s=(0.01,)).synthesize(TEXT, voice="alloy", speed=1.0)


@pytest.mark.asyncio
async def test_cancel_stops_the_chunk():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.05, realtime_factor=1.0)) as srv:
        cancel = CancelToken()
        task = asyncio.create_task(tts_for(srv).synthesize(TEXT * 4, voice="alloy", speed=1.0, cancel=cancel))
        await asyncio.sleep(0.15)
        cancel.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 0.2


@pytest.mark.asyncio
async def test_parallel_chunks_do_not_mix():
    async with FakeSpeechServer(api_key=KEY, behavior=FAST) as srv:
        tts = tts_for(srv)
        texts = ["One sentence here.", "A second, longer sentence follows it.", "Three."]
        clips = await asyncio.gather(*(tts.synthesize(t, voice="alloy", speed=1.0) for t in texts))
        for t, c in zip(texts, clips):
            with wave.open(io.BytesIO(c.wav)) as w:
                assert w.readframes(w.getnframes()) == srv.audio_for(t)


@pytest.mark.asyncio
async def test_trickling_server_hits_the_chunk_deadline_scaled_to_the_text():
    # ~2 s of audio trickled at 4 KB/s (~0.08x real time): every read is fast, the chunk is not
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, realtime_factor=50.0)) as srv:
        tts = tts_for(srv, max_retries=0, read_timeout_s=2.0, chunk_base_s=0.3, chunk_s_per_char=0.01)
        assert tts.chunk_deadline_s(TEXT) == pytest.approx(0.3 + 0.01 * len(TEXT))
        assert tts.chunk_deadline_s(TEXT * 4) > tts.chunk_deadline_s(TEXT)  # longer chunk, longer deadline
        pieces = [c async for c in tts.synthesize_stream(TEXT, voice="alloy", speed=1.0)]  # a normal server is fine
        assert sum(c.duration_ms for c in pieces) > 1000
        for stream in (True, False):
            srv.then(trickle_bytes_per_s=4000.0)
            t0 = time.monotonic()
            with pytest.raises(ProviderTimeout) as ei:
                if stream:
                    async for _ in tts.synthesize_stream(TEXT, voice="alloy", speed=1.0):
                        pass
                else:
                    await tts.synthesize(TEXT, voice="alloy", speed=1.0)
            assert 0.5 <= time.monotonic() - t0 < 4.0, stream  # deadline ~0.6 s; slack for a loaded CI machine
            assert "for one sentence" in ei.value.user_message


@pytest.mark.asyncio
async def test_trickle_before_the_first_piece_is_retried_on_a_fresh_request():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, realtime_factor=50.0)) as srv:
        srv.then(trickle_bytes_per_s=2000.0)
        tts = tts_for(srv, max_retries=1, read_timeout_s=2.0, chunk_base_s=0.3, chunk_s_per_char=0.01)
        pieces = [c async for c in tts.synthesize_stream(TEXT, voice="alloy", speed=1.0)]
        assert len(srv.bodies) == 2 and sum(c.duration_ms for c in pieces) > 1000


@pytest.mark.asyncio
async def test_a_too_slow_whole_clip_attempt_is_retried_on_a_fresh_request():
    async with FakeSpeechServer(api_key=KEY, behavior=SpeechBehavior(ttfb_s=0.0, realtime_factor=50.0)) as srv:
        srv.then(trickle_bytes_per_s=2000.0)
        tts = tts_for(srv, max_retries=1, read_timeout_s=2.0, chunk_base_s=0.3, chunk_s_per_char=0.01)
        clip = await tts.synthesize(TEXT, voice="alloy", speed=1.0)
        assert len(srv.bodies) == 2 and clip.duration_ms > 1000
