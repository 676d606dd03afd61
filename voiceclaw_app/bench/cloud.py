"""``bench cloud``: spoken turns through Deepgram / LLM / TTS protocol servers, with the guide's profile.

Local servers speaking each real protocol (tests/servers), reached through the real
clients (deepgram-sdk WebSocket, SSE over httpx, the openai SDK):

* Deepgram: interim results every 200 ms during speech, ``is_final`` 150 ms and
  ``speech_final`` 300 ms after the end of speech, ``SpeechStarted`` after 50 ms of voice.
* LLM: first token 300 ms, then 40 tokens/s.
* TTS: first byte 200 ms, then audio at 5x real time.

The spoken fixtures (tests/fixtures, known last voiced sample) are paced into a
:class:`DeepgramListener` at real time in 20 ms frames, with a little noise. The
driver does what the voice session does: warm connections at ``SpeechStarted``,
start the turn **preemptively** on ``is_final`` (:class:`PreliminaryTranscript`),
drop it if the user keeps talking, commit it on ``speech_final`` when the text is
unchanged. Two fixtures pause mid-sentence ("Good morning, how are you doing?"), so
the discard path runs too.

Figures (ms, p50/p95): ``time_to_first_audio`` = first audio ready (whole first
chunk stored at its URL) - speech end (the fixture's last voiced sample);
``overhead`` = that minus the ideal critical path (is_final delay + LLM first token
+ the first chunk's remaining tokens + TTS first byte + the first chunk's audio
transfer); ``time_to_first_audio_byte`` = when the TTS server sent the first audio
byte of the reply (what a player that streams partial audio could start on);
``barge_in`` = speech start detection latency of Deepgram's ``SpeechStarted`` (the
profile's 50 ms plus the transport) and of the server's Silero VAD (with the
``vad_min_speech_ms`` setting) on the same frames.

This drives the Listener + TurnRunner directly rather than ``/ws/voice`` (the
socket's handler goes through Reflex state, which needs the whole app running);
the frames enter the listener exactly as the socket handler passes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..config import VoiceSettings
from ..pipeline.audio_store import AudioStore
from ..pipeline.events import AudioReady, ChunkText, TurnDone, TurnError
from ..pipeline.timing import TurnMarks, now_ms
from ..pipeline.turn import PreparedRequest, TurnRunner
from ..providers.base import CancelToken, EndOfTurn, InterimTranscript, PreliminaryTranscript, SpeechStarted
from ..providers.deepgram_stt import DeepgramListener, DeepgramOptions
from ..providers.openai_llm import OpenAICompatLLM
from ..providers.openai_tts import OpenAITTS
from .local import FIXTURES, _dither, _NoCache, load_fixtures
from .pipeline import TOKENS_PER_S, TTFT_S, TTS_REALTIME, TTS_TTFB_S, replies, transfer_s
from .stats import p50_p95, stages

IS_FINAL_S = 0.15
SPEECH_FINAL_S = 0.3
INTERIM_S = 0.2
FRAME_MS = 20
RATE = 16000
LEAD_S = 0.3  # noise before each utterance
TAIL_S = 1.6  # noise after it (the turn runs meanwhile; the listener stops streaming it)


@dataclass
class Attempt:
    text: str
    marks: TurnMarks = field(default_factory=TurnMarks)
    cancel: CancelToken = field(default_factory=CancelToken)
    task: asyncio.Task | None = None
    first_chunk: ChunkText | None = None
    first_audio: AudioReady | None = None
    reply: str = ""
    error: str = ""


@dataclass
class RunState:
    onset_ms: float | None = None
    speech_end_ms: float | None = None
    prepared: PreparedRequest | None = None
    attempt: Attempt | None = None
    committed: Attempt | None = None
    eot: EndOfTurn | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stt_speech_started_ms: float | None = None
    vad_speech_started_ms: float | None = None
    discarded: int = 0


class CloudDriver:
    """Listener events -> preemptive turns (what the voice session does, minus the UI)."""

    def __init__(self, runner: TurnRunner, preemptive: bool = True) -> None:
        self.runner = runner
        self.preemptive = preemptive
        self.run: RunState | None = None
        self._warm: asyncio.Task | None = None

    def _start(self, text: str) -> Attempt:
        a = Attempt(text)
        a.task = asyncio.create_task(self._drive(a))
        return a

    async def _drive(self, a: Attempt) -> None:
        assert self.run is not None and self.run.prepared is not None
        async for ev in self.runner.run(self.run.prepared, a.text, marks=a.marks, cancel=a.cancel):
            if isinstance(ev, ChunkText) and a.first_chunk is None:
                a.first_chunk = ev
            elif isinstance(ev, AudioReady) and a.first_audio is None:
                a.first_audio = ev
            elif isinstance(ev, TurnDone):
                a.reply = ev.reply_text
            elif isinstance(ev, TurnError):
                a.error, a.reply = ev.message, ev.reply_text

    def _discard(self, run: RunState) -> None:
        if run.attempt is not None and run.committed is None:
            run.attempt.cancel.cancel()
            run.discarded += 1
            run.attempt = None

    async def consume(self, listener: DeepgramListener) -> None:
        async for ev in listener.events():
            run = self.run
            if run is None or run.committed is not None:
                continue
            if isinstance(ev, SpeechStarted):
                if run.stt_speech_started_ms is None and run.onset_ms is not None:
                    run.stt_speech_started_ms = now_ms() - run.onset_ms
                run.prepared = self.runner.prepare([], "bench-cloud")
                self._warm = asyncio.create_task(self.runner.warm())
            elif isinstance(ev, InterimTranscript):
                self._discard(run)  # the user kept talking after an is_final
            elif isinstance(ev, PreliminaryTranscript) and self.preemptive:
                self._discard(run)
                run.attempt = self._start(ev.text)
            elif isinstance(ev, EndOfTurn):
                run.eot = ev
                if run.attempt is None or run.attempt.text != ev.text or run.attempt.cancel.cancelled:
                    self._discard(run)
                    run.attempt = self._start(ev.text)
                run.committed = run.attempt
                run.committed.marks.mark("eot_decided", ev.eot_ms)
                run.done.set()


def _segments(text: str, pcm: bytes) -> list[str]:
    """How the fake recognizer will split this fixture (a pause >= 150 ms at a comma)."""
    a = np.frombuffer(pcm, dtype="<i2").astype(np.float32)
    win = RATE // 100
    voiced = [float(np.sqrt(np.mean(a[k : k + win] ** 2))) > 100 for k in range(0, len(a) - win + 1, win)]
    first, last = voiced.index(True), len(voiced) - 1 - voiced[::-1].index(True)
    gap = run = 0
    for v in voiced[first : last + 1]:
        run = 0 if v else run + 1
        gap = max(gap, run)
    if gap * 10 >= IS_FINAL_S * 1000 and ", " in text:
        head, tail = text.split(", ", 1)
        return [head + ",", tail]
    return [text]


def _first_chunk_tokens(reply: str, chunk_text: str) -> int:
    """Index of the token that completes the first chunk (as the chat server tokenizes)."""
    from tests.servers.openai_chat import tokenize

    end = len(chunk_text) + (len(reply) - len(reply.lstrip()))
    pos = 0
    for k, tok in enumerate(tokenize(reply)):
        pos += len(tok)
        if pos >= end:
            return k
    return len(tokenize(reply)) - 1


async def run_cloud(runs: int = 20, *, preemptive: bool = True) -> dict[str, Any]:
    from tests.servers.deepgram import DeepgramProfile, FakeDeepgramServer
    from tests.servers.openai_chat import ChatBehavior, FakeChatServer
    from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior

    fixtures = load_fixtures()
    first_voiced = {fx.name: json.loads((FIXTURES / f"{fx.name}.json").read_text())["first_voiced_sample"] for fx in fixtures}
    answers = replies(len(fixtures), seed=11)
    answer_for = {fx.text: answers[i] for i, fx in enumerate(fixtures)}
    rng = np.random.default_rng(5)
    try:
        from ..providers.silero_vad import SileroTurnDetector, SpeechStart

        silero_ok = True
    except Exception:  # pragma: no cover - the embedded VAD is optional for this bench
        silero_ok = False

    ttfa: list[float] = []
    overhead: list[float] = []
    first_byte: list[float] = []
    stt_barge: list[float] = []
    vad_barge: list[float] = []
    stage_samples: list[dict[str, float]] = []
    errors = discarded = 0
    settings = VoiceSettings(tts_provider="openai", tts_voice="alloy", stt_provider="deepgram", vad_silence_ms=300)
    profile = DeepgramProfile(interim_every_s=INTERIM_S, is_final_after_s=IS_FINAL_S, speech_final_after_s=SPEECH_FINAL_S, energy_threshold=100.0)

    def reply_fn(messages: list[dict]) -> str:
        last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        return answer_for.get(last, "Let me think about that, one moment please.")

    with tempfile.TemporaryDirectory() as tmp:
        async with FakeDeepgramServer(api_key="bench", profile=profile) as dg, FakeChatServer(ChatBehavior(ttft_s=TTFT_S, tokens_per_s=TOKENS_PER_S), reply_fn=reply_fn, api_key="bench") as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=TTS_TTFB_S, realtime_factor=TTS_REALTIME), api_key="bench") as speech:
            settings = settings.replace(llm_base_url=chat.base_url, llm_model_voice="bench-model")
            store = AudioStore(Path(tmp))
            tts = OpenAITTS(base_url=speech.base_url, api_key="bench")
            runner = TurnRunner(llm=OpenAICompatLLM(chat.base_url, api_key="bench"), tts=tts, audio_store=store, settings=settings, cache=_NoCache(store))
            listener = DeepgramListener(api_key="bench", url=dg.url, options=DeepgramOptions(endpointing_ms=300, utterance_end_ms=1000))
            await listener.start()  # session start: the socket is open before anyone speaks
            driver = CloudDriver(runner, preemptive=preemptive)
            consumer = asyncio.create_task(driver.consume(listener))
            try:
                for i in range(runs):
                    fx = fixtures[i % len(fixtures)]
                    dg.say(*_segments(fx.text, fx.pcm))
                    run = driver.run = RunState()
                    vad = SileroTurnDetector(silence_ms=settings.vad_silence_ms, min_speech_ms=settings.vad_min_speech_ms) if silero_ok else None
                    lead = int(LEAD_S * RATE)
                    pcm = _dither(lead, rng) + fx.pcm + _dither(int(TAIL_S * RATE), rng)
                    onset_sample = lead + first_voiced[fx.name]
                    end_sample = lead + fx.last_voiced_sample
                    step = RATE * FRAME_MS // 1000 * 2
                    t_start = now_ms()
                    for k in range(0, len(pcm), step):
                        frame = pcm[k : k + step]
                        due = t_start + (k + len(frame)) / 2 / RATE * 1000.0
                        delay = (due - now_ms()) / 1000.0
                        if delay > 0:
                            await asyncio.sleep(delay)
                        t = now_ms()
                        first_s, end_s = k // 2, (k + len(frame)) // 2
                        if first_s <= onset_sample < end_s:
                            run.onset_ms = t - (end_s - onset_sample) / RATE * 1000.0
                        if first_s <= end_sample <= end_s:
                            run.speech_end_ms = t - (end_s - end_sample) / RATE * 1000.0
                        await listener.push(frame, t)
                        if vad is not None and run.vad_speech_started_ms is None:
                            for ev in vad.push(frame):
                                if isinstance(ev, SpeechStart) and run.onset_ms is not None:
                                    run.vad_speech_started_ms = now_ms() - run.onset_ms
                    try:
                        await asyncio.wait_for(run.done.wait(), 5.0)
                        a = run.committed
                        assert a is not None and a.task is not None
                        await asyncio.wait_for(asyncio.shield(a.task), 15.0)
                    except (asyncio.TimeoutError, AssertionError):
                        errors += 1
                        continue
                    discarded += run.discarded
                    if a.error or a.first_audio is None or a.first_chunk is None or run.speech_end_ms is None:
                        errors += 1
                        continue
                    m = a.marks
                    m.mark("speech_end", run.speech_end_ms, overwrite=True)
                    measured = m.first_audio_ready - run.speech_end_ms
                    k_tok = _first_chunk_tokens(a.reply, a.first_chunk.text)
                    stt_wait = IS_FINAL_S if preemptive else SPEECH_FINAL_S
                    ideal = 1000.0 * (stt_wait + TTFT_S + k_tok / TOKENS_PER_S + TTS_TTFB_S + transfer_s(a.first_chunk.speech))
                    ttfa.append(measured)
                    overhead.append(measured - ideal)
                    if m.tts_first_request is not None:
                        bytes_after = [b * 1000.0 for b in speech.first_byte_at if b * 1000.0 >= m.tts_first_request]
                        if bytes_after:
                            first_byte.append(min(bytes_after) - run.speech_end_ms)
                    if run.stt_speech_started_ms is not None:
                        stt_barge.append(run.stt_speech_started_ms)
                    if run.vad_speech_started_ms is not None:
                        vad_barge.append(run.vad_speech_started_ms)
                    s = m.stages()
                    s["stt_final_after_speech_end"] = round(m.stt_final - run.speech_end_ms, 1)
                    s["eot_after_speech_end"] = round(m.eot_decided - run.speech_end_ms, 1) if m.eot_decided else None
                    s["listener_speech_end_error"] = round((run.eot.speech_end_ms if run.eot else 0) - run.speech_end_ms, 1)
                    s["overhead"] = round(measured - ideal, 1)
                    stage_samples.append({k: v for k, v in s.items() if v is not None})
                    await asyncio.sleep(0.2)  # let the noise tail and keep-alive settle between turns
            finally:
                consumer.cancel()
                with contextlib.suppress(BaseException):
                    await consumer
                await listener.aclose()
                await tts.aclose()
    return {
        "scenario": "cloud",
        "runs": runs,
        "time_to_first_audio_ms": p50_p95(ttfa),
        "overhead_ms": p50_p95(overhead),
        "time_to_first_audio_byte_ms": p50_p95(first_byte),
        "barge_in_ms": {"deepgram_speech_started": p50_p95(stt_barge), "server_vad": p50_p95(vad_barge)},
        "stages_ms": stages(stage_samples),
        "errors": errors,
        "preemptive": preemptive,
        "discarded_preemptive_turns": discarded,
        "profile": {"deepgram_interim_ms": INTERIM_S * 1000, "deepgram_is_final_ms": IS_FINAL_S * 1000, "deepgram_speech_final_ms": SPEECH_FINAL_S * 1000, "llm_ttft_ms": TTFT_S * 1000, "llm_tokens_per_s": TOKENS_PER_S, "tts_ttfb_ms": TTS_TTFB_S * 1000, "tts_realtime_factor": TTS_REALTIME},
    }
