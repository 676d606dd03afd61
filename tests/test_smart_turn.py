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
from voiceclaw_app.providers.base import STT, EndOfTurn, EngineUnavailable, PreliminaryTranscript, TextTurnAnalyzer, Transcript, TurnAnalyzer, TurnVerdict
from voiceclaw_app.providers.local_listener import LocalListener
from voiceclaw_app.providers.local_stt import LocalWhisperSTT
from voiceclaw_app.providers.smart_turn import PauseJudge, SmartTurnV3, last_window
from voiceclaw_app.providers.text_turn import GemmaTextTurn, words_for_scoring


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


def test_pause_judge_lets_clear_words_lead_and_the_sound_break_ties():
    judge = PauseJudge()
    yes, no = TurnVerdict(True, 0.9, 10.0), TurnVerdict(False, 0.1, 10.0)

    def words(p: float) -> TurnVerdict:
        return TurnVerdict(p >= 0.05, p, 5.0)

    assert not judge.complete(yes, "Tell me about the", words(0.9))  # never on "the"
    # a question may end on a preposition: then only clear words end the turn, not the sound
    assert judge.complete(no, "What gate does flight 249 leave from?", words(0.57))
    assert not judge.complete(yes, "Set a timer for", words(0.05)) and not judge.needs_sound("Set a timer for", words(0.05))
    # numbers are words: "at 10" ends on "10", not on "at"
    assert judge.complete(yes, "Schedule a meeting with Priya on Tuesday at 10.", words(0.03)) and judge.needs_sound("Schedule a meeting on Tuesday at 10.", words(0.03))
    assert not judge.complete(yes, "Remind me to buy.", words(0.005))  # the words: unfinished, whatever the sound and the "."
    assert judge.complete(no, "What time is it in Tokyo?", words(0.9))  # the words: finished
    assert judge.complete(yes, "Yes.", words(0.05)) and not judge.complete(no, "Yes.", words(0.05))  # unclear words: the sound
    assert not judge.complete(yes, "", None) and not judge.complete(yes, "call me", None)
    assert PauseJudge(use_words=False).complete(yes, "Set a timer for")
    # the sound is only scored where it decides: between the clear words' bounds, no doubt
    assert judge.needs_sound("Yes.", words(0.05)) and not judge.needs_sound("Yes.", words(0.05), doubted=True)
    assert not judge.needs_sound("What time is it in Tokyo?", words(0.9)) and not judge.needs_sound("Remind me to buy.", words(0.005))
    assert not judge.needs_sound("Tell me about the", words(0.9)) and PauseJudge(use_words=False).needs_sound()
    assert not judge.complete(None, "Yes.", words(0.05)) and judge.complete(None, "What time is it in Tokyo?", words(0.9))


def test_a_doubted_last_word_is_left_out_of_the_judged_words():
    judge = PauseJudge()
    assert judge.trusted_words("Turn on the lights in there.", (0.9, 0.95, 0.9, 0.24, 0.9, 0.47)) == "Turn on the lights in"
    assert judge.trusted_words("What is the tallest mountain in Africa?", (0.99,) * 6 + (0.98,)) == "What is the tallest mountain in Africa?"
    assert judge.trusted_words("Kanata", (0.2,)) == ""  # nothing left: unfinished
    assert judge.trusted_words("Find me a recipe for it.", None) == "Find me a recipe for it."  # not known: as it is
    # a made-up ending of several words goes whole, and never a word before a trusted one
    assert judge.trusted_words("What is the Papiore shohan?", (0.9, 0.9, 0.9, 0.3, 0.16)) == "What is the"
    assert judge.trusted_words("Who wrote Pride and Prejudice?", (0.9, 0.9, 0.4, 0.9, 0.39)) == "Who wrote Pride and"
    # the recognizer's word split may differ at the start: the end is what is read
    assert judge.trusted_words("I paid $15 in there", (0.9, 0.9, 0.3)) == "I paid $15 in"
    assert judge.trusted_words("Turn it on", (0.1, 0.2, 0.3, 0.4)) == ""
    yes = TurnVerdict(True, 0.9, 10.0)
    # what that does to the verdict: the made-up "there" no longer finishes the sentence
    # (the words' model gives "Turn on the lights in" ~0.001: below, on the real model)
    assert not judge.complete(yes, judge.trusted_words("Turn on the lights in there.", (0.9, 0.95, 0.9, 0.24, 0.9, 0.47)), TurnVerdict(False, 0.001, 5.0))
    assert not judge.complete(yes, judge.trusted_words("Turn on the lights in there.", (0.9, 0.95, 0.9, 0.24, 0.9, 0.47)), TurnVerdict(False, 0.05, 5.0))  # nor the sound
    # unclear words after a doubted last word: the sound no longer breaks the tie
    assert judge.complete(yes, "Send a message to my sister saying", TurnVerdict(False, 0.05, 5.0))
    assert not judge.complete(yes, "Send a message to my sister saying", TurnVerdict(False, 0.05, 5.0), doubted=True)
    assert judge.complete(yes, "What was the final score", TurnVerdict(True, 0.4, 5.0), doubted=True)  # clear words still end it
    # ... if the words with the doubted ending read finished too: it may have been said
    # ("Send a message to my sister *saying hard*." 0.027; without it 0.17: cut off)
    sure, unclear = TurnVerdict(True, 0.17, 5.0), TurnVerdict(False, 0.027, 5.0)
    assert not judge.complete(yes, "Send a message to my sister", sure, doubted=True, untrimmed=unclear)
    assert judge.complete(yes, "How much is $15", sure, doubted=True, untrimmed=TurnVerdict(True, 0.475, 5.0))
    assert judge.complete(yes, "Send a message to my sister", sure, doubted=True)  # not known: the trimmed words decide


async def test_words_model_separates_fragments_from_requests(words_model):
    """The unseen set's texts: every unfinished fragment scores low, every request high."""
    from tests.fixtures.unseen.make_unseen import COMPLETE, HESITATIONS

    fragments = [await words_model.score(before) for _, before, _, _, _ in HESITATIONS]
    requests = [await words_model.score(text) for _, text, _ in COMPLETE]
    assert max(v.probability for v in fragments) < PauseJudge.WORDS_NO, [round(v.probability, 3) for v in fragments]
    assert min(v.probability for v in requests) >= 0.1, [round(v.probability, 3) for v in requests]
    # Whisper's closing punctuation does not count; nothing heard is not a request
    assert (await words_model.score("Remind me to buy.")).probability < PauseJudge.WORDS_NO
    assert (await words_model.score("  ")).probability == 0.0


def test_words_for_scoring_drops_closing_punctuation_and_keeps_the_end():
    assert words_for_scoring(" Set a timer for... ") == "Set a timer for"
    assert words_for_scoring("What time is it?\"") == "What time is it"
    long = " ".join(f"w{i}" for i in range(100))
    assert words_for_scoring(long).split() == [f"w{i}" for i in range(60, 100)]


@pytest.fixture(scope="module")
def words_model() -> GemmaTextTurn:
    model = GemmaTextTurn()
    model._warm_sync()
    return model


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
async def test_a_hesitation_is_not_cut_off(analyzer, stt, words_model):
    """"Add an appointment with ... (650 ms) Doctor Patel on Friday morning": one turn."""
    utt = _utt("h_doctor")
    # the sound alone calls this pause complete (p 0.98): the words ("...with", and
    # the words' model) keep the turn open; they are waited for however slow Whisper is
    settings = VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=2500)
    listener = LocalListener(settings=settings, stt=stt, turn_analyzer=analyzer, text_analyzer=words_model)
    # fed past the ceiling (counted from silero's last voiced window, up to ~100 ms
    # after the last voiced sample): a doubted last word may leave the turn to it
    got, t0 = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 2500 + 400)
    assert len(got) == 1, [e.text for e in got]
    text = got[0].text.lower()
    # both halves in one turn (Whisper spells the first one variously: "adanapointmentwin",
    # "arna poyntman twin"): the second half's words and the first half's sounds before them
    assert "friday" in text and len(text.split("dr")[0].strip(" ,.")) >= 8, text
    # the silence mode at 500 ms cuts the same audio in two
    plain = LocalListener(settings=settings.replace(turn_detection="silence", vad_silence_ms=500), stt=stt)
    got_plain, _ = await _feed(plain, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 1500, expect=2)
    assert len(got_plain) == 2


@pytest.mark.slow
async def test_a_finished_question_ends_well_before_the_ceiling(analyzer, stt, words_model):
    utt = _utt("c_rain")
    settings = VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000)
    listener = LocalListener(settings=settings, stt=stt, turn_analyzer=analyzer, text_analyzer=words_model)
    got, t0 = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 3500)
    assert len(got) == 1
    speech_end = t0 + 1000.0 * (utt.last_voiced_sample + 1) / 16000
    # decided at the first pause (96 ms + the model + the pause's transcript), not at the 3 s ceiling
    assert got[0].eot_ms - speech_end < 2500, got[0].eot_ms - speech_end


@pytest.mark.slow
async def test_push_to_talk_ignores_the_model(analyzer, stt, words_model):
    """Push-to-talk: however finished the sentence sounds, only the release ends the turn."""
    utt = _utt("c_rain")
    listener = LocalListener(settings=VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=1000), stt=stt, turn_analyzer=analyzer, text_analyzer=words_model)
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


class _MadeUpEnding(STT):
    """Whisper at a pause, as seen on the unseen set: it completes the fragment."""

    def __init__(self, last_word_p: float) -> None:
        self.last_word_p = last_word_p
        self.asked = 0

    async def transcribe(self, pcm16, *, sample_rate=16000, language="en", cancel=None, score_words=False):
        return Transcript("Turn on the lights in there.")

    async def word_probabilities(self, transcript):
        self.asked += 1
        return (0.9, 0.95, 0.9, 0.24, 0.9, self.last_word_p)


class _SureSound(TurnAnalyzer):
    def __init__(self) -> None:
        self.scored = 0

    async def score(self, pcm16):
        self.scored += 1
        return TurnVerdict(True, 0.9, 1.0)


class _Words(TextTurnAnalyzer):
    """"...in there." reads finished; "...in" does not (a word no sentence ends on)."""

    async def score(self, text):
        p = 0.5 if text.endswith("there.") else 0.001
        return TurnVerdict(p >= 0.1, p, 1.0)


@pytest.mark.parametrize("last_word_p, ends_at_the_pause", [(0.95, True), (0.4, False)])
async def test_the_listener_leaves_a_doubted_last_word_out_of_its_verdict(last_word_p, ends_at_the_pause):
    utt = _utt("c_africa")  # any speech: the fake recognizer says what it says
    stt = _MadeUpEnding(last_word_p)
    settings = VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000)
    sound = _SureSound()
    listener = LocalListener(settings=settings, stt=stt, turn_analyzer=sound, text_analyzer=_Words())
    # 1.2 s of silence after the speech: far short of the 3 s ceiling
    got, t0 = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 1200, expect=1 if ends_at_the_pause else 0)
    assert len(got) == (1 if ends_at_the_pause else 0)
    # clear words (0.5) or a doubted last word: the sound decided nothing, so it was never scored
    assert sound.scored == 0
    if got:
        assert got[0].text == "Turn on the lights in there."  # the transcript keeps every word
    assert stt.asked >= 1  # asked right after the pause's transcription, for the verdict


class _UnclearWords(TextTurnAnalyzer):
    """Words that leave the verdict open ("Yes", "Hello"): between WORDS_NO and WORDS_YES."""

    async def score(self, text):
        return TurnVerdict(False, 0.05, 1.0)


async def test_the_listener_asks_the_sound_only_when_the_words_leave_it_open():
    utt = _utt("c_africa")
    stt = _MadeUpEnding(0.95)  # a last word it is sure of: no doubt
    sound = _SureSound()
    listener = LocalListener(settings=VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000), stt=stt, turn_analyzer=sound, text_analyzer=_UnclearWords())
    got, _ = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 1200, expect=1)
    assert len(got) == 1 and sound.scored >= 1  # the sound broke the tie, at the pause (1.2 s < the 3 s ceiling)


@pytest.mark.slow
def test_the_words_model_evaluates_only_what_it_has_not_seen(words_model):
    """Scored words stay in the KV cache: the next call evaluates only the tokens after
    what the two share (a pause's words then the same without a doubted ending, or the
    sentence's next pause), with the probability a fresh evaluation gives."""
    fragment, whole = "Remind me to call Dr. Rauber and at 3 in", "Remind me to call Dr. Rauber and at 3 in the afternoon"
    words_model.score_sync("What gate does flight 249 leave from")  # nothing shared with what follows
    fresh = words_model.score_sync(whole)
    n = words_model.evaluated
    assert n >= 10
    words_model.score_sync(fragment)
    assert words_model.evaluated == 1  # a prefix of the last words: only its last token, for the logits
    again = words_model.score_sync(whole)
    assert 1 <= words_model.evaluated <= 3 < n
    assert again.probability == pytest.approx(fresh.probability, abs=0.01) and again.complete == fresh.complete
    # the doubted-ending case, end to end: same verdicts either way
    cut = words_model.score_sync("Turn on the lights in there")
    trusted = words_model.score_sync("Turn on the lights in")
    assert words_model.evaluated == 1 and cut.complete and not trusted.complete
    words_model.score_sync("What gate does flight 249 leave from")
    assert not words_model.score_sync("Turn on the lights in").complete


class _TimedRecognizer(_MadeUpEnding):
    """Records the stream time (the last pushed frame's) of each transcription it is asked for."""

    def __init__(self) -> None:
        super().__init__(0.95)
        self.started_at: list[float] = []
        self.clock = 0.0

    async def transcribe(self, pcm16, *, sample_rate=16000, language="en", cancel=None, score_words=False):
        self.started_at.append(self.clock)
        return await super().transcribe(pcm16, sample_rate=sample_rate, language=language, cancel=cancel, score_words=score_words)


async def test_the_pause_is_transcribed_from_its_first_window_and_announced_at_the_pause():
    """smart_turn: Whisper starts one silent window into a pause, before the 96 ms pause
    is judged; the preliminary transcript (the preemptive turn) comes only at 96 ms, and
    the end of turn reuses that one transcription."""
    utt = _utt("c_africa")
    stt = _TimedRecognizer()
    listener = LocalListener(settings=VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000), stt=stt, turn_analyzer=_SureSound(), text_analyzer=_Words())
    events: list = []
    seen_at: list[float] = []  # the stream time each event was seen at
    reader = asyncio.create_task(_collect(listener, events, lambda: seen_at.append(stt.clock)))
    pcm = utt.pcm[: 2 * (utt.last_voiced_sample + 1)] + bytes(2 * 16000)  # then a second of digital silence
    for k in range(0, len(pcm), 640):
        stt.clock = 1000.0 * (k + 640) / 2 / 16000
        await listener.push(pcm[k : k + 640], stt.clock)
        await asyncio.sleep(0)
    for _ in range(100):
        if any(isinstance(e, EndOfTurn) for e in events):
            break
        await asyncio.sleep(0.02)
    await listener.aclose()
    await asyncio.wait_for(reader, 5)
    pre = [e for e in events if isinstance(e, PreliminaryTranscript)]
    eots = [e for e in events if isinstance(e, EndOfTurn)]
    assert len(pre) == 1 and len(eots) == 1 and eots[0].text == pre[0].text
    # the final pause: one transcription, started within two windows of silero's last voiced one
    last = stt.started_at[-1]
    assert 0 < last - pre[0].speech_end_ms <= 64 + 20, (last, pre[0].speech_end_ms)
    assert stt.started_at.count(last) == 1 and all(t <= last for t in stt.started_at)
    # announced at the 96 ms pause (not at 32 ms), before the end of turn
    assert seen_at[events.index(pre[0])] - pre[0].speech_end_ms >= 96 - 20
    assert pre[0].speech_end_ms == eots[0].speech_end_ms
    assert events.index(pre[0]) < events.index(eots[0])


async def _collect(listener: LocalListener, into: list, seen) -> None:
    async for ev in listener.events():
        into.append(ev)
        seen()


class _SaidEnding(_MadeUpEnding):
    """A doubted ending that was said: "...my sister *saying*", heard as "saying hard."."""

    async def transcribe(self, pcm16, *, sample_rate=16000, language="en", cancel=None, score_words=False):
        return Transcript("Send a message to my sister saying hard.")

    async def word_probabilities(self, transcript):
        self.asked += 1
        return (0.9, 0.95, 0.9, 0.9, 0.9, 0.9, 0.4, 0.3)


class _SisterWords(TextTurnAnalyzer):
    """The words' model on that pause (2026-12-07): unclear with the ending, finished without."""

    async def score(self, text):
        p = 0.17 if text == "Send a message to my sister" else 0.027
        return TurnVerdict(p >= 0.1, p, 1.0)


async def test_the_listener_keeps_listening_when_only_the_trimmed_words_read_finished():
    utt = _utt("c_africa")
    stt = _SaidEnding(0.3)
    listener = LocalListener(settings=VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000), stt=stt, turn_analyzer=_SureSound(), text_analyzer=_SisterWords())
    got, _ = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 1200, expect=0)
    assert got == [] and stt.asked >= 1  # the pause (1.2 s, short of the 3 s ceiling) did not end the turn


class _UnscoredWords(_MadeUpEnding):
    """Whisper transcribes, but scoring its words fails."""

    async def word_probabilities(self, transcript):
        self.asked += 1
        raise EngineUnavailable("scoring failed", detail="test")


async def test_a_failed_word_scoring_keeps_the_pause_transcript():
    """The transcript was announced before its words were scored: a failure there keeps
    it (judged as it is), and the turn the pause ends carries the same words."""
    utt = _utt("c_africa")
    stt = _UnscoredWords(0.95)
    listener = LocalListener(settings=VoiceSettings(turn_detection="smart_turn", turn_max_wait_ms=3000), stt=stt, turn_analyzer=_SureSound(), text_analyzer=_Words())
    got, _ = await _feed(listener, utt.pcm, 1000.0 * utt.last_voiced_sample / 16000 + 1200, expect=1)
    assert stt.asked >= 1
    assert len(got) == 1 and got[0].text == "Turn on the lights in there."
