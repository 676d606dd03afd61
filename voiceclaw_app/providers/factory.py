"""Build the configured providers from :class:`VoiceSettings` + :class:`ProviderKeys`.

The one place that chooses local vs cloud, so switching a provider on the settings
page takes effect at the next turn / voice session without a restart (callers
build from the current settings snapshot; nothing here is cached except the
embedded engines, which :mod:`.engines` loads once per process).

* LLM: ``llm_base_url`` set -> :class:`OpenAICompatLLM` (gateway, OpenAI, Ollama...);
  empty -> the embedded local LLM.
* TTS: ``tts_provider`` ``openai`` -> :class:`OpenAITTS` (``/v1/audio/speech``,
  ``VOICECLAW_TTS_BASE_URL``); ``deepgram`` -> :class:`DeepgramTTS` (Aura, speak
  WebSocket, ``VOICECLAW_DEEPGRAM_URL``); ``openai-realtime`` ->
  :class:`OpenAIRealtimeTTS` (Realtime WebSocket, ``VOICECLAW_TTS_BASE_URL``); each
  wrapped in :class:`FallbackTTS` when ``fallback_to_local``; ``local`` -> Piper.
* STT (whole clip): ``stt_provider`` ``deepgram``/``deepgram-flux`` -> pre-recorded
  ``/v1/listen`` (Flux has no pre-recorded endpoint); else Whisper.
* Listener (live session): ``deepgram-flux`` -> :class:`FluxListener` (``listen.v2``),
  otherwise as ``deepgram``; ``deepgram`` -> :class:`DeepgramListener` (socket opened
  here, at session start, with the server's Silero VAD as its barge-in gate),
  wrapped in :class:`FallbackListener` when ``fallback_to_local`` (which re-opens a
  fresh Deepgram listener between turns after a fallback); ``local`` -> the
  embedded VAD + Whisper listener. The mic session sets the input mode with
  ``set_hands_free`` (the settings' ``input_mode`` is only the initial value).

Keys: every builder first keeps only the keys saved for the address its client will
call (:func:`key_targets`, :meth:`ProviderKeys.only_for`), so a changed URL never
receives a key saved for another one, whoever calls the factory.

The embedded engines are imported lazily, inside the ``_local_*`` functions only, so
cloud-only deployments never load model runtimes and the names live in one place.
``build_llm``/``build_tts``/``build_stt`` are synchronous (the UI calls them in a
worker thread: loading a local model blocks); ``build_listener`` is async (it opens
the Deepgram socket).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ..config import VoiceSettings
from ..secrets import ProviderKeys, env_key_url
from .base import LLM, STT, TTS, Listener

log = logging.getLogger("voiceclaw.providers")

#: ``tts_provider`` values served by a cloud client (the rest: the embedded voice)
CLOUD_TTS = ("openai", "deepgram", "openai-realtime")
#: ``stt_provider`` values served by Deepgram (v1 listen, or Flux on listen.v2)
DEEPGRAM_STT = ("deepgram", "deepgram-flux")


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


async def _local_listener(settings: VoiceSettings) -> Listener:
    """The embedded listener: silero VAD end of turn + Whisper (:class:`LocalListener`)."""
    from .local_listener import LocalListener

    return LocalListener.from_settings(settings)


# ------------------------------------------------------------------ keys
def key_targets(settings: VoiceSettings) -> dict[str, str]:
    """Key name -> the address a client built from ``settings`` sends that key to."""
    return {"llm_api_key": settings.llm_base_url, "openai_api_key": env_key_url("openai_api_key"), "deepgram_api_key": env_key_url("deepgram_api_key")}


def _keys_for(settings: VoiceSettings, keys: ProviderKeys) -> ProviderKeys:
    return keys.only_for(key_targets(settings))


# ------------------------------------------------------------------ builders
def build_llm(settings: VoiceSettings, keys: ProviderKeys) -> LLM:
    keys = _keys_for(settings, keys)
    if settings.uses_local_llm:
        return _local_llm(settings)
    from .openai_llm import OpenAICompatLLM

    return OpenAICompatLLM(settings.llm_base_url, str(keys.llm_api_key or ""), dict(settings.llm_headers))


def _cloud_tts(settings: VoiceSettings, keys: ProviderKeys) -> TTS:
    if settings.tts_provider == "deepgram":
        from .deepgram_tts import DeepgramTTS

        return DeepgramTTS.from_settings(settings, keys)
    if settings.tts_provider == "openai-realtime":
        from .openai_realtime_tts import OpenAIRealtimeTTS

        return OpenAIRealtimeTTS.from_settings(settings, keys)
    from .openai_tts import OpenAITTS

    return OpenAITTS.from_settings(settings, keys)


_warned: set[str] = set()


def _warn_retiring(settings: VoiceSettings) -> None:
    """The startup log's line for a retiring OpenAI speech model (once per process and message)."""
    warning = settings.tts_retirement_warning()
    if warning and warning not in _warned:
        _warned.add(warning)
        log.warning("%s", warning)


def build_tts(settings: VoiceSettings, keys: ProviderKeys) -> TTS:
    keys = _keys_for(settings, keys)
    _warn_retiring(settings)
    if settings.tts_provider not in CLOUD_TTS:
        return _local_tts(settings)
    cloud = _cloud_tts(settings, keys)
    if not settings.fallback_to_local:
        return cloud
    from .fallback import FallbackTTS

    return FallbackTTS(cloud, lambda: _local_tts_async(settings))


def build_stt(settings: VoiceSettings, keys: ProviderKeys) -> STT:
    keys = _keys_for(settings, keys)
    if settings.stt_provider not in DEEPGRAM_STT:
        return _local_stt(settings)
    from .deepgram_stt import DeepgramSTT

    return DeepgramSTT.from_settings(settings, keys)


def _server_vad():
    """The server's Silero VAD as a per-frame gate, or None (an energy gate) if it cannot load."""
    from .base import ProviderError

    try:
        from .silero_vad import SileroGate

        return SileroGate()
    except (ProviderError, ImportError, OSError):
        return None


async def build_listener(settings: VoiceSettings, keys: ProviderKeys, **listener_options: Any) -> Listener:
    """A started live listener for one voice session (the Deepgram socket is open on return).

    Raises :class:`ProviderError` with a plain message when neither the cloud nor (if
    allowed) the embedded listener can start.
    """
    keys = _keys_for(settings, keys)
    if settings.stt_provider not in DEEPGRAM_STT:
        return await _local_listener(settings)
    from .deepgram_stt import DeepgramListener

    kind: Any = DeepgramListener
    if settings.stt_provider == "deepgram-flux":
        from .deepgram_flux import FluxListener

        kind = FluxListener
    with_vad = "vad" not in listener_options

    def make_cloud() -> Listener:
        opts = dict(listener_options)
        if with_vad:
            # barge-in from whichever is first: our own VAD (tentative at its onset,
            # confirmed after vad_min_speech_ms) or Deepgram's SpeechStarted
            opts["vad"] = _server_vad()
        return kind.from_settings(settings, keys, **opts)

    cloud = make_cloud()
    if not settings.fallback_to_local:
        try:
            await cloud.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await cloud.aclose()  # frees its VAD context in the helper process
            raise
        return cloud
    from .fallback import FallbackListener

    # primary_factory: after a fallback, Deepgram is tried again between turns
    listener = FallbackListener(cloud, lambda: _local_listener(settings), primary_factory=make_cloud)
    await listener.start()
    return listener
