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

from typing import Any

from ..config import VoiceSettings
from ..secrets import ProviderKeys, env_key_url
from .base import LLM, STT, TTS, Listener


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


def build_tts(settings: VoiceSettings, keys: ProviderKeys) -> TTS:
    keys = _keys_for(settings, keys)
    if settings.tts_provider != "openai":
        return _local_tts(settings)
    from .openai_tts import OpenAITTS

    cloud = OpenAITTS.from_settings(settings, keys)
    if not settings.fallback_to_local:
        return cloud
    from .fallback import FallbackTTS

    return FallbackTTS(cloud, lambda: _local_tts_async(settings))


def build_stt(settings: VoiceSettings, keys: ProviderKeys) -> STT:
    keys = _keys_for(settings, keys)
    if settings.stt_provider != "deepgram":
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
    if settings.stt_provider != "deepgram":
        return await _local_listener(settings)
    from .deepgram_stt import DeepgramListener

    with_vad = "vad" not in listener_options

    def make_cloud() -> Listener:
        opts = dict(listener_options)
        if with_vad:
            # barge-in from whichever is first: our own VAD (tentative at its onset,
            # confirmed after vad_min_speech_ms) or Deepgram's SpeechStarted
            opts["vad"] = _server_vad()
        return DeepgramListener.from_settings(settings, keys, **opts)

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
