"""Build the configured providers from :class:`VoiceSettings` + :class:`ProviderKeys`.

The one place that chooses local vs cloud, so switching a provider on the settings
page takes effect at the next turn / voice session without a restart (callers
build from the current settings snapshot; nothing here is cached except the
embedded engines, which :mod:`.engines` loads once per process).

* LLM: ``llm_base_url`` set -> :class:`OpenAICompatLLM` (gateway, OpenAI, Ollama...);
  empty -> the embedded local LLM.
* TTS: ``tts_provider`` ``openai`` -> :class:`OpenAITTS` (``VOICECLAW_TTS_BASE_URL``),
  wrapped in :class:`FallbackTTS` when ``fallback_to_local``; ``local`` -> Piper.
* STT (whole clip): ``stt_provider`` ``deepgram`` -> pre-recorded ``/v1/listen``; else Whisper.
* Listener (live session): ``deepgram`` -> :class:`DeepgramListener` (socket opened
  here, at session start), wrapped in :class:`FallbackListener` when
  ``fallback_to_local``; ``local`` -> the embedded VAD + Whisper listener.

The embedded engines are imported lazily, inside the ``_local_*`` functions only, so
cloud-only deployments never load model runtimes and the names live in one place.
``build_llm``/``build_tts``/``build_stt`` are synchronous (the UI calls them in a
worker thread: loading a local model blocks); ``build_listener`` is async (it opens
the Deepgram socket).
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..config import VoiceSettings
from ..secrets import ProviderKeys
from .base import LLM, STT, TTS, EndOfTurn, Listener, ListenNotice, PreliminaryTranscript, SpeechStarted


# ------------------------------------------------------------------ embedded engines (lazy)
def _local_llm(settings: VoiceSettings) -> LLM:
    from . import engines

    return engines.get_llm()


def _local_tts(settings: VoiceSettings) -> TTS:
    from . import engines

    return engines.get_tts()


async def _local_tts_async(settings: VoiceSettings) -> TTS:
    """For the fallback path, which runs on the event loop: load in a thread."""
    from . import engines

    return await engines.aget_engine("tts")  # type: ignore[return-value]


def _local_stt(settings: VoiceSettings) -> STT:
    from . import engines

    return engines.get_stt()


class VadWhisperListener(Listener):
    """Interim embedded listener: silero VAD end of turn + Whisper on the utterance.

    Used only until the embedded-engines issue's ``local_listener.LocalListener``
    exists (that one takes precedence in :func:`_local_listener`). Speculative: the
    utterance is transcribed at the VAD's short pause (PreliminaryTranscript) and the
    transcript reused at the end of turn when no voice came in between.
    """

    def __init__(self, settings: VoiceSettings) -> None:
        from .silero_vad import SileroTurnDetector

        self.settings = settings
        self.detector = SileroTurnDetector(silence_ms=settings.vad_silence_ms, min_speech_ms=settings.vad_min_speech_ms, max_utterance_s=settings.max_utterance_s)
        self._q: asyncio.Queue = asyncio.Queue()
        self._spec: tuple[bytes, asyncio.Task] | None = None
        self._tasks: set[asyncio.Task] = set()

    async def _transcribe(self, pcm: bytes) -> str:
        from . import engines

        stt = await engines.aget_engine("stt")
        result = await stt.transcribe(pcm, sample_rate=16000, language=self.settings.stt_language or "en")  # type: ignore[attr-defined]
        return result.text.strip()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _preliminary(self, pcm: bytes, speech_end_ms: float) -> str:
        text = await self._transcribe(pcm)
        if text and self._spec is not None and self._spec[0] is pcm:
            self._q.put_nowait(PreliminaryTranscript(text, speech_end_ms=speech_end_ms))
        return text

    async def _final(self, ev) -> None:
        from ..pipeline.timing import now_ms

        spec, self._spec = self._spec, None
        try:
            text = await spec[1] if spec is not None and spec[0] == ev.pcm else await self._transcribe(ev.pcm)
        except Exception as exc:  # engine failure: tell the user, keep the session
            self._q.put_nowait(ListenNotice(getattr(exc, "user_message", None) or f"Speech recognition failed: {exc}", kind="error"))
            return
        if text:
            self._q.put_nowait(EndOfTurn(text=text, speech_end_ms=ev.speech_end_ms, eot_ms=ev.t_ms, stt_final_ms=now_ms()))
        else:
            self._q.put_nowait(ListenNotice("No speech was recognized.", kind="empty"))

    def _dispatch(self, events: list) -> None:
        from . import silero_vad as sv

        for ev in events:
            if isinstance(ev, sv.SpeechStart):
                self._q.put_nowait(SpeechStarted(t_ms=ev.start_ms, source="vad"))
            elif isinstance(ev, sv.ShortPause) and self.settings.speculative:
                self._spec = (ev.pcm, self._spawn(self._preliminary(ev.pcm, ev.speech_end_ms)))
            elif isinstance(ev, sv.SpeechResumed):
                if self._spec is not None:
                    self._spec[1].cancel()
                self._spec = None
            elif isinstance(ev, sv.EndOfTurn):
                self._spawn(self._final(ev))
            elif isinstance(ev, sv.MaxLengthCut):
                self._q.put_nowait(ListenNotice(ev.message))

    async def push(self, pcm16: bytes, t_ms: float) -> None:
        self._dispatch(self.detector.push(pcm16, t_ms))

    async def finish_utterance(self) -> None:
        self._dispatch(self.detector.flush())

    def events(self):
        return self._iter()

    async def _iter(self):
        while True:
            ev = await self._q.get()
            if ev is None:
                return
            yield ev

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self.detector.close()
        self._q.put_nowait(None)


async def _local_listener(settings: VoiceSettings) -> Listener:
    """The embedded VAD + Whisper listener (the embedded-engines issue's, else the interim one here)."""
    try:
        from .local_listener import LocalListener  # type: ignore[import-not-found]
    except ImportError:
        return VadWhisperListener(settings)
    build = getattr(LocalListener, "from_settings", None)
    listener = build(settings) if build is not None else LocalListener(settings=settings)
    if asyncio.iscoroutine(listener):
        listener = await listener
    start = getattr(listener, "start", None)
    if start is not None:
        await start()
    return listener


# ------------------------------------------------------------------ builders
def build_llm(settings: VoiceSettings, keys: ProviderKeys) -> LLM:
    if settings.uses_local_llm:
        return _local_llm(settings)
    from .openai_llm import OpenAICompatLLM

    return OpenAICompatLLM(settings.llm_base_url, str(keys.llm_api_key or ""), dict(settings.llm_headers))


def build_tts(settings: VoiceSettings, keys: ProviderKeys) -> TTS:
    if settings.tts_provider != "openai":
        return _local_tts(settings)
    from .openai_tts import OpenAITTS

    cloud = OpenAITTS.from_settings(settings, keys)
    if not settings.fallback_to_local:
        return cloud
    from .fallback import FallbackTTS

    return FallbackTTS(cloud, lambda: _local_tts_async(settings))


def build_stt(settings: VoiceSettings, keys: ProviderKeys) -> STT:
    if settings.stt_provider != "deepgram":
        return _local_stt(settings)
    from .deepgram_stt import DeepgramSTT

    return DeepgramSTT.from_settings(settings, keys)


async def build_listener(settings: VoiceSettings, keys: ProviderKeys, **listener_options: Any) -> Listener:
    """A started live listener for one voice session (the Deepgram socket is open on return).

    Raises :class:`ProviderError` with a plain message when neither the cloud nor (if
    allowed) the embedded listener can start.
    """
    if settings.stt_provider != "deepgram":
        return await _local_listener(settings)
    from .deepgram_stt import DeepgramListener

    cloud = DeepgramListener.from_settings(settings, keys, **listener_options)
    if not settings.fallback_to_local:
        await cloud.start()
        return cloud
    from .fallback import FallbackListener

    listener = FallbackListener(cloud, lambda: _local_listener(settings))
    await listener.start()
    return listener
