"""Semantic end of turn: Smart Turn v3.2 from the pipecat-ai wheel, on real audio,
through the real listener (silero VAD + Whisper) at real time."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from voiceclaw_app.bench.drive import dither, paced
from voiceclaw_app.bench.unseen import load_unseen
from voiceclaw_app.config import SettingsError, VoiceSettings
from voiceclaw_app.pipeline.timing import now_ms
from voiceclaw_app.providers.base import EndOfTurn, TurnVerdict
from voiceclaw_app.providers.local_listener import LocalListener
from voiceclaw_app.providers.local_stt import LocalWhisperSTT
from voiceclaw_app.providers.smart_turn import PauseJudge, SmartTurnV3, last_window


def _utt(name: str):
    (u,) = [u for u in load_unseen() if u.name == name]
    return u


def test_settings_turn_detection_is_validated():
    s = VoiceSettings()
    assert s.turn_detection == "smart_turn" and 2000 <= s.turn_max_wait_ms <= 3000
    assert VoiceSettings.from_dict({"turn_detection": "silence", "turn_max_wait_ms": "2500"}).turn_max_wait_ms == 2500
    with pytest.raises(SettingsError) as err:
        VoiceSettings.from_dict({"turn_detection": "guess", "turn_max_wait_ms": 100})
    assert set(err.value.errors) == {"turn_detection", "turn_max_wait_ms"}


def test_last_window_keeps_the_end_and_pads_the_front():
    a = np.arange(10 * 16000, dtype=np.float32)
    assert np.array_equal(last_window(a), a[-8 * 16000 :])
    short = np.ones(16000, dtype=np.float32)
    w = last_window(short)
    assert w.size == 8 * 16000 and w[0] == 0 and w[-1] == 1 and w.sum() == 16000


def test_pause_judge_words():
    judge = PauseJudge()
    yes, no = TurnVerdict(True, 0.9, 10.0), TurnVerdict(False, 0.1, 10.0)
    assert not judge.complete(yes, "Set a timer for")  # the model's "complete" cannot end on "for"
    assert not judge.complete(yes, "Send a message to my sister saying that I... and")
    assert judge.complete(no, "What time is it in Tokyo?")  # Whisper closed the sentence
    assert judge.complete(yes, "call me")
    assert not judge.complete(no, "turn on the lights in the living")
    assert not judge.complete(yes, "")
    assert PauseJudge(use_words=False).complete(yes, "Set a timer for")


@pytest.fixture(scope="module")
def analyzer() -> SmartTurnV3:
    st = SmartTurnV3()
    st._warm_sync()
    return st


@pytest.fixture(scope="module")
def stt() -> LocalWhisperSTT:
    engine = LocalWhisperSTT()
    engine._warm_sync()
    return engine


@pytest.mark.slow
async def test_model_scores_real_audio_off_the_event_loop(analyzer):
    utt = _utt("c_stop")
    pcm = utt.pcm[: 2 * (utt.last_voiced_sample + 2560)]
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1

    task = asyncio.create_task(ticker())
    verdicts = await asyncio.gather(*(analyzer.score(pcm) for _ in range(5)))
    task.cancel()
    assert all(0.0 <= v.probability <= 1.0 and v.ms > 0 for v in verdicts)
    assert len({round(v.probability, 4) for v in verdicts}) == 1  # deterministic
    assert ticks >= 3  # the loop kept running while the model worked
    # the scores follow the audio (the same numbers as pipecat's LocalSmartTurnAnalyzerV3
    # gives for these files: 0.94 and 0.03)
    alarm, weather = _utt("c_alarm"), _utt("h_weather")
    p_alarm = analyzer.score_sync(alarm.pcm[: 2 * (alarm.last_voiced_sample + 2560)]).probability
    p_weather = analyzer.score_sync(weather.pcm[: 2 * (weather.last_voiced_sample + 2560)]).probability
    assert p_alarm > 0.5 > p_weather, (p_alarm, p_weather)


async def _feed(listener: LocalListener, pcm: bytes, until_ms: float, expect: int = 1) -> tuple[list[EndOfTurn], float]:
    """Pace ``pcm`` (then mic noise) at real time for ``until_ms``; the ends of turn seen
    (waiting up to 15 s more for ``expect`` of them: Whisper is slow on a busy machine)."""
    got: list[EndOfTurn] = []

    async def collect():
        async for ev in listener.events():
            if isinstance(ev, EndOfTurn):
                got.append(ev)

    reader = asyncio.create_task(collect())
    rng = np.random.default_rng(5)
    t0 = now_ms() + 5.0
    async for _, frame, due in paced(pcm, 20, t0, pad=lambda n: dither(n, rng)):
        await listener.push(frame, due)
        if due - t0 > until_ms:
            break
    for _ in range(300):
        if len(got) >= expect:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # nothing more should come
    await listener.aclose()
    await asyncio.wait_for(reader, 5)
    return got, t0


@pytest.mark.slow
async def test_a_hesitation_is_not_cut_off(analyzer, stt):
    """"Add an appointment with ... (650 ms) Doctor Patel on Friday morning": one turn."""
    utt = _utt("h_doctor")
    # the model alone calls this pause complete (p 0.98): the words veto it. They may
    # take until vad_silence_ms to arrive (1.5 s here: Whisper on a busy machine)
    settings = VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=2500, vad_silence_ms=1500)
    listener = LocalListener(settings=settings, stt=stt, turn_analyzer=analyzer)
    got, t0 = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 2500)
    assert len(got) == 1, [e.text for e in got]
    assert "patel" in got[0].text.lower() and len(got[0].text.split()) >= 6  # both halves in one turn
    # the silence mode at 500 ms cuts the same audio in two
    plain = LocalListener(settings=settings.replace(turn_detection="silence", vad_silence_ms=500), stt=stt)
    got_plain, _ = await _feed(plain, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 1500, expect=2)
    assert len(got_plain) == 2


@pytest.mark.slow
async def test_a_finished_question_ends_well_before_the_ceiling(analyzer, stt):
    utt = _utt("c_rain")
    settings = VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000)
    listener = LocalListener(settings=settings, stt=stt, turn_analyzer=analyzer)
    got, t0 = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 3500)
    assert len(got) == 1
    speech_end = t0 + 1000.0 * (utt.last_voiced_sample + 1) / 16000
    # decided at the first pause (160 ms + the model + the pause's transcript), not at the 3 s ceiling
    assert got[0].eot_ms - speech_end < 2500, got[0].eot_ms - speech_end


@pytest.mark.slow
async def test_push_to_talk_ignores_the_model(analyzer, stt):
    """Push-to-talk: however finished the sentence sounds, only the release ends the turn."""
    utt = _utt("c_rain")
    listener = LocalListener(settings=VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=1000), stt=stt, turn_analyzer=analyzer)
    listener.set_hands_free(False)
    got: list[EndOfTurn] = []

    async def collect():
        async for ev in listener.events():
            if isinstance(ev, EndOfTurn):
                got.append(ev)

    reader = asyncio.create_task(collect())
    rng = np.random.default_rng(2)
    t0 = now_ms() + 5.0
    async for _, frame, due in paced(utt.pcm, 20, t0, pad=lambda n: dither(n, rng)):
        await listener.push(frame, due)
        if due - t0 > 1000.0 * utt.last_voiced_sample / 16000 + 1800:
            break
    await asyncio.sleep(0.3)
    assert got == []
    t_release = time.monotonic()
    await listener.finish_utterance()
    while not got and time.monotonic() - t_release < 10:
        await asyncio.sleep(0.05)
    await listener.aclose()
    await asyncio.wait_for(reader, 5)
    assert len(got) == 1 and "rain" in got[0].text.lower()
