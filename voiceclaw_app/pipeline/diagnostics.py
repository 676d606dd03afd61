"""Provider checks in plain words: reachable? key accepted? does it stream? how fast?

Shared by ``python -m voiceclaw_app.cli doctor`` and the settings page's "test
connection" buttons. Works on the provider interfaces only, so every provider
(cloud or embedded) is checked the same way.
"""

from __future__ import annotations

import asyncio
from dataclasses import asdict, dataclass

from ..providers.base import LLM, STT, TTS, CancelToken, ChatMessage, LLMRequest, ProviderError
from .timing import now_ms


@dataclass
class CheckResult:
    provider: str
    ok: bool
    message: str
    connect_ms: float | None = None
    first_token_ms: float | None = None  # LLM first token / TTS whole short phrase

    def to_dict(self) -> dict:
        return asdict(self)


async def check_llm(llm: LLM, model: str, *, timeout_s: float = 20.0, headers: dict[str, str] | None = None) -> CheckResult:
    t0 = now_ms()
    await llm.warm()
    connect = now_ms() - t0
    request = LLMRequest(messages=[ChatMessage("user", "Reply with the single word: ready.")], model=model, headers=dict(headers or {}), read_timeout_s=timeout_s, max_tokens=8)
    t1 = now_ms()
    first: float | None = None
    text = ""
    try:
        async for delta in llm.stream(request, CancelToken()):
            if first is None:
                first = now_ms() - t1
            text += delta
            if len(text) > 40:
                break
    except ProviderError as exc:
        return CheckResult(llm.name, False, exc.user_message, round(connect, 1))
    if first is None:
        return CheckResult(llm.name, False, "The LLM answered but streamed no text.", round(connect, 1))
    return CheckResult(llm.name, True, f"Streams text; first token after {first:.0f} ms.", round(connect, 1), round(first, 1))


async def check_tts(tts: TTS, voice: str, speed: float = 1.0) -> CheckResult:
    t0 = now_ms()
    await tts.warm()
    connect = now_ms() - t0
    t1 = now_ms()
    try:
        clip = await tts.synthesize("Voice check.", voice=voice, speed=speed, cancel=CancelToken())
    except ProviderError as exc:
        return CheckResult(tts.name, False, exc.user_message, round(connect, 1))
    took = now_ms() - t1
    if clip.duration_ms <= 0:
        return CheckResult(tts.name, False, "The speech service returned no audio.", round(connect, 1))
    return CheckResult(tts.name, True, f"Speaks: {clip.duration_ms:.0f} ms of audio in {took:.0f} ms.", round(connect, 1), round(took, 1))


async def check_stt(stt: STT, language: str = "en") -> CheckResult:
    t0 = now_ms()
    try:
        await stt.warm()
        silence = bytes(2 * 16000)  # one second of silence must give an empty transcript, not an error
        result = await asyncio.wait_for(stt.transcribe(silence, sample_rate=16000, language=language), timeout=30)
    except ProviderError as exc:
        return CheckResult(stt.name, False, exc.user_message)
    except asyncio.TimeoutError:
        return CheckResult(stt.name, False, "Speech-to-text did not answer within 30 s.")
    took = now_ms() - t0
    return CheckResult(stt.name, True, f"Transcribes ({took:.0f} ms for one second of audio{'' if not result.text else ', heard: ' + result.text[:40]}).", None, round(took, 1))
