"""The bench's speculative turn driver with fake engines: reuse, discard, no stale reply."""

from __future__ import annotations

import asyncio

import pytest

from voiceclaw_app.bench.local import SpeculativeTurnDriver
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.events import AudioReady, TurnDone
from voiceclaw_app.providers.base import STT, LLMRequest, Transcript
from voiceclaw_app.providers.silero_vad import EndOfTurn, ShortPause, SpeechResumed, SpeechStart


class FakeSTT(STT):
    """Transcript = the PCM decoded as text, after a delay."""

    def __init__(self, delay: float = 0.05):
        self.delay = delay
        self.calls: list[bytes] = []

    async def transcribe(self, pcm16, *, sample_rate=16000, language="en", cancel=None):
        self.calls.append(pcm16)
        await asyncio.sleep(self.delay)
        return Transcript(text=pcm16.decode())


class FakePrepared:
    base = LLMRequest(messages=[])


class FakeRunner:
    def __init__(self):
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def run(self, prepared, text, *, marks, cancel):
        self.started.append(text)
        for _ in range(20):
            await asyncio.sleep(0.01)
            if cancel.cancelled:
                self.cancelled.append(text)
                return
        yield AudioReady(0, "id", "/audio/id.wav", 100.0, text)
        yield TurnDone(f"reply to {text}", marks, 1)


def make(speculative: bool = True, prefill=None):
    stt, runner = FakeSTT(), FakeRunner()
    drv = SpeculativeTurnDriver(stt=stt, runner=runner, prepared=FakePrepared(), settings=VoiceSettings(speculative=speculative), llm_prefill=prefill)
    return drv, stt, runner


@pytest.mark.asyncio
async def test_unchanged_audio_reuses_the_speculative_turn():
    drv, stt, runner = make()
    drv.handle([ShortPause(100.0, 90.0, b"hello there")])
    await asyncio.sleep(0.02)
    drv.handle([EndOfTurn(400.0, 90.0, b"hello there")])
    final = await drv.committed(5)
    assert drv.reused and final.speculative
    assert stt.calls == [b"hello there"]  # transcribed once, not again at end of turn
    assert final.reply == "reply to hello there" and final.first_audio_ms is not None
    assert final.marks.speech_end == 90.0


@pytest.mark.asyncio
async def test_resumed_speech_discards_and_the_final_answers_the_whole_utterance():
    drv, stt, runner = make()
    drv.handle([ShortPause(100.0, 90.0, b"what is")])
    await asyncio.sleep(0.08)  # the speculative turn is already running
    drv.handle([SpeechResumed(150.0)])
    drv.handle([EndOfTurn(900.0, 600.0, b"what is the time")])
    final = await drv.committed(5)
    await drv.aclose()
    assert not drv.reused and not final.speculative
    assert final.transcript == "what is the time"
    assert "what is" in runner.cancelled  # the stale turn stopped
    assert final.reply == "reply to what is the time"


@pytest.mark.asyncio
async def test_changed_audio_at_end_of_turn_starts_a_fresh_attempt():
    drv, stt, runner = make()
    drv.handle([ShortPause(100.0, 90.0, b"turn on")])
    drv.handle([EndOfTurn(400.0, 120.0, b"turn on the lights")])
    final = await drv.committed(5)
    await drv.aclose()
    assert final.transcript == "turn on the lights" and not drv.reused
    assert drv.discarded == 1


@pytest.mark.asyncio
async def test_no_speculation_when_switched_off_and_prefill_at_speech_start():
    prefilled = []

    async def prefill(messages):
        prefilled.append(messages)

    drv, stt, runner = make(speculative=False, prefill=prefill)
    drv.handle([SpeechStart(10.0, 0.0)])
    drv.handle([ShortPause(100.0, 90.0, b"hi")])
    await asyncio.sleep(0.1)
    assert stt.calls == [] and len(prefilled) == 1
    drv.handle([EndOfTurn(400.0, 90.0, b"hi")])
    final = await drv.committed(5)
    await drv.aclose()
    assert final.transcript == "hi" and stt.calls == [b"hi"]
