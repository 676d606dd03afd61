"""The provider factory: settings choose local vs cloud, per call (no restart needed)."""

from __future__ import annotations

import asyncio

import pytest

from tests.servers.deepgram import FakeDeepgramServer
from voiceclaw_app.config import VoiceSettings
from voiceclaw_app.providers.deepgram_stt import DeepgramListener, DeepgramSTT
from voiceclaw_app.providers.factory import build_listener, build_llm, build_stt, build_tts
from voiceclaw_app.providers.fallback import FallbackListener, FallbackTTS
from voiceclaw_app.providers.local_listener import LocalListener
from voiceclaw_app.providers.openai_llm import OpenAICompatLLM
from voiceclaw_app.providers.openai_tts import OpenAITTS
from voiceclaw_app.providers.silero_vad import SileroGate
from voiceclaw_app.secrets import ProviderKeys, Secret, env_key_url, normalize_url

GATEWAY = "http://gateway:18789/v1"


def keys(llm_url: str = GATEWAY) -> ProviderKeys:
    """The keys as the key store hands them out: each bound to the address it was saved
    for (the gateway's; the environment's TTS and Deepgram addresses, read now)."""
    urls = {"llm_api_key": normalize_url(llm_url), "deepgram_api_key": normalize_url(env_key_url("deepgram_api_key")), "openai_api_key": normalize_url(env_key_url("openai_api_key"))}
    return ProviderKeys(llm_api_key=Secret("gw"), deepgram_api_key=Secret("dg"), openai_api_key=Secret("sk"), urls=urls)


def test_a_key_saved_for_another_address_is_not_given_to_the_client(monkeypatch):
    s = VoiceSettings(llm_base_url="http://elsewhere.example/v1", llm_model_voice="m")
    assert build_llm(s, keys())._api_key == ""
    assert build_llm(s, keys("http://elsewhere.example/v1/"))._api_key == "gw"
    monkeypatch.setenv("VOICECLAW_TTS_BASE_URL", "http://127.0.0.1:9/v1")
    bound_elsewhere = keys()  # bound to 127.0.0.1:9 ...
    monkeypatch.setenv("VOICECLAW_TTS_BASE_URL", "http://127.0.0.1:10/v1")  # ... but the TTS now calls another address
    assert build_tts(VoiceSettings(tts_provider="openai", fallback_to_local=False), bound_elsewhere)._api_key == ""


def test_cloud_llm_and_tts_from_settings(monkeypatch):
    monkeypatch.setenv("VOICECLAW_TTS_BASE_URL", "http://127.0.0.1:9/v1")
    s = VoiceSettings(llm_base_url="http://gateway:18789/v1", llm_model_voice="openclaw:main", llm_headers={"x-openclaw-agent-id": "voice"}, tts_provider="openai", tts_model="tts-1", tts_voice="nova")
    llm = build_llm(s, keys())
    assert isinstance(llm, OpenAICompatLLM) and llm.base_url == "http://gateway:18789/v1" and llm.headers == {"x-openclaw-agent-id": "voice"}
    tts = build_tts(s, keys())
    assert isinstance(tts, FallbackTTS) and isinstance(tts.primary, OpenAITTS)
    assert (tts.primary.base_url, tts.primary.model, tts.primary.default_voice) == ("http://127.0.0.1:9/v1", "tts-1", "nova")
    plain = build_tts(s.replace(fallback_to_local=False), keys())
    assert isinstance(plain, OpenAITTS)
    assert isinstance(build_stt(s.replace(stt_provider="deepgram"), keys()), DeepgramSTT)


@pytest.mark.asyncio
async def test_deepgram_listener_is_started_at_session_start(monkeypatch):
    async with FakeDeepgramServer(api_key="dg") as srv:
        monkeypatch.setenv("VOICECLAW_DEEPGRAM_URL", srv.url)
        s = VoiceSettings(stt_provider="deepgram", vad_silence_ms=400, input_mode="push_to_talk", fallback_to_local=False)
        lst = await build_listener(s, keys())
        assert isinstance(lst, DeepgramListener) and not lst.hands_free
        assert isinstance(lst.vad, SileroGate)  # barge-in from our own VAD as well as Deepgram's
        assert len(srv.sessions) == 1 and srv.sessions[0].query["endpointing"] == "400"
        await lst.aclose()
        wrapped = await build_listener(s.replace(fallback_to_local=True), keys())
        assert isinstance(wrapped, FallbackListener) and not wrapped.switched
        assert len(srv.sessions) == 2
        assert not wrapped.hands_free and not wrapped.active.hands_free
        assert wrapped.active.vad_min_ms == s.vad_min_speech_ms  # tentative onset, confirmed after the setting
        wrapped.set_hands_free(True)  # the mic session switches the mode mid-session
        assert wrapped.active.hands_free
        # after a fallback, a fresh Deepgram listener (with its own VAD gate) is tried between turns
        again = wrapped.primary_factory()
        assert isinstance(again, DeepgramListener) and again is not wrapped.active and isinstance(again.vad, SileroGate)
        await again.aclose()
        await wrapped.aclose()


@pytest.mark.asyncio
async def test_local_listener_vad_then_whisper_engine():
    """The local path: silero VAD ends the turn, the STT engine (a tiny real STT here) transcribes."""
    import json
    import wave
    from pathlib import Path

    from voiceclaw_app.providers import engines
    from voiceclaw_app.providers.base import STT, EndOfTurn, SpeechStarted, Transcript

    class LengthSTT(STT):
        async def transcribe(self, pcm16, *, sample_rate=16000, language="en", cancel=None, score_words=False):
            return Transcript(text=f"{len(pcm16) // 32} ms of speech")

    fx = Path(__file__).parent / "fixtures" / "q_capital"
    with wave.open(str(fx.with_suffix(".wav"))) as w:
        pcm = w.readframes(w.getnframes())
    last = json.loads(fx.with_suffix(".json").read_text())["last_voiced_sample"]
    engines.reset_for_tests()
    engines.configure(factories={"stt": LengthSTT})
    try:
        lst = await build_listener(VoiceSettings(stt_provider="local", vad_silence_ms=400), keys())
        assert isinstance(lst, LocalListener)
        pcm += b"\x00\x00" * 16000
        for k in range(0, len(pcm), 640):
            await lst.push(pcm[k : k + 640], (k + 640) / 32.0)
        events = []
        async with asyncio.timeout(10):
            async for ev in lst.events():
                events.append(ev)
                if isinstance(ev, EndOfTurn):
                    break
        assert isinstance(events[0], SpeechStarted) and events[0].source == "vad"
        eot = events[-1]
        assert eot.text.endswith("ms of speech")
        assert abs(eot.speech_end_ms - last / 16.0) <= 120  # the VAD decides it, window-accurate
        await lst.aclose()
    finally:
        engines.reset_for_tests()


@pytest.mark.asyncio
async def test_deepgram_session_reports_barge_in_from_the_server_vad(monkeypatch):
    from tests.audio_fixtures import fixture

    async with FakeDeepgramServer(api_key="dg") as srv:
        monkeypatch.setenv("VOICECLAW_DEEPGRAM_URL", srv.url)
        srv.say("What is the weather like today?")
        # frames go in faster than real time here, so make Deepgram's own SpeechStarted
        # need more audio than the server VAD's onset: the VAD's must be reported
        srv.profile.speech_started_after_s = 0.5
        lst = await build_listener(VoiceSettings(stt_provider="deepgram", fallback_to_local=False), keys())
        pcm, meta = fixture("q_weather")
        seen = []

        async def collect():
            async for ev in lst.events():
                seen.append(ev)

        task = asyncio.create_task(collect())
        t = 0.0
        for k in range(0, len(pcm), 640):
            t += 20.0
            await lst.push(pcm[k : k + 640], t)
        await asyncio.sleep(0.3)
        starts = [e for e in seen if type(e).__name__ == "SpeechStarted"]
        assert any(e.source == "vad" for e in starts)
        onset_ms = 1000.0 * meta["first_voiced_sample"] / 16000
        vad_start = next(e for e in starts if e.source == "vad")
        assert abs(vad_start.t_ms - onset_ms) < 150
        await lst.aclose()
        task.cancel()
