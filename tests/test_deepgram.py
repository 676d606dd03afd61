"""DeepgramListener / DeepgramSTT against a local server speaking Deepgram's protocol.

The real SDK connects over a real WebSocket to :class:`FakeDeepgramServer`; audio is
pushed as 20 ms PCM frames (a tone for speech, zeros for silence). The server times
its results on audio time, so most tests push faster than real time; tests about
wall-clock behaviour (keep-alive) pace at real time.
"""

from __future__ import annotations

import asyncio
import math
import struct
import time

import pytest

from tests.servers.deepgram import DeepgramProfile, FakeDeepgramServer
from voiceclaw_app.providers.base import AuthError, EndOfTurn, InterimTranscript, ListenNotice, PreliminaryTranscript, SpeechStarted
from voiceclaw_app.providers.deepgram_stt import DeepgramListener, DeepgramOptions, DeepgramSTT, deepgram_environment

KEY = "dg-test-key"
RATE = 16000
FRAME = 320  # samples per 20 ms


def tone(seconds: float) -> bytes:
    n = int(seconds * RATE)
    return b"".join(struct.pack("<h", int(6000 * math.sin(2 * math.pi * 200 * i / RATE))) for i in range(n))


def silence(seconds: float) -> bytes:
    return b"\x00\x00" * int(seconds * RATE)


async def push_audio(listener: DeepgramListener, pcm: bytes, t0_ms: float, speed: float = 4.0) -> float:
    """Push 20 ms frames stamped on an audio clock starting at ``t0_ms``; returns the end t_ms."""
    wall0 = time.monotonic()
    t = t0_ms
    for k in range(0, len(pcm), 2 * FRAME):
        frame = pcm[k : k + 2 * FRAME]
        t += len(frame) / 2 / RATE * 1000.0
        await listener.push(frame, t)
        ahead = (t - t0_ms) / 1000.0 / speed - (time.monotonic() - wall0)
        if ahead > 0:
            await asyncio.sleep(ahead)
    return t


async def collect_until(listener: DeepgramListener, kinds: tuple, timeout: float = 3.0) -> list:
    out = []
    async with asyncio.timeout(timeout):
        async for ev in listener.events():
            out.append(ev)
            if isinstance(ev, kinds):
                return out
    return out


def make_listener(srv: FakeDeepgramServer, **kw) -> DeepgramListener:
    kw.setdefault("silence_stream_ms", 1500)
    return DeepgramListener(api_key=KEY, url=srv.url, options=DeepgramOptions(endpointing_ms=300, utterance_end_ms=1000), **kw)


def test_environment_from_url():
    env = deepgram_environment("https://api.deepgram.com/v1/")
    assert (env.base, env.production) == ("https://api.deepgram.com", "wss://api.deepgram.com")
    env = deepgram_environment("http://127.0.0.1:8080")
    assert (env.base, env.production) == ("http://127.0.0.1:8080", "ws://127.0.0.1:8080")


@pytest.mark.asyncio
async def test_normal_turn_interims_preliminary_then_end_of_turn():
    async with FakeDeepgramServer(api_key=KEY, script=["What is the capital of France?"]) as srv:
        lst = make_listener(srv)
        await lst.start()
        assert len(srv.sessions) == 1  # socket open at session start, before any speech
        q = srv.sessions[0].query
        assert q["model"] == "nova-3" and q["encoding"] == "linear16" and q["sample_rate"] == "16000"
        assert q["interim_results"] == "true" and q["vad_events"] == "true" and q["smart_format"] == "true"
        assert q["endpointing"] == "300" and q["utterance_end_ms"] == "1000"
        assert srv.sessions[0].headers.get("x-deepgram-session-id")
        t0 = 1_000_000.0
        t_speech_end = await push_audio(lst, silence(0.2) + tone(1.2), t0)
        await push_audio(lst, silence(0.6), t_speech_end)
        events = await collect_until(lst, (EndOfTurn,))
        kinds = [type(e) for e in events]
        assert kinds[0] is SpeechStarted and events[0].source == "stt"
        assert abs(events[0].t_ms - (t0 + 200)) <= 25  # mapped to the frames' clock
        interims = [e for e in events if isinstance(e, InterimTranscript)]
        assert len(interims) >= 4  # every 200 ms during 1.2 s of speech
        assert all("What" in e.text for e in interims)
        assert kinds.index(PreliminaryTranscript) < kinds.index(EndOfTurn)
        pre = next(e for e in events if isinstance(e, PreliminaryTranscript))
        eot = events[-1]
        assert pre.text == eot.text == "What is the capital of France?"
        assert abs(eot.speech_end_ms - t_speech_end) <= 25  # the last word's end, not the decision
        assert eot.eot_ms >= eot.stt_final_ms - 1
        await lst.aclose()
        s = srv.sessions[0]
        assert s.close_stream and s.closed_code == 1000
        assert s.sent[-1]["type"] == "Metadata"


@pytest.mark.asyncio
async def test_pause_gives_preliminary_then_user_keeps_talking():
    # is_final after 150 ms of silence, but speech resumes before speech_final (300 ms)
    async with FakeDeepgramServer(api_key=KEY, script=["What is the", "capital of France?"]) as srv:
        lst = make_listener(srv)
        await lst.start()
        t = await push_audio(lst, tone(0.6) + silence(0.22), 0.0)
        events = await collect_until(lst, (PreliminaryTranscript,))
        assert events[-1].text == "What is the"
        t = await push_audio(lst, tone(0.6) + silence(0.5), t)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "What is the capital of France?"
        assert [e.text for e in events if isinstance(e, PreliminaryTranscript)] == ["What is the capital of France?"]
        assert not any(isinstance(e, SpeechStarted) for e in events)  # one barge-in per turn
        await lst.aclose()


@pytest.mark.asyncio
async def test_combined_is_final_speech_final_message():
    async with FakeDeepgramServer(api_key=KEY, script=["Hello there."], profile=DeepgramProfile(combined_final=True)) as srv:
        lst = make_listener(srv)
        await lst.start()
        await push_audio(lst, tone(0.8) + silence(0.5), 0.0)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "Hello there."
        assert not any(isinstance(e, PreliminaryTranscript) for e in events)
        await lst.aclose()


@pytest.mark.asyncio
async def test_utterance_end_ends_the_turn_when_endpointing_is_off():
    async with FakeDeepgramServer(api_key=KEY, script=["Noisy room here."]) as srv:
        lst = DeepgramListener(api_key=KEY, url=srv.url, options=DeepgramOptions(endpointing_ms=0, utterance_end_ms=1000))
        await lst.start()
        assert srv.sessions[0].query["endpointing"] == "false"
        t = await push_audio(lst, tone(0.6), 0.0)
        await push_audio(lst, silence(1.3), t, speed=8.0)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "Noisy room here."
        assert any(m["type"] == "UtteranceEnd" for m in srv.sessions[0].sent)
        await lst.aclose()


@pytest.mark.asyncio
async def test_bad_key_is_rejected_at_handshake():
    async with FakeDeepgramServer(api_key=KEY) as srv:
        lst = DeepgramListener(api_key="wrong", url=srv.url)
        with pytest.raises(AuthError) as ei:
            await lst.start()
        assert "Deepgram" in ei.value.user_message and "rejected the API key (HTTP 401)" in ei.value.user_message
        assert "wrong" not in ei.value.user_message
        assert srv.sessions == []


@pytest.mark.asyncio
async def test_missing_key_for_the_real_service():
    with pytest.raises(AuthError, match="No Deepgram API key"):
        await DeepgramListener(api_key="", url="https://api.deepgram.com").start()


@pytest.mark.asyncio
async def test_reconnect_after_drop_keeps_final_words_and_replays_unfinished_audio():
    # segment 1 is final before the drop; the socket dies 50 ms after segment 2's speech
    # ends, before its is_final: only a replay of that audio can recover those words.
    srv = FakeDeepgramServer(api_key=KEY, script=["Book a table", "for two tonight."])
    srv.then(drop_after_audio_s=0.6 + 0.22 + 0.7 + 0.05)
    async with srv:
        lst = make_listener(srv)
        await lst.start()
        t = await push_audio(lst, tone(0.6) + silence(0.22), 0.0)
        await collect_until(lst, (PreliminaryTranscript,))
        t_end = await push_audio(lst, tone(0.7), t)
        await push_audio(lst, silence(0.6), t_end)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "Book a table for two tonight."
        assert abs(events[-1].speech_end_ms - t_end) <= 25
        assert len(srv.sessions) == 2 and srv.sessions[0].dropped
        assert lst.stats["reconnects"] == 1 and lst.stats["replayed_frames"] > 0
        assert srv.finalized == ["Book a table", "for two tonight."]  # nothing transcribed twice
        await lst.aclose()


@pytest.mark.asyncio
async def test_reconnect_refused_reports_error_notice():
    srv = FakeDeepgramServer(api_key=KEY, script=["Hello"])
    srv.then(drop_after_audio_s=0.3).then(reject_status=401)
    async with srv:
        lst = make_listener(srv)
        await lst.start()
        await push_audio(lst, tone(0.5), 0.0)
        events = await collect_until(lst, (ListenNotice,))
        assert events[-1].kind == "error" and "rejected the API key" in events[-1].message
        assert lst.failed is not None
        await lst.aclose()


@pytest.mark.asyncio
async def test_hands_free_silence_not_streamed_keepalive_instead():
    async with FakeDeepgramServer(api_key=KEY, script=["Hi."]) as srv:
        lst = make_listener(srv, silence_stream_ms=400, keepalive_s=0.25)
        await lst.start()
        await push_audio(lst, silence(0.4), 0.0, speed=8.0)  # leading silence: nothing sent
        assert lst.stats["frames_sent"] == 0
        t = await push_audio(lst, tone(0.4), 400.0, speed=8.0)
        t = await push_audio(lst, silence(0.6), t, speed=8.0)
        await collect_until(lst, (EndOfTurn,))
        sent_before = srv.sessions[0].audio_bytes
        await push_audio(lst, silence(1.2), t, speed=1.0)  # long silence, real time
        s = srv.sessions[0]
        assert s.audio_bytes == sent_before  # silence not streamed
        assert s.keepalives >= 3 and not s.dropped and s.closed_code is None
        # the pre-roll (300 ms before the onset) was sent with the speech
        assert lst.stats["frames_sent"] >= (0.3 + 0.4 + 0.4) / 0.02 - 2
        await lst.aclose()


@pytest.mark.asyncio
async def test_server_idle_timeout_without_keepalive_is_survived():
    # keep-alive disabled: the server closes with 1011 after idle; the listener reconnects
    async with FakeDeepgramServer(api_key=KEY, script=["One.", "Two."], profile=DeepgramProfile(idle_timeout_s=0.3)) as srv:
        lst = make_listener(srv, keepalive_s=60.0, silence_stream_ms=300)
        await lst.start()
        t = await push_audio(lst, tone(0.4) + silence(0.5), 0.0, speed=8.0)
        assert (await collect_until(lst, (EndOfTurn,)))[-1].text == "One."
        await asyncio.sleep(0.6)
        assert srv.sessions[0].closed_code == 1011
        t = await push_audio(lst, tone(0.4) + silence(0.5), t + 1000, speed=8.0)
        assert (await collect_until(lst, (EndOfTurn,)))[-1].text == "Two."
        await lst.aclose()


@pytest.mark.asyncio
async def test_push_to_talk_release_sends_finalize_and_ends_turn_at_once():
    # endpointing would take 300 ms of silence; Finalize ends the turn right away
    async with FakeDeepgramServer(api_key=KEY, script=["Turn on the lights."]) as srv:
        lst = make_listener(srv, hands_free=False)
        await lst.start()
        await push_audio(lst, tone(0.8) + silence(0.04), 0.0)
        t_release = time.monotonic()
        await lst.finish_utterance()
        events = await collect_until(lst, (EndOfTurn,))
        assert time.monotonic() - t_release < 0.5  # without Finalize no result would come at all
        assert events[-1].text == "Turn on the lights."
        s = srv.sessions[0]
        assert s.finalizes == 1
        assert any(m.get("from_finalize") for m in s.sent)
        await lst.aclose()


@pytest.mark.asyncio
async def test_push_to_talk_release_with_nothing_said():
    async with FakeDeepgramServer(api_key=KEY) as srv:
        lst = make_listener(srv, hands_free=False)
        await lst.start()
        await push_audio(lst, silence(0.3), 0.0)
        await lst.finish_utterance()
        events = await collect_until(lst, (ListenNotice, EndOfTurn))
        assert isinstance(events[-1], ListenNotice) and events[-1].kind == "empty"
        await lst.aclose()


@pytest.mark.asyncio
async def test_local_vad_reports_barge_in_before_deepgram():
    async with FakeDeepgramServer(api_key=KEY, script=["Stop."]) as srv:
        from voiceclaw_app.providers.deepgram_stt import rms16

        lst = make_listener(srv, vad=lambda pcm: rms16(pcm) > 300)
        await lst.start()
        await push_audio(lst, silence(0.1) + tone(0.5) + silence(0.5), 0.0)
        events = await collect_until(lst, (EndOfTurn,))
        started = [e for e in events if isinstance(e, SpeechStarted)]
        assert len(started) == 1 and started[0].source == "vad"
        assert abs(started[0].t_ms - 100) <= 25
        await lst.aclose()


@pytest.mark.asyncio
async def test_prerecorded_fallback_and_errors():
    async with FakeDeepgramServer(api_key=KEY, script=["Good morning.", "How are you?"]) as srv:
        stt = DeepgramSTT(api_key=KEY, url=srv.url)
        result = await stt.transcribe(tone(0.5) + silence(0.5) + tone(0.5), sample_rate=RATE)
        assert result.text == "Good morning. How are you?"
        assert srv.prerecorded[-1]["model"] == "nova-3" and srv.prerecorded[-1]["smart_format"] == "true"
        srv.http_faults.extend([503])
        srv.say("Again.")
        assert (await stt.transcribe(tone(0.4), sample_rate=RATE)).text == "Again."  # retried after 503
        with pytest.raises(AuthError, match="rejected the API key"):
            await DeepgramSTT(api_key="bad", url=srv.url).transcribe(tone(0.2))
