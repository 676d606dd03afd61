"""``bench cloud``: spoken turns through Deepgram / LLM / TTS protocol servers, with the guide's profile.

Local servers speaking each real protocol (tests/servers), reached through the real
clients (deepgram-sdk WebSocket, SSE over httpx, the openai SDK):

* Deepgram: interim results every 200 ms during speech, ``is_final`` 150 ms and
  ``speech_final`` 300 ms after the end of speech, ``SpeechStarted`` after 50 ms of voice.
* LLM: first token 300 ms, then 40 tokens/s.
* TTS: first byte 200 ms, then audio at 5x real time.

The spoken fixtures (tests/fixtures, known last voiced sample) are paced into a
:class:`DeepgramListener` at real time in 20 ms frames, with a little noise. The
app's :class:`TurnStarter` does what it does in the voice session: prepare and warm
at ``SpeechStarted``, start the turn **preemptively** on ``is_final``
(:class:`PreliminaryTranscript`), drop it if the user keeps talking, commit it on
``speech_final`` when the words hold. Two fixtures pause mid-sentence ("Good morning, how are you doing?"), so
the discard path runs too.

Figures (ms, p50/p95): ``time_to_first_audio`` = first audio ready (whole first
chunk stored at its URL) - speech end (the fixture's last voiced sample);
``overhead`` = that minus the ideal critical path (is_final delay + LLM first token
+ the first chunk's remaining tokens + TTS first byte + the first chunk's audio
transfer); ``time_to_first_audio_byte`` = when the TTS server sent the first audio
byte of the reply (what a player that streams partial audio could start on);
``barge_in`` = speech start detection latency (after the fixture's first voiced
sample) of each source, as the listener reports them: Deepgram's ``SpeechStarted``
(the profile's 50 ms plus the transport), the server Silero gate's tentative onset
(64 ms of voice: playback pauses) and its confirmation (``vad_min_speech_ms``), and
the first of them. The listener is built as production builds it
(``providers.factory``): with the server's Silero VAD as its per-frame gate
(``vad_gate`` says whether it loaded; ``vad_gate_ms_per_frame`` is its measured cost
on the event loop).

This drives a real voice session (listener, :class:`TurnStarter`, reply) rather
than ``/ws/voice`` (the socket's handler goes through Reflex state, which needs the
whole app running), through :class:`~.drive.SessionDriver`, which is what the
socket's ``_on_listen_event`` does with each listener event; the frames enter the
listener exactly as the socket handler passes them.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import VoiceSettings
from ..pipeline.audio_store import AudioStore
from ..pipeline.timing import now_ms
from ..pipeline.turn import TurnRunner
from ..providers.base import ListenEvent, SpeechStarted
from ..providers.deepgram_stt import DeepgramListener, DeepgramOptions
from ..providers.openai_llm import OpenAICompatLLM
from ..providers.openai_tts import OpenAITTS
from .drive import BenchServices, SessionDriver, dither, load_fixtures, paced
from .pipeline import TOKENS_PER_S, TTFT_S, TTS_REALTIME, TTS_TTFB_S, UncachedTTS, first_chunk_tokens, replies, transfer_s
from .stats import p50_p95, stages

IS_FINAL_S = 0.15
SPEECH_FINAL_S = 0.3
INTERIM_S = 0.2
FRAME_MS = 20
RATE = 16000
LEAD_S = 0.3  # noise before each utterance
TAIL_S = 1.6  # noise after it (the turn runs meanwhile; the listener stops streaming it)


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


async def run_cloud(runs: int = 20, *, preemptive: bool = True) -> dict[str, Any]:
    from tests.servers.deepgram import DeepgramProfile, FakeDeepgramServer
    from tests.servers.openai_chat import ChatBehavior, FakeChatServer
    from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior

    fixtures = load_fixtures()
    answers = replies(len(fixtures), seed=11)
    answer_for = {fx.text: answers[i] for i, fx in enumerate(fixtures)}
    rng = np.random.default_rng(5)
    from ..providers.factory import _server_vad

    ttfa: list[float] = []
    overhead: list[float] = []
    first_byte: list[float] = []
    barge: dict[str, list[float]] = {"deepgram_speech_started": [], "server_vad_tentative": [], "server_vad_confirmed": [], "first": []}
    stage_samples: list[dict[str, float]] = []
    errors = discarded = 0
    settings = VoiceSettings(tts_provider="openai", tts_voice="alloy", stt_provider="deepgram", vad_silence_ms=300)
    profile = DeepgramProfile(interim_every_s=INTERIM_S, is_final_after_s=IS_FINAL_S, speech_final_after_s=SPEECH_FINAL_S, energy_threshold=100.0)

    def reply_fn(messages: list[dict]) -> str:
        last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        return answer_for.get(last, "Let me think about that, one moment please.")

    onset: dict[str, Any] = {"ms": None, "seen": {}}  # this utterance's voice onset, and each source's first start after it

    def on_event(ev: ListenEvent) -> None:
        if not isinstance(ev, SpeechStarted) or onset["ms"] is None or now_ms() < onset["ms"]:
            return
        key = "deepgram_speech_started" if ev.source == "stt" else ("server_vad_tentative" if ev.tentative else "server_vad_confirmed")
        seen = onset["seen"]
        seen.setdefault(key, now_ms() - onset["ms"])
        seen.setdefault("first", now_ms() - onset["ms"])
        if key == "server_vad_confirmed":  # confirmed at once (no tentative step): the onset too
            seen.setdefault("server_vad_tentative", seen[key])

    with tempfile.TemporaryDirectory() as tmp:
        async with FakeDeepgramServer(api_key="bench", profile=profile) as dg, FakeChatServer(ChatBehavior(ttft_s=TTFT_S, tokens_per_s=TOKENS_PER_S), reply_fn=reply_fn, api_key="bench") as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=TTS_TTFB_S, realtime_factor=TTS_REALTIME), api_key="bench") as speech:
            settings = settings.replace(llm_base_url=chat.base_url, llm_model_voice="bench-model")
            store = AudioStore(Path(tmp))
            tts = OpenAITTS(base_url=speech.base_url, api_key="bench")
            runner = TurnRunner(llm=OpenAICompatLLM(chat.base_url, api_key="bench"), tts=tts, audio_store=store, settings=settings, cache=UncachedTTS(store))
            # as providers.factory builds it: the server's Silero VAD as the per-frame gate
            listener = DeepgramListener(api_key="bench", url=dg.url, options=DeepgramOptions(endpointing_ms=300, utterance_end_ms=1000), vad=_server_vad(), vad_min_speech_ms=settings.vad_min_speech_ms)
            vad_gate = listener.vad is not None
            await listener.start()  # session start: the socket is open before anyone speaks
            session = SessionDriver(BenchServices(settings.replace(speculative=preemptive), runner, listener), conversation_id="", on_event=on_event)
            await session.start()  # the session takes the listener (and sets it hands-free)
            try:
                for i in range(runs):
                    fx = fixtures[i % len(fixtures)]
                    dg.say(*_segments(fx.text, fx.pcm))
                    out = session.expect()
                    lead = int(LEAD_S * RATE)
                    pcm = dither(lead, rng) + fx.pcm + dither(int(TAIL_S * RATE), rng)
                    t_start = now_ms()
                    onset["ms"], onset["seen"] = t_start + 1000.0 * (lead + fx.first_voiced_sample) / RATE, {}
                    speech_end_ms = t_start + 1000.0 * (lead + fx.last_voiced_sample) / RATE
                    async for _, frame, due in paced(pcm, FRAME_MS, t_start):
                        await session.push(frame, due)
                    try:
                        await out.finished(5.0, 15.0)
                    except asyncio.TimeoutError:
                        errors += 1
                        continue
                    discarded += out.discarded
                    if out.error or out.first_audio is None or out.first_chunk is None or out.audio_ready_ms is None:
                        errors += 1
                        continue
                    m = out.committed.marks
                    listener_speech_end = m.speech_end  # Deepgram's estimate (EndOfTurn.speech_end_ms)
                    m.mark("speech_end", speech_end_ms, overwrite=True)
                    measured = out.audio_ready_ms - speech_end_ms
                    k_tok = first_chunk_tokens(out.reply, out.first_chunk.text)
                    stt_wait = IS_FINAL_S if preemptive else SPEECH_FINAL_S
                    ideal = 1000.0 * (stt_wait + TTFT_S + k_tok / TOKENS_PER_S + TTS_TTFB_S + transfer_s(out.first_chunk.speech))
                    ttfa.append(measured)
                    overhead.append(measured - ideal)
                    if m.tts_first_request is not None:
                        bytes_after = [b * 1000.0 for b in speech.first_byte_at if b * 1000.0 >= m.tts_first_request]
                        if bytes_after:
                            first_byte.append(min(bytes_after) - speech_end_ms)
                    # the gate's own timing, even when Deepgram's SpeechStarted was reported first
                    for kind, at in list(listener.vad_marks):
                        key = "server_vad_tentative" if kind == "onset" else "server_vad_confirmed"
                        if at >= onset["ms"] and key not in onset["seen"]:
                            onset["seen"][key] = at - onset["ms"]
                    for key, v in onset["seen"].items():
                        barge[key].append(v)
                    s = m.stages()
                    s["stt_final_after_speech_end"] = round(m.stt_final - speech_end_ms, 1)
                    s["eot_after_speech_end"] = round(m.eot_decided - speech_end_ms, 1) if m.eot_decided else None
                    s["listener_speech_end_error"] = round(listener_speech_end - speech_end_ms, 1) if listener_speech_end is not None else None
                    s["overhead"] = round(measured - ideal, 1)
                    stage_samples.append({k: v for k, v in s.items() if v is not None})
                    await asyncio.sleep(0.2)  # let the noise tail and keep-alive settle between turns
            finally:
                vad_stats = dict(listener.stats)
                await session.aclose()
                await listener.aclose()
                await tts.aclose()
    return {
        "scenario": "cloud",
        "runs": runs,
        "time_to_first_audio_ms": p50_p95(ttfa),
        "overhead_ms": p50_p95(overhead),
        "time_to_first_audio_byte_ms": p50_p95(first_byte),
        "barge_in_ms": {k: p50_p95(v) for k, v in barge.items()},
        "vad_gate": vad_gate,
        "vad_gate_ms_per_frame": {"mean": round(vad_stats["vad_ms"] / max(1, vad_stats["vad_calls"]), 3), "max": round(vad_stats["vad_max_ms"], 3), "frames": vad_stats["vad_calls"]},
        "stages_ms": stages(stage_samples),
        "errors": errors,
        "preemptive": preemptive,
        "discarded_preemptive_turns": discarded,
        "profile": {"deepgram_interim_ms": INTERIM_S * 1000, "deepgram_is_final_ms": IS_FINAL_S * 1000, "deepgram_speech_final_ms": SPEECH_FINAL_S * 1000, "llm_ttft_ms": TTFT_S * 1000, "llm_tokens_per_s": TOKENS_PER_S, "tts_ttfb_ms": TTS_TTFB_S * 1000, "tts_realtime_factor": TTS_REALTIME},
    }
