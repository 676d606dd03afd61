"""The embedded STT must stop at the end of the speech: no sentence said twice.

The old short-window decode (no timestamps, a token cap of 8 per second) repeated
``r_kitchen_slow`` and ``r_kitchen_gb`` three times over; these voices are neither
Piper's nor the other tests' (``tests/fixtures/unseen``).
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voiceclaw_app.bench.local import word_error_rate
from voiceclaw_app.bench.unseen import load_unseen
from voiceclaw_app.providers import local_stt
from voiceclaw_app.providers.smart_turn import PauseJudge
from voiceclaw_app.providers.local_stt import LocalWhisperSTT, looks_repeated, tokens_within, word_probabilities

EOT, TS = 50257, 50364  # Whisper base's end token and first timestamp token


def test_tokens_within_drops_segments_that_start_past_the_audio():
    ids = [TS + 0, 1, 2, 3, TS + 150, TS + 150, 4, 5, TS + 240, TS + 240, 1, 2, 3, TS + 400]
    assert tokens_within(ids, EOT, TS, duration_s=4.9) == [1, 2, 3, 4, 5]
    assert tokens_within(ids, EOT, TS, duration_s=2.5) == [1, 2, 3]
    assert tokens_within([TS, 7, 8, TS + 50, EOT, 9], EOT, TS, duration_s=3.0) == [7, 8]


def test_looks_repeated():
    assert looks_repeated("Turn the light off and lock the door. Turn the light off and lock the door.")
    assert looks_repeated("lock the front door lock the front door")
    assert not looks_repeated("No, no, I said the blue one.")
    assert not looks_repeated("Set a timer for twenty minutes and then another timer for ten minutes.")


@pytest.fixture(scope="module")
def stt() -> LocalWhisperSTT:
    engine = LocalWhisperSTT()
    engine._warm_sync()
    return engine


def _check(stt: LocalWhisperSTT, utt, max_wer: float) -> str:
    text = stt.transcribe_array(utt.speech()).text
    ref_words = len(utt.text.split())
    assert not looks_repeated(text), f"{utt.name} ({utt.voice}): {text!r}"
    assert len(text.split()) <= ref_words * 1.25 + 2, f"{utt.name} ran past the speech: {text!r}"
    assert word_error_rate(utt.text, text) <= max_wer, f"{utt.name} ({utt.voice}): {text!r}"
    return text


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r_kitchen_slow", "r_kitchen_gb", "c_kitchen", "c_stop", "c_michael", "h_sister"])
def test_short_utterances_are_not_repeated(stt, name):
    (utt,) = [u for u in load_unseen() if u.name == name]
    _check(stt, utt, max_wer=0.35)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["l_trip", "l_email", "l_garden", "l_budget"])
def test_long_utterances_are_not_repeated(stt, name):
    (utt,) = [u for u in load_unseen() if u.name == name]
    assert 10.0 <= utt.duration_s <= 15.0
    _check(stt, utt, max_wer=0.45)


@pytest.mark.slow
def test_trailing_silence_does_not_make_it_repeat(stt):
    """A push-to-talk release lands well after the speech: seconds of room noise."""
    (utt,) = [u for u in load_unseen() if u.name == "r_kitchen_slow"]
    rng = np.random.default_rng(3)
    audio = np.concatenate([utt.speech(0), rng.normal(0, 0.002, 16000 * 3).astype(np.float32)])
    text = stt.transcribe_array(audio).text
    assert not looks_repeated(text) and word_error_rate(utt.text, text) <= 0.2, text


@pytest.mark.slow
def test_guard_trips_to_the_standard_path(stt, monkeypatch):
    """A cap too small to finish the sentence must not cut it: the standard path answers."""
    (utt,) = [u for u in load_unseen() if u.name == "c_kitchen"]
    monkeypatch.setattr(local_stt, "TOKENS_PER_S", 0)  # 12 ids: the sentence needs 13
    before = stt.fallbacks
    text = stt.transcribe_array(utt.speech()).text
    assert stt.fallbacks == before + 1
    assert word_error_rate(utt.text, text) <= 0.2, text


def test_each_word_scores_as_its_weakest_token():
    assert word_probabilities([(" Turn", 0.9), (" on", 0.95), (" the", 0.9), (" lights", 0.24), (" in", 0.43), (" there", 0.47), (".", 0.69)]) == [0.9, 0.95, 0.9, 0.24, 0.43, 0.47]
    assert word_probabilities([(" the", 0.9), (" Lag", 0.6), ("range", 0.7), (" Ser", 0.15), ("lin", 0.41), (".", 0.9)]) == [0.9, 0.6, 0.15]
    assert word_probabilities([(" is", 0.9), (" $", 0.8), ("15", 0.5), ("?", 0.9)]) == [0.9, 0.5]  # "$" does not join "is"
    assert word_probabilities([(" it", 0.9), ("'s", 0.3), ("...", 0.2)]) == [0.3]
    assert word_probabilities([(" well", 0.9), ("-", 0.1), ("known", 0.8)]) == [0.8]  # one word, as the text has it
    assert word_probabilities([(".", 0.5)]) == [] and word_probabilities([]) == []


@pytest.mark.slow
def test_whisper_doubts_the_ending_it_makes_up_at_a_pause(stt):
    """Cut at its mid-sentence pause ("Turn on the lights in ... the living room"),
    the fragment is often completed with a word never said; whatever the words, its
    last word scores lower than the last word of the whole, clearly spoken request."""
    (hes,) = [u for u in load_unseen("hesitation") if u.name == "h_lights"]
    (whole,) = [u for u in load_unseen("complete") if u.name == "c_africa"]
    silent_from = hes.pauses[0][0]
    fragment = np.frombuffer(hes.pcm[: 2 * (silent_from + 16000 * 235 // 1000)], dtype="<i2").astype(np.float32) / 32768.0
    cut = stt.transcribe_array(fragment)
    done = stt.transcribe_array(whole.speech())
    cut_ps = asyncio.run(stt.word_probabilities(cut))
    done_ps = asyncio.run(stt.word_probabilities(done))
    assert done_ps is not None and len(done_ps) == len(done.text.split()) and done_ps[-1] >= 0.8, (done, done_ps)
    assert cut_ps is not None, cut
    cut_p = cut_ps[-1]
    words = cut.text.lower().strip(" .?!").split()
    # either Whisper stopped on the fragment's true last word ("in"), or it doubts its ending
    assert words[-1] == "in" or cut_p < PauseJudge.LAST_WORD_MIN_P, (cut, cut_p)


@pytest.mark.slow
def test_the_words_are_judged_in_the_longer_window_prepared_beside_the_decode(stt):
    """The text comes from the short window; the words' probabilities from an 8 s
    encoding of the same audio, made on the other worker while the text is decoded
    when the caller says it will ask (a pause's transcription), else made when asked:
    the same probabilities either way."""
    (hes,) = [u for u in load_unseen("hesitation") if u.name == "h_curry"]
    silent_from = hes.pauses[0][0]
    fragment = np.frombuffer(hes.pcm[: 2 * (silent_from + 16000 * 235 // 1000)], dtype="<i2").astype(np.float32) / 32768.0
    prepared = stt.transcribe_array(fragment, score_words=True)
    asked = stt.transcribe_array(fragment)
    assert prepared.text == asked.text and prepared.text
    assert prepared.scoring.window_s == local_stt.MIN_WINDOW_S < local_stt.JUDGE_WINDOW_S
    assert prepared.scoring.judge is not None and asked.scoring.judge is None
    p_prepared = asyncio.run(stt.word_probabilities(prepared))
    p_asked = asyncio.run(stt.word_probabilities(asked))
    assert p_prepared is not None and p_asked is not None and len(p_prepared) == len(prepared.text.split())
    assert p_prepared == pytest.approx(p_asked, abs=1e-4)
    # and it is the longer window's verdict, not the decoding window's own
    own = stt._model.model.align(prepared.scoring.encoded, prepared.scoring.prompt, [prepared.scoring.tokens], int(prepared.scoring.duration_s * 100))[0]
    own_last = local_stt.word_probabilities([(prepared.scoring.tokenizer.decode([t]), float(p)) for t, p in zip(prepared.scoring.tokens, own.text_token_probs)])[-1]
    assert own_last != pytest.approx(p_prepared[-1], abs=1e-3)
