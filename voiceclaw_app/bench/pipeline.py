"""``bench pipeline``: 30 text turns against local protocol servers with the guide's profile.

LLM: first token 300 ms, then 40 tokens/s (tests/servers/openai_chat.py).
TTS: first byte 200 ms, then audio at 5x real time (tests/servers/openai_speech.py).
Both reached through the real clients (SSE over httpx, the openai SDK), so the
figure includes HTTP, parsing, chunking, scheduling, WAV writing and event hops.

``overhead`` = measured time to first audio ready minus the ideal critical path:
first token + the first chunk's remaining tokens (up to the token that completes
it) + TTS first byte + the transfer of the first playable piece of its audio (the
streaming TTS client hands over a chunk's first 300 ms as soon as they arrive).
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

from ..config import VoiceSettings
from ..pipeline.audio_store import AudioStore
from ..pipeline.events import AudioReady, ChunkText, TurnDone, TurnError
from ..pipeline.tts_scheduler import TTSCache
from ..pipeline.turn import TurnRunner
from ..providers.openai_llm import OpenAICompatLLM
from ..providers.openai_tts import OpenAITTS
from .stats import p50_p95, stages

TTFT_S = 0.3
TOKENS_PER_S = 40.0
TTS_TTFB_S = 0.2
TTS_REALTIME = 5.0

OPENERS = [
    "Sure, I can help with that",
    "Good question, the short answer is yes",
    "Right now the weather looks clear and mild",
    "Your next meeting starts at 10:30 with Dr. Patel",
    "I checked your calendar and tomorrow is free",
    "The package shipped on Monday and should arrive soon",
    "That costs about $4.50, which is a good deal",
    "Here is what I found about the U.S. election",
]
BODIES = [
    "It should take about five minutes. Let me know if you want the details.",
    "I added it to your list. Anything else I can do for you today?",
    "The store closes at nine tonight. You still have plenty of time.",
    "I would bring an umbrella just in case. The forecast changes quickly.",
]


class UncachedTTS(TTSCache):
    """Replies (and fixtures) repeat: a benchmark measures real synthesis, never cache hits."""

    def get(self, identity, text):
        return None

    def put(self, identity, text, clip):
        return None


def first_chunk_tokens(reply: str, chunk_text: str) -> int:
    """Index of the token that completes the first chunk (as the chat server tokenizes)."""
    from tests.servers.openai_chat import tokenize

    tokens = tokenize(reply)
    end = len(chunk_text) + (len(reply) - len(reply.lstrip()))
    pos = 0
    for k, tok in enumerate(tokens):
        pos += len(tok)
        if pos >= end:
            return k
    return len(tokens) - 1


def transfer_s(text: str) -> float:
    """How long after its first byte the speech server has sent the first playable
    piece of this text's audio (the streaming client hands over the first
    ``FIRST_PIECE_MS``; the server writes 20 ms slices paced at 5x real time)."""
    from tests.servers.openai_speech import MS_PER_CHAR, SAMPLE_RATE
    from ..providers.openai_tts import FIRST_PIECE_MS

    n_bytes = 2 * int(max(0.2, len(text) * MS_PER_CHAR / 1000.0) * SAMPLE_RATE)
    n_bytes = min(n_bytes, 2 * SAMPLE_RATE * FIRST_PIECE_MS // 1000)
    bytes_per_s = SAMPLE_RATE * 2 * TTS_REALTIME
    step = max(2, int(bytes_per_s * 0.020) & ~1)
    return ((n_bytes - 1) // step) * step / bytes_per_s


def replies(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(OPENERS)}, {rng.choice(['and', 'so', 'but'])} {rng.choice(BODIES)}" for _ in range(n)]


async def run_pipeline(runs: int = 30) -> dict[str, Any]:
    from tests.servers.openai_chat import ChatBehavior, FakeChatServer
    from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior

    texts = replies(runs)
    ttfa: list[float] = []
    overhead: list[float] = []
    stage_samples: list[dict[str, float]] = []
    errors = 0
    with tempfile.TemporaryDirectory() as tmp:
        async with FakeChatServer(ChatBehavior(ttft_s=TTFT_S, tokens_per_s=TOKENS_PER_S), api_key="bench") as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=TTS_TTFB_S, realtime_factor=TTS_REALTIME), api_key="bench") as speech:
            settings = VoiceSettings(llm_base_url=chat.base_url, llm_model_voice="bench-model", tts_provider="openai", tts_voice="alloy")
            llm = OpenAICompatLLM(chat.base_url, api_key="bench")
            tts = OpenAITTS(base_url=speech.base_url, api_key="bench", model="gpt-4o-mini-tts")
            store = AudioStore(Path(tmp))
            runner = TurnRunner(llm=llm, tts=tts, audio_store=store, settings=settings, cache=UncachedTTS(store))
            for i, reply in enumerate(texts):
                chat.then(reply=reply)
                await runner.warm()  # as when the user starts speaking
                first_chunk: ChunkText | None = None
                first_audio: AudioReady | None = None
                result = None
                async for ev in runner.run(runner.prepare([], f"bench-{i}"), "What's new?"):
                    if isinstance(ev, ChunkText) and first_chunk is None:
                        first_chunk = ev
                    elif isinstance(ev, AudioReady) and first_audio is None:
                        first_audio = ev
                    elif isinstance(ev, (TurnDone, TurnError)):
                        result = ev
                if not isinstance(result, TurnDone) or first_chunk is None or first_audio is None:
                    errors += 1
                    continue
                m = result.marks
                measured = m.first_audio_ready - m.stt_final
                # ideal critical path for this reply's first chunk
                k = first_chunk_tokens(reply, first_chunk.text)
                ideal = 1000.0 * (TTFT_S + k / TOKENS_PER_S + TTS_TTFB_S + transfer_s(first_chunk.speech))
                ttfa.append(measured)
                overhead.append(measured - ideal)
                s = m.stages()
                s["overhead"] = round(measured - ideal, 1)
                stage_samples.append(s)
            await tts.aclose()
    return {
        "scenario": "pipeline",
        "runs": runs,
        "time_to_first_audio_ms": p50_p95(ttfa),
        "overhead_ms": p50_p95(overhead),
        "stages_ms": stages(stage_samples),
        "errors": errors,
        "profile": {"llm_ttft_ms": TTFT_S * 1000, "llm_tokens_per_s": TOKENS_PER_S, "tts_ttfb_ms": TTS_TTFB_S * 1000, "tts_realtime_factor": TTS_REALTIME},
    }
