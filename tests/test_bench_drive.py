"""The benchmarks' turn path (bench/drive.py): listener events -> the app's real VoiceSession -> recorded outcome."""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes import ToneTTS
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from voiceclaw_app.bench.drive import BenchServices, SessionDriver, paced
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.pipeline.audio_store import AudioStore
from voiceclaw_app.pipeline.timing import now_ms
from voiceclaw_app.pipeline.turn import TurnRunner
from voiceclaw_app.providers.base import EndOfTurn, Listener, PreliminaryTranscript, SpeechStarted
from voiceclaw_app.providers.openai_llm import OpenAICompatLLM


class ScriptedListener(Listener):
    """Events put in by the test, in order."""

    def __init__(self):
        self.q: asyncio.Queue = asyncio.Queue()

    async def push(self, pcm16, t_ms):
        pass

    def events(self):
        return self._iter()

    async def _iter(self):
        while (ev := await self.q.get()) is not None:
            yield ev

    async def aclose(self):
        self.q.put_nowait(None)


class WarmRecorder(TurnRunner):
    def __init__(self, **kw):
        super().__init__(**kw)
        self.warmed: list = []

    async def warm(self, prepared=None):
        self.warmed.append(prepared)
        await super().warm(prepared)


@pytest.fixture
async def rig(tmp_path):
    srv = FakeChatServer(ChatBehavior(ttft_s=0.05, tokens_per_s=200))
    await srv.start()
    runner = WarmRecorder(llm=OpenAICompatLLM(srv.base_url), tts=ToneTTS(0.02), audio_store=AudioStore(tmp_path), settings=VoiceSettings(llm_base_url=srv.base_url, llm_model_voice="m"))
    yield srv, runner
    await srv.stop()


def eot(text: str, speech_end: float) -> EndOfTurn:
    t = now_ms()
    return EndOfTurn(text, speech_end_ms=speech_end, eot_ms=t, stt_final_ms=t)


@pytest.mark.parametrize("prefill", [True, False])
async def test_early_turn_kept_and_recorded_with_warm_up_at_speech_start(rig, prefill):
    srv, runner = rig
    listener = ScriptedListener()
    session = SessionDriver(BenchServices(runner.settings, runner, listener, prefill=prefill))
    await session.start()
    out = session.expect()
    speech_end = now_ms()
    listener.q.put_nowait(SpeechStarted(speech_end - 1000))
    listener.q.put_nowait(PreliminaryTranscript("What time is it?", speech_end))
    await asyncio.sleep(0.4)  # the silence wait: the early turn runs meanwhile
    listener.q.put_nowait(eot("what time is it", speech_end))
    await out.finished(5, 5)
    await session.session.drain()
    assert out.committed.reused and out.discarded == 0 and not out.error
    assert out.reply and out.first_chunk is not None and out.first_audio is not None
    # audio made before the commit counts only from when the session sent it out
    marks = out.committed.marks
    assert out.committed_ms <= out.first_audio_sent_ms
    assert out.audio_ready_ms == max(marks.first_audio_ready, out.first_audio_sent_ms) >= out.committed_ms
    # the session stored the turn (the in-memory store: no database in a benchmark)
    assert [m.role for m in session.store.history(out.committed.conversation_id)] == ["user", "assistant"]
    assert len(runner.warmed) == 1 and (runner.warmed[0] is not None) == prefill
    assert len(srv.bodies) == 1
    await session.aclose()


async def test_user_resuming_after_the_pause_counts_a_discarded_guess(rig):
    srv, runner = rig
    listener = ScriptedListener()
    session = SessionDriver(BenchServices(runner.settings, runner, listener))
    await session.start()
    out = session.expect()
    for ev in (SpeechStarted(now_ms()), PreliminaryTranscript("Remind me", now_ms()), SpeechStarted(now_ms()), eot("Remind me to call mom", now_ms())):
        listener.q.put_nowait(ev)
    await out.finished(5, 5)
    assert not out.committed.reused and out.discarded == 1
    assert out.committed.text == "Remind me to call mom" and out.reply
    await session.aclose()


async def test_paced_frames_keep_real_time_and_pad_after_the_end():
    pcm = b"\x01\x00" * (16000 // 10)  # 100 ms
    t0 = now_ms()
    got = []
    async for first, frame, due in paced(pcm, 20, t0, pad=lambda n: b"\x00\x00" * n):
        got.append((first, len(frame), due, now_ms()))
        if len(got) == 8:
            break
    assert [g[0] for g in got] == [320 * k for k in range(8)]
    assert all(n == 640 for _, n, _, _ in got)
    assert [round(g[2] - t0) for g in got] == [20 * (k + 1) for k in range(8)]
    assert all(t >= due for _, _, due, t in got)
    assert len([f async for f in paced(pcm + b"\x00\x00" * 100, 20, now_ms())]) == 6  # last frame short, no pad


def test_the_browser_benchmark_asks_unseen_questions_as_the_fake_mic_plays_them(tmp_path):
    """``bench browser --fixtures unseen``: at least 20 different questions, none in the
    tests' own voice set, each placed in the mic WAV where its marks say."""
    import wave

    from voiceclaw_app.bench.browser import QUESTIONS, build_mic_wav, mic_wav_of, question_fixtures

    unseen = question_fixtures("unseen")
    assert len({fx.text for fx in unseen}) >= 20
    assert not {fx.name for fx in unseen} & set(QUESTIONS)
    out = mic_wav_of([(unseen[0], 0.5), (unseen[1], 1.0)], tmp_path / "mic.wav", lead_silence_s=1.0)
    with wave.open(str(tmp_path / "mic.wav"), "rb") as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        pcm = w.readframes(w.getnframes())
    second = out["marks"][1]
    start = 16000 + len(unseen[0].pcm) // 2 + 8000  # lead, the first question, its 0.5 s gap
    assert second["first_voiced_s"] == (start + unseen[1].first_voiced_sample) / 16000
    assert pcm[2 * start: 2 * start + len(unseen[1].pcm)] == unseen[1].pcm
    assert abs(out["duration_s"] - len(pcm) / 2 / 16000) < 1e-9
    # the tests' own fixtures by name still work (the e2e suite uses them)
    assert build_mic_wav([("q_capital", 0.0)], tmp_path / "q.wav")["marks"][0]["text"] == "What is the capital of France?"
