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
import contextlib
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..config import VoiceSettings
from ..pipeline.audio_store import AudioStore
from ..pipeline.timing import now_ms
from ..pipeline.turn import TurnRunner
from ..providers.base import ListenEvent, SpeechStarted
from ..providers.deepgram_flux import FluxListener, FluxOptions
from ..providers.deepgram_stt import DeepgramListener, DeepgramOptions
from ..providers.deepgram_tts import DeepgramTTS
from ..providers.openai_llm import OpenAICompatLLM
from ..providers.openai_realtime_tts import OpenAIRealtimeTTS
from ..providers.openai_tts import OpenAITTS
from .drive import BenchServices, SessionDriver, dither, load_fixtures, paced
from .pipeline import TOKENS_PER_S, TTFT_S, TTS_REALTIME, TTS_TTFB_S, UncachedTTS, first_chunk_tokens, replies, transfer_s
from .stats import p50_p95, stages

IS_FINAL_S = 0.15
SPEECH_FINAL_S = 0.3
INTERIM_S = 0.2
FRAME_MS = 20
#: the mean wait for the frame that carries the end of the service's silence wait
FRAME_WAIT_S = FRAME_MS / 2 / 1000.0
RATE = 16000
LEAD_S = 0.3  # noise before each utterance
TAIL_S = 1.6  # noise after it (the turn runs meanwhile; the listener stops streaming it)
FLUX_EAGER_S = 0.15  # Flux EagerEndOfTurn after the speech end (eager_eot_threshold 0.5)
FLUX_EOT_S = 0.26  # Flux EndOfTurn (vendor: ~260 ms)
TTS_FIRST_AUDIO_S = 0.175  # Aura / Realtime: first audio after a flush (the guide: 150-200 ms)
TTS_CHOICES = ("openai", "deepgram", "openai-realtime")
STT_CHOICES = ("deepgram", "flux")


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


class CloudVoices:
    """The protocol servers and clients for one ``--tts`` / ``--stt`` choice, with the
    guide's profile: LLM first token 300 ms then 40 tokens/s; TTS first audio
    :data:`TTS_FIRST_AUDIO_S` after a flush (Aura, Realtime) or the speech endpoint's
    first byte 200 ms after the request (``openai``); Deepgram v1 ``is_final`` 150 ms /
    ``speech_final`` 300 ms, Flux ``EagerEndOfTurn`` 150 ms / ``EndOfTurn`` 260 ms
    after the speech end. Also what :mod:`.cloud_ws` points the app at."""

    def __init__(self, tts: str = "openai", stt: str = "deepgram", reply_fn=None):
        if tts not in TTS_CHOICES or stt not in STT_CHOICES:
            raise SystemExit(f"--tts is one of {', '.join(TTS_CHOICES)}; --stt one of {', '.join(STT_CHOICES)}")
        self.tts_kind, self.stt_kind, self.reply_fn = tts, stt, reply_fn
        self._stack: contextlib.AsyncExitStack | None = None

    async def __aenter__(self) -> "CloudVoices":
        from tests.servers.deepgram import DeepgramProfile, FakeDeepgramServer
        from tests.servers.openai_chat import ChatBehavior, FakeChatServer
        from tests.servers.openai_realtime import FakeRealtimeServer
        from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior

        self._stack = stack = contextlib.AsyncExitStack()
        profile = DeepgramProfile(interim_every_s=INTERIM_S, is_final_after_s=IS_FINAL_S, speech_final_after_s=SPEECH_FINAL_S, energy_threshold=100.0)
        self.dg = await stack.enter_async_context(FakeDeepgramServer(api_key="bench", profile=profile))
        self.dg.flux.profile.eager_after_s, self.dg.flux.profile.eot_after_s, self.dg.flux.profile.energy_threshold = FLUX_EAGER_S, FLUX_EOT_S, 100.0
        self.dg.speak.profile.first_audio_s = TTS_FIRST_AUDIO_S
        self.chat = await stack.enter_async_context(FakeChatServer(ChatBehavior(ttft_s=TTFT_S, tokens_per_s=TOKENS_PER_S), reply_fn=self.reply_fn, api_key="bench"))
        self.speech = await stack.enter_async_context(FakeSpeechServer(SpeechBehavior(ttfb_s=TTS_TTFB_S, realtime_factor=TTS_REALTIME), api_key="bench"))
        self.realtime = await stack.enter_async_context(FakeRealtimeServer(api_key="bench"))
        self.realtime.profile.first_audio_s = TTS_FIRST_AUDIO_S
        return self

    async def __aexit__(self, *exc) -> None:
        assert self._stack is not None
        await self._stack.aclose()

    def say(self, fx) -> None:
        """The transcript(s) the STT server will give for this fixture."""
        self.dg.say(*(_segments(fx.text, fx.pcm) if self.stt_kind == "deepgram" else [fx.text]))

    def tts(self):
        if self.tts_kind == "deepgram":
            return DeepgramTTS(api_key="bench", url=self.dg.url)
        if self.tts_kind == "openai-realtime":
            return OpenAIRealtimeTTS(api_key="bench", base_url=self.realtime.base_url)
        return OpenAITTS(base_url=self.speech.base_url, api_key="bench")

    def listener(self, settings: VoiceSettings, vad):
        if self.stt_kind == "flux":
            return FluxListener(api_key="bench", url=self.dg.url, flux=FluxOptions(eot_threshold=settings.eot_threshold, eager_eot_threshold=settings.eager_eot_threshold, eot_timeout_ms=settings.eot_timeout_ms), vad=vad, vad_min_speech_ms=settings.vad_min_speech_ms)
        return DeepgramListener(api_key="bench", url=self.dg.url, options=DeepgramOptions(endpointing_ms=300, utterance_end_ms=1000), vad=vad, vad_min_speech_ms=settings.vad_min_speech_ms)

    def env(self) -> dict[str, str]:
        """The app's environment for these servers (``--via-ws``)."""
        tts_url = self.realtime.base_url if self.tts_kind == "openai-realtime" else self.speech.base_url
        return {
            "VOICECLAW_STT": "deepgram-flux" if self.stt_kind == "flux" else "deepgram", "DEEPGRAM_API_KEY": "bench", "VOICECLAW_DEEPGRAM_URL": self.dg.url,
            "VOICECLAW_TTS": self.tts_kind, "OPENAI_API_KEY": "bench", "VOICECLAW_TTS_BASE_URL": tts_url, "VOICECLAW_TTS_VOICE": "alloy" if self.tts_kind == "openai" else "",
            "VOICECLAW_LLM_BASE_URL": self.chat.base_url, "VOICECLAW_LLM_API_KEY": "bench", "VOICECLAW_LLM_MODEL": "bench-model",
        }

    def first_audio_times(self) -> list[float]:
        """Monotonic s at which the TTS server sent each first audio (Realtime: not recorded)."""
        if self.tts_kind == "openai":
            return list(self.speech.first_byte_at)
        if self.tts_kind == "deepgram":
            return [t for sess in self.dg.speak.sessions for t in sess.first_audio_at]
        return []

    def stt_wait_s(self, preemptive: bool) -> float:
        """When the reply can start after the speech end (the STT's share of the floor).

        Plus half a mic frame: the audio that completes the service's silence wait
        reaches it only with the end of its 20 ms frame (the browser's frame size),
        10 ms later on average, whatever the client does. ``overhead_ms`` is measured
        above this; ``frame_wait_ms`` in the output says how much of the floor it is."""
        wait = FLUX_EAGER_S if preemptive else FLUX_EOT_S
        if self.stt_kind != "flux":
            wait = IS_FINAL_S if preemptive else SPEECH_FINAL_S
        return wait + FRAME_WAIT_S

    def tts_first_audio_s(self, speech: str) -> float:
        """Request/flush -> the first playable piece of this chunk (the TTS share of the floor)."""
        if self.tts_kind == "openai":
            return TTS_TTFB_S + transfer_s(speech)
        return TTS_FIRST_AUDIO_S  # one frame (200 ms of audio) fills the first piece

    def floor_ms(self, reply: str, first_chunk, preemptive: bool) -> float:
        """The ideal critical path: STT wait + LLM first token + the first chunk's remaining
        tokens + TTS first audio. Nothing of the app's own work is in it."""
        k_tok = first_chunk_tokens(reply, first_chunk.text)
        return 1000.0 * (self.stt_wait_s(preemptive) + TTFT_S + k_tok / TOKENS_PER_S + self.tts_first_audio_s(first_chunk.speech))

    def profile(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tts": self.tts_kind, "stt": self.stt_kind, "llm_ttft_ms": TTFT_S * 1000, "llm_tokens_per_s": TOKENS_PER_S, "frame_wait_ms": FRAME_WAIT_S * 1000}
        if self.stt_kind == "flux":
            out.update(flux_eager_eot_ms=FLUX_EAGER_S * 1000, flux_eot_ms=FLUX_EOT_S * 1000)
        else:
            out.update(deepgram_interim_ms=INTERIM_S * 1000, deepgram_is_final_ms=IS_FINAL_S * 1000, deepgram_speech_final_ms=SPEECH_FINAL_S * 1000)
        if self.tts_kind == "openai":
            out.update(tts_ttfb_ms=TTS_TTFB_S * 1000, tts_realtime_factor=TTS_REALTIME)
        else:
            out.update(tts_first_audio_after_flush_ms=TTS_FIRST_AUDIO_S * 1000)
        return out


async def run_cloud(runs: int = 20, *, preemptive: bool = True, tts: str = "openai", stt: str = "deepgram") -> dict[str, Any]:
    fixtures = load_fixtures()
    answers = replies(len(fixtures), seed=11)
    answer_for = {fx.text: answers[i] for i, fx in enumerate(fixtures)}
    rng = np.random.default_rng(5)
    from ..providers.factory import _server_vad

    ttfa: list[float] = []
    overhead: list[float] = []
    floors: list[float] = []
    reasons: list[str] = []
    first_byte: list[float] = []
    barge: dict[str, list[float]] = {"deepgram_speech_started": [], "server_vad_tentative": [], "server_vad_confirmed": [], "first": []}
    stage_samples: list[dict[str, float]] = []
    errors = discarded = 0
    settings = VoiceSettings(tts_provider=tts, tts_voice="alloy" if tts == "openai" else "", stt_provider="deepgram-flux" if stt == "flux" else "deepgram", vad_silence_ms=300)

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
        async with CloudVoices(tts, stt, reply_fn) as voices:
            dg, chat, speech = voices.dg, voices.chat, voices.speech
            settings = settings.replace(llm_base_url=chat.base_url, llm_model_voice="bench-model")
            store = AudioStore(Path(tmp))
            tts_client = voices.tts()
            runner = TurnRunner(llm=OpenAICompatLLM(chat.base_url, api_key="bench"), tts=tts_client, audio_store=store, settings=settings, cache=UncachedTTS(store))
            # as providers.factory builds it: the server's Silero VAD as the per-frame gate
            listener = voices.listener(settings, _server_vad())
            vad_gate = listener.vad is not None
            await listener.start()  # session start: the socket is open before anyone speaks
            session = SessionDriver(BenchServices(settings.replace(speculative=preemptive), runner, listener), conversation_id="", on_event=on_event)
            await session.start()  # the session takes the listener (and sets it hands-free)
            try:
                for i in range(runs):
                    fx = fixtures[i % len(fixtures)]
                    voices.say(fx)
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
                        reasons.append(f"{fx.text!r}: {'no turn committed' if out.committed is None else 'turn did not finish'} in time")
                        continue
                    discarded += out.discarded
                    if out.error or out.first_audio is None or out.first_chunk is None or out.audio_ready_ms is None:
                        errors += 1
                        reasons.append(f"{fx.text!r}: {out.error or 'no audio'} {'; '.join(out.notices)}".strip())
                        continue
                    m = out.committed.marks
                    listener_speech_end = m.speech_end  # Deepgram's estimate (EndOfTurn.speech_end_ms)
                    m.mark("speech_end", speech_end_ms, overwrite=True)
                    measured = out.audio_ready_ms - speech_end_ms
                    ideal = voices.floor_ms(out.reply, out.first_chunk, preemptive)
                    floors.append(ideal)
                    ttfa.append(measured)
                    overhead.append(measured - ideal)
                    if m.tts_first_request is not None:
                        bytes_after = [b * 1000.0 for b in voices.first_audio_times() if b * 1000.0 >= m.tts_first_request]
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
                profile_info = voices.profile()
                await session.aclose()
                await listener.aclose()
                await tts_client.aclose()
    return {
        "scenario": "cloud",
        "runs": runs,
        "tts": tts,
        "stt": stt,
        "time_to_first_audio_ms": p50_p95(ttfa),
        "overhead_ms": p50_p95(overhead),
        "floor_ms": p50_p95(floors),
        "time_to_first_audio_byte_ms": p50_p95(first_byte),
        "barge_in_ms": {k: p50_p95(v) for k, v in barge.items()},
        "vad_gate": vad_gate,
        "vad_gate_ms_per_frame": {"mean": round(vad_stats["vad_ms"] / max(1, vad_stats["vad_calls"]), 3), "max": round(vad_stats["vad_max_ms"], 3), "frames": vad_stats["vad_calls"]},
        "stages_ms": stages(stage_samples),
        "errors": errors,
        "error_reasons": reasons,
        "preemptive": preemptive,
        "discarded_preemptive_turns": discarded,
        "profile": profile_info,
    }
