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
async def test_a_backlog_of_frames_goes_out_as_few_messages_with_their_timing_kept():
    """A busy event loop lets frames queue; the writer sends what queued as one message
    (one send per 20 ms frame fell seconds behind in the 50-session load bench). The
    server must hear every byte, and words must still map to the frames' own clock."""
    async with FakeDeepgramServer(api_key=KEY, script=["What is the capital of France?"]) as srv:
        lst = make_listener(srv)
        await lst.start()
        t0 = 1_000_000.0
        pcm = silence(0.2) + tone(1.2)
        t = t0
        for k in range(0, len(pcm), 2 * FRAME):  # no pause between frames: the writer cannot run meanwhile
            t += FRAME / RATE * 1000.0
            await lst.push(pcm[k : k + 2 * FRAME], t)
        t_speech_end = t
        await push_audio(lst, silence(0.6), t_speech_end)
        eot = (await collect_until(lst, (EndOfTurn,)))[-1]
        assert isinstance(eot, EndOfTurn) and eot.text == "What is the capital of France?"
        assert abs(eot.speech_end_ms - t_speech_end) <= 25
        sent, sends = lst.stats["frames_sent"], lst.stats["sends"]
        assert sent >= (1.2 + 0.6) / 0.02 - 2
        assert sends <= sent - 50, (sends, sent)  # the unpaced frames went out in a few messages (the paced silence one by one)
        assert srv.sessions[0].audio_bytes == sent * 2 * FRAME
        await lst.aclose()


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
    # Deepgram's SpeechStarted crosses the network (here 40 ms each way of a cloud hop);
    # without it the fake's 50 ms of audio beat our gate's 64 ms by a few ms of wall time
    # or lost, as scheduling went (a flake seen once in a fresh-clone run)
    async with FakeDeepgramServer(api_key=KEY, script=["Stop."], profile=DeepgramProfile(message_delay_s=0.04)) as srv:
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


# ---------------------------------------------------------------- barge-in re-arming, tentative onsets
@pytest.mark.asyncio
@pytest.mark.parametrize("gate", ["deepgram", "vad"])
async def test_speech_start_reported_again_after_silence_with_no_words(gate):
    # a noise burst / echo gives a speech start but no words and no end of turn (the
    # session's echo guard ignored it); the user's real speech after >= 300 ms of
    # silence must be reported too
    from voiceclaw_app.providers.deepgram_stt import rms16

    async with FakeDeepgramServer(api_key=KEY, script=(["Stop talking."] if gate == "vad" else ["", "Stop talking."])) as srv:
        if gate == "vad":  # our gate hears the quiet burst, Deepgram (threshold 400) does not
            lst = make_listener(srv, vad=lambda pcm: rms16(pcm) > 300)
            loud = tone(0.3)
            burst = struct.pack(f"<{len(loud) // 2}h", *(v // 12 for v in struct.unpack(f"<{len(loud) // 2}h", loud)))  # RMS ~350
        else:  # Deepgram's SpeechStarted, an empty segment, no endpointing: nothing ends a turn
            lst = DeepgramListener(api_key=KEY, url=srv.url, options=DeepgramOptions(endpointing_ms=0, utterance_end_ms=1000), silence_stream_ms=1500)
            burst = tone(0.3)
        await lst.start()
        t = await push_audio(lst, burst + silence(0.5), 0.0)
        first = await collect_until(lst, (SpeechStarted,))
        assert first[-1].t_ms < 100
        t = await push_audio(lst, tone(0.6) + silence(1.4), t)
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "Stop talking."
        again = [e for e in events if isinstance(e, SpeechStarted) and not e.tentative]
        assert len(again) == 1 and abs(again[0].t_ms - 800) <= 25, events
        await lst.aclose()


@pytest.mark.asyncio
async def test_vad_onset_is_tentative_then_discarded_or_confirmed():
    from voiceclaw_app.providers.base import SpeechDiscarded
    from voiceclaw_app.providers.deepgram_stt import rms16

    # Deepgram's own SpeechStarted comes late here, so the server VAD decides
    async with FakeDeepgramServer(api_key=KEY, script=["", "Wait a second."], profile=DeepgramProfile(speech_started_after_s=0.5)) as srv:
        lst = make_listener(srv, vad=lambda pcm: rms16(pcm) > 300, vad_min_speech_ms=200)
        await lst.start()
        t = await push_audio(lst, silence(0.1) + tone(0.1) + silence(0.4), 0.0)  # a cough
        events = await collect_until(lst, (SpeechDiscarded,))
        starts = [e for e in events if isinstance(e, SpeechStarted)]
        assert len(starts) == 1 and starts[0].tentative and starts[0].source == "vad"
        assert abs(starts[0].t_ms - 100) <= 25
        t = await push_audio(lst, tone(0.8) + silence(0.6), t)
        events = await collect_until(lst, (EndOfTurn,))
        starts = [e for e in events if isinstance(e, SpeechStarted)]
        assert [s.tentative for s in starts] == [True, False], events  # pause playback, then cancel the reply
        assert not any(isinstance(e, SpeechDiscarded) for e in events)
        assert events[-1].text == "Wait a second."
        assert lst.stats["vad_calls"] > 0
        await lst.aclose()


@pytest.mark.asyncio
async def test_vad_failure_falls_back_to_the_energy_gate():
    from voiceclaw_app.providers.base import EngineUnavailable

    def broken(pcm: bytes) -> bool:
        raise EngineUnavailable("Voice detection stopped working.")

    async with FakeDeepgramServer(api_key=KEY, script=["Still here."]) as srv:
        lst = make_listener(srv, vad=broken)
        await lst.start()
        await push_audio(lst, tone(0.5) + silence(0.6), 0.0)  # push() must not raise
        events = await collect_until(lst, (EndOfTurn,))
        assert events[-1].text == "Still here." and lst.vad is None
        await lst.aclose()


# ---------------------------------------------------------------- push-to-talk, mode switches
@pytest.mark.asyncio
@pytest.mark.parametrize("combined", [False, True])
async def test_push_to_talk_pause_and_linger_do_not_end_the_turn(combined):
    # speech_final (separate or on the is_final result) and UtteranceEnd fire during the
    # held button; only the release ends the turn, with both segments
    async with FakeDeepgramServer(api_key=KEY, script=["What is the weather", "in Paris tomorrow?"], profile=DeepgramProfile(combined_final=combined)) as srv:
        lst = make_listener(srv)
        lst.set_hands_free(False)  # what the mic session does at build time
        await lst.start()
        t = await push_audio(lst, tone(0.6) + silence(0.6), 0.0)
        t = await push_audio(lst, tone(0.6) + silence(1.4), t)  # linger before release
        for _ in range(200):  # the server's answers to that audio (it may lag on a loaded machine)
            sent = srv.sessions[0].sent
            if any(m.get("speech_final") for m in sent) and any(m["type"] == "UtteranceEnd" for m in sent):
                break
            await asyncio.sleep(0.02)
        assert any(m.get("speech_final") for m in sent) and any(m["type"] == "UtteranceEnd" for m in sent)
        await asyncio.sleep(0.1)
        await lst.finish_utterance()
        events = await collect_until(lst, (EndOfTurn, ListenNotice))
        assert isinstance(events[-1], EndOfTurn), events
        assert events[-1].text == "What is the weather in Paris tomorrow?"
        assert [e for e in events if isinstance(e, EndOfTurn)] == [events[-1]]
        assert lst.stats["frames_sent"] >= 3.2 / 0.02 - 2  # push-to-talk streams everything
        await lst.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("combined", [False, True])
async def test_mode_switch_mid_session_takes_effect(combined):
    async with FakeDeepgramServer(api_key=KEY, script=["First question.", "Second one."], profile=DeepgramProfile(combined_final=combined)) as srv:
        lst = make_listener(srv, hands_free=False, silence_stream_ms=400)
        await lst.start()
        t = await push_audio(lst, tone(0.5) + silence(0.6), 0.0)
        await lst.finish_utterance()
        assert (await collect_until(lst, (EndOfTurn,)))[-1].text == "First question."
        lst.set_hands_free(True)
        t = await push_audio(lst, tone(0.5) + silence(0.5), t)
        events = await collect_until(lst, (EndOfTurn,))  # endpointing ends it, no release
        assert events[-1].text == "Second one."
        assert (not combined) == any(isinstance(e, PreliminaryTranscript) for e in events)
        before = lst.stats["frames_sent"]
        await push_audio(lst, silence(1.0), t, speed=8.0)
        assert lst.stats["frames_sent"] - before <= 0.4 / 0.02 + 1  # hands-free: long silence not streamed
        await lst.aclose()


# ---------------------------------------------------------------- reconnects that lose the end of turn
@pytest.mark.asyncio
@pytest.mark.parametrize("speed", [4.0, 1.0])
async def test_drop_between_is_final_and_speech_final_still_ends_the_turn(speed):
    srv = FakeDeepgramServer(api_key=KEY, script=["Call my mother."])
    srv.then(drop_after_is_final=True)
    async with srv:
        lst = make_listener(srv)
        await lst.start()
        t_end = await push_audio(lst, silence(0.1) + tone(0.7), 0.0, speed=speed)
        t = await push_audio(lst, silence(0.9), t_end, speed=speed)
        events = await collect_until(lst, (EndOfTurn, ListenNotice), timeout=3.0)
        assert isinstance(events[-1], EndOfTurn), events
        assert events[-1].text == "Call my mother." and abs(events[-1].speech_end_ms - t_end) <= 25
        assert srv.sessions[0].dropped and len(srv.sessions) == 2 and srv.sessions[1].finalizes == 1
        assert lst.stats["local_endpoints"] == 1 and srv.finalized == ["Call my mother."]
        # the turn is over: the long silence after it is not streamed any more
        before = lst.stats["frames_sent"]
        await push_audio(lst, silence(2.5), t, speed=8.0)
        assert lst.stats["frames_sent"] - before <= 1.5 / 0.02 + 1
        await lst.aclose()


@pytest.mark.asyncio
async def test_watchdog_reconnects_when_the_server_goes_silent():
    srv = FakeDeepgramServer(api_key=KEY, script=["Are you there?", "Are you there?"])
    srv.then(mute_after_audio_s=0.2)
    async with srv:
        lst = make_listener(srv, watchdog_s=0.4)
        await lst.start()
        t = await push_audio(lst, tone(1.2), 0.0, speed=1.0)
        await push_audio(lst, silence(0.8), t, speed=2.0)
        events = await collect_until(lst, (EndOfTurn,), timeout=4.0)
        assert events[-1].text == "Are you there?"
        assert srv.sessions[0].muted > 0 and not srv.sessions[0].dropped
        assert lst.stats["watchdog_reconnects"] >= 1 and lst.stats["replayed_frames"] > 0
        await lst.aclose()


# ---------------------------------------------------------------- start retries, recovery without fallback
@pytest.mark.asyncio
async def test_start_retries_rate_limit_and_server_errors():
    srv = FakeDeepgramServer(api_key=KEY, script=["Hi."])
    srv.then(reject_status=429).then(reject_status=503)
    async with srv:
        lst = make_listener(srv, start_backoff_s=(0.05,))
        await lst.start()
        assert lst.stats["start_attempts"] == 3 and len(srv.sessions) == 1
        await lst.aclose()
    srv = FakeDeepgramServer(api_key=KEY)
    srv.then(reject_status=503).then(reject_status=503).then(reject_status=503)
    async with srv:
        from voiceclaw_app.providers.base import ServerError

        with pytest.raises(ServerError):
            await make_listener(srv, start_backoff_s=(0.01,)).start()  # bounded: 3 attempts


@pytest.mark.asyncio
async def test_failed_session_keeps_the_mic_alive_and_recovers():
    srv = FakeDeepgramServer(api_key=KEY, script=["Hello again."])
    srv.then(drop_after_audio_s=0.3).then(reject_status=503).then(reject_status=503)
    async with srv:
        lst = make_listener(srv, max_reconnects=2, recover_backoff_s=(0.3,))
        await lst.start()
        t = await push_audio(lst, tone(0.4) + silence(0.3), 0.0)
        events = await collect_until(lst, (ListenNotice,))
        assert events[-1].kind == "error" and "internal error (HTTP 503)" in events[-1].message
        await asyncio.sleep(0.3)
        t = await push_audio(lst, tone(0.6) + silence(0.6), t)  # the next voiced frame re-opens
        events = await collect_until(lst, (EndOfTurn,), timeout=4.0)
        assert any(isinstance(e, ListenNotice) and e.kind == "info" and "back" in e.message for e in events)
        assert events[-1].text == "Hello again." and lst.failed is None and lst.stats["recoveries"] == 1
        await lst.aclose()


@pytest.mark.asyncio
async def test_push_to_talk_drop_mid_utterance_then_release():
    srv = FakeDeepgramServer(api_key=KEY, script=["Turn it up."])
    srv.then(drop_after_audio_s=0.5)
    async with srv:
        lst = make_listener(srv, hands_free=False)
        await lst.start()
        await push_audio(lst, tone(0.8) + silence(0.06), 0.0)
        await lst.finish_utterance()
        events = await collect_until(lst, (EndOfTurn, ListenNotice))
        assert isinstance(events[-1], EndOfTurn) and events[-1].text == "Turn it up."
        assert lst.stats["reconnects"] == 1 and srv.sessions[-1].finalizes >= 1
        await lst.aclose()


async def test_the_sdk_client_is_built_once_per_loop_key_and_address():
    """Building the SDK client builds an httpx client and its SSL context (the CA bundle
    read, on the event loop): once per key and address, not at every listener start."""
    from voiceclaw_app.providers.deepgram_stt import _client

    a = _client("key-a", "ws://127.0.0.1:9")
    assert _client("key-a", "ws://127.0.0.1:9") is a
    assert _client("key-b", "ws://127.0.0.1:9") is not a  # a key only goes where it was saved for
    assert _client("key-a", "ws://127.0.0.1:10") is not a
