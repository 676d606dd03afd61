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
    first: float | None = None
    audio_ms = 0.0
    try:
        if tts.capabilities.streaming:
            # streaming voices: when the first audio arrives is the figure that matters
            async for piece in tts.synthesize_stream("Voice check.", voice=voice, speed=speed, cancel=CancelToken()):
                first = now_ms() - t1 if first is None else first
                audio_ms += piece.duration_ms
        else:
            audio_ms = (await tts.synthesize("Voice check.", voice=voice, speed=speed, cancel=CancelToken())).duration_ms
    except ProviderError as exc:
        return CheckResult(tts.name, False, exc.user_message, round(connect, 1))
    took = now_ms() - t1
    if audio_ms <= 0:
        return CheckResult(tts.name, False, "The speech service returned no audio.", round(connect, 1))
    socket = "; key accepted, socket open and kept warm" if tts.capabilities.text_stream else ""
    first_txt = f"; first audio after {first:.0f} ms" if first is not None else ""
    return CheckResult(tts.name, True, f"Speaks: {audio_ms:.0f} ms of audio in {took:.0f} ms{first_txt}{socket}.", round(connect, 1), round(first if first is not None else took, 1))


async def check_listener(listener) -> CheckResult:
    """A live listener (e.g. Deepgram Flux) opens its socket: the key is accepted."""
    name = getattr(listener, "name", "listener")
    t0 = now_ms()
    try:
        await listener.start()
    except ProviderError as exc:
        return CheckResult(name, False, exc.user_message)
    finally:
        took = now_ms() - t0
        try:
            await listener.aclose()
        except Exception:  # closing a socket that never opened
            pass
    return CheckResult(name, True, f"Live socket opens ({took:.0f} ms); key accepted.", round(took, 1))


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
