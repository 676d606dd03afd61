"""Turns started before the end of turn is confirmed: kept when the words hold, dropped unseen otherwise."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import ToneTTS
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.events import AudioReady, TurnDone, UserText
from voiceclaw_app.pipeline.preemptive import TurnStarter, same_words
from voiceclaw_app.pipeline.timing import now_ms
from voiceclaw_app.pipeline.turn import TurnRunner
from voiceclaw_app.providers.base import EndOfTurn, InterimTranscript, PreliminaryTranscript, SpeechDiscarded, SpeechStarted
from voiceclaw_app.providers.openai_llm import OpenAICompatLLM


@pytest.fixture
async def setup(tmp_path):
    srv = FakeChatServer(ChatBehavior(ttft_s=0.1, tokens_per_s=200))
    await srv.start()
    settings = VoiceSettings(llm_base_url=srv.base_url, llm_model_voice="m")
    runner = TurnRunner(llm=OpenAICompatLLM(srv.base_url), tts=ToneTTS(0.02), audio_store=AudioStore(tmp_path), settings=settings)
    prepared_calls = []

    async def prepare():
        prepared_calls.append(now_ms())
        return runner, runner.prepare([], "conv")

    yield srv, TurnStarter(prepare), prepared_calls
    await srv.stop()


def eot(text: str, speech_end: float) -> EndOfTurn:
    t = now_ms()
    return EndOfTurn(text, speech_end_ms=speech_end, eot_ms=t, stt_final_ms=t)


async def drain(committed):
    return [ev async for ev in committed.turn.events()]


async def test_a_turn_started_at_the_pause_is_kept_when_the_words_hold(setup):
    srv, starter, prepared = setup
    speech_end = now_ms()
    await starter.handle(SpeechStarted(speech_end - 1500))
    assert await starter.handle(PreliminaryTranscript("What time is it?", speech_end)) is None
    await asyncio.sleep(0.5)  # the silence wait: the early turn works meanwhile
    committed = await starter.handle(eot("what time is it", speech_end))
    assert committed is not None and committed.reused
    events = await drain(committed)
    assert isinstance(events[0], UserText) and events[0].text == "What time is it?"
    assert isinstance(events[-1], TurnDone) and any(isinstance(e, AudioReady) for e in events)
    m = committed.turn.marks
    assert m.speech_end == speech_end and m.first_audio_ready < m.eot_decided  # audio was ready before the end of turn
    assert len(srv.bodies) == 1 and len(prepared) == 1


async def test_changed_words_drop_the_early_turn_and_answer_the_final_ones(setup):
    srv, starter, _ = setup
    await starter.handle(SpeechStarted(now_ms()))
    await starter.handle(PreliminaryTranscript("Set a timer", now_ms()))
    await asyncio.sleep(0.05)
    early = starter.early
    committed = await starter.handle(eot("Set a timer for ten minutes", now_ms()))
    assert not committed.reused and early.cancel.cancelled and early._task.done()
    events = await drain(committed)
    assert events[0].text == "Set a timer for ten minutes"
    assert "ten minutes" in srv.bodies[-1]["messages"][-1]["content"]
    assert starter.discarded == 1


async def test_speaking_again_after_the_pause_drops_the_guess(setup):
    srv, starter, _ = setup
    await starter.handle(SpeechStarted(now_ms()))
    await starter.handle(PreliminaryTranscript("Remind me", now_ms()))
    early = starter.early
    await starter.handle(SpeechStarted(now_ms()))  # the listener reports resumed speech
    assert starter.early is None and early.cancel.cancelled
    await starter.handle(PreliminaryTranscript("Remind me to call mom", now_ms()))
    await starter.handle(InterimTranscript("tomorrow"))  # more words: drop again
    assert starter.early is None
    committed = await starter.handle(eot("Remind me to call mom tomorrow", now_ms()))
    assert isinstance((await drain(committed))[-1], TurnDone)
    assert starter.discarded == 2


async def test_without_speculation_nothing_starts_before_the_end_of_turn(setup):
    srv, starter, _ = setup
    starter.speculative = False
    await starter.handle(SpeechStarted(now_ms()))
    await starter.handle(PreliminaryTranscript("Hello there", now_ms()))
    await asyncio.sleep(0.2)
    assert starter.early is None and srv.bodies == []
    committed = await starter.handle(eot("Hello there", now_ms()))
    assert isinstance((await drain(committed))[-1], TurnDone)


async def test_closing_the_consumer_cancels_a_committed_turn(setup):
    srv, starter, _ = setup
    srv.then(reply="word " * 300, tokens_per_s=100)
    committed = await starter.handle(eot("talk a lot", now_ms()))
    gen = committed.turn.events()
    async for ev in gen:
        if type(ev).__name__ == "LLMToken":
            break
    await gen.aclose()
    assert committed.turn.cancel.cancelled and committed.turn._task.done()


def test_same_words_ignores_case_and_punctuation():
    assert same_words("What's the time?", "what's the time")
    assert not same_words("Set a timer", "Set a timer for ten")


async def test_a_failed_preparation_is_started_again_at_the_next_utterance(setup):
    srv, starter, _ = setup
    real = starter._prepare_fn
    calls = []

    async def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("settings unreadable")
        return await real()

    starter._prepare_fn = flaky
    await starter.handle(SpeechStarted(now_ms()))
    with pytest.raises(RuntimeError):
        await starter.handle(eot("hello", now_ms()))
    # the next utterance prepares again instead of re-raising the old failure
    await starter.handle(SpeechStarted(now_ms()))
    committed = await starter.handle(eot("hello again", now_ms()))
    assert committed is not None and isinstance((await drain(committed))[-1], TurnDone)
    assert len(calls) == 2


async def test_a_tentative_start_prepares_but_keeps_the_guess_and_a_cough_drops_the_request(setup):
    srv, starter, prepared = setup
    await starter.handle(SpeechStarted(now_ms(), tentative=True))
    assert len(prepared) == 0 or starter._prepared is not None
    await asyncio.sleep(0)
    assert len(prepared) == 1  # warming started at the onset already
    # a cough while a reply plays: the request prepared for it is dropped (its history is stale)
    await starter.handle(SpeechDiscarded(now_ms()))
    assert starter._prepared is None
    await starter.handle(SpeechStarted(now_ms(), tentative=True))
    await starter.handle(SpeechStarted(now_ms(), tentative=False))
    await asyncio.sleep(0)
    assert len(prepared) == 2
    await starter.handle(PreliminaryTranscript("What time is it?", now_ms()))
    early = starter.early
    await starter.handle(SpeechStarted(now_ms(), tentative=True))  # not yet speech: the guess stays
    assert starter.early is early and not early.cancel.cancelled
    await starter.handle(SpeechStarted(now_ms(), tentative=False))  # speech: the guess is stale
    assert starter.early is None and early.cancel.cancelled
