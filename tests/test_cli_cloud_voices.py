"""`cli ask --speak` and `cli doctor` with the new cloud voices (Aura, Realtime) and Flux, each
against its protocol server, as a person runs them; and the retiring-model warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers.deepgram import FakeDeepgramServer
from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from tests.servers.openai_realtime import FakeRealtimeServer
from tests.servers.speech_audio import decode_speech
from tests.test_cli_ask import run_cli
from voiceclaw_app.config import VoiceSettings, retiring_tts_warning
from voiceclaw_app.providers.base import AudioClip

REPLY = "Sure, here is your answer. It has two sentences."


def env_for(kind: str, chat, dg, rt, tmp_path: Path, **extra) -> dict[str, str]:
    env = {
        "VOICECLAW_DATA_DIR": str(tmp_path / "data"),
        "VOICECLAW_LLM_BASE_URL": chat.base_url, "VOICECLAW_LLM_API_KEY": "tok", "VOICECLAW_LLM_MODEL": "m",
        "VOICECLAW_DEEPGRAM_URL": dg.url, "DEEPGRAM_API_KEY": "dg",
        "VOICECLAW_TTS_BASE_URL": rt.base_url, "OPENAI_API_KEY": "sk",
        "VOICECLAW_TTS": kind, "VOICECLAW_STT": "deepgram-flux", "VOICECLAW_TTS_MODEL": "",
    }
    env.update(extra)
    return env


@pytest.fixture
async def servers():
    async with FakeChatServer(ChatBehavior(reply=REPLY, ttft_s=0.02, tokens_per_s=300), api_key="tok") as chat, FakeDeepgramServer(api_key="dg") as dg, FakeRealtimeServer(api_key="sk") as rt:
        yield chat, dg, rt


@pytest.mark.parametrize("kind", ["deepgram", "openai-realtime"])
async def test_ask_speak_with_each_streamed_voice(kind, servers, tmp_path):
    chat, dg, rt = servers
    rc, out, err = await run_cli("ask", "What's up?", "--speak", str(tmp_path / "audio"), env=env_for(kind, chat, dg, rt, tmp_path))
    assert rc == 0, err
    assert out.strip() == REPLY
    wavs = sorted((tmp_path / "audio").glob("*.wav"))
    spoken = [decode_speech(AudioClip.from_wav(w.read_bytes()).pcm16()).strip() for w in wavs]
    assert spoken == ["Sure, here is your answer.", "It has two sentences."]
    if kind == "deepgram":
        assert dg.speak.sessions[0].query["model"] == "aura-2-thalia-en"  # the provider's default model
    else:
        assert rt.sessions[0].query["model"] == "gpt-realtime-2.1-mini"


@pytest.mark.parametrize("kind", ["deepgram", "openai-realtime"])
async def test_doctor_checks_the_socket_key_and_first_audio(kind, servers, tmp_path):
    chat, dg, rt = servers
    rc, out, err = await run_cli("doctor", env=env_for(kind, chat, dg, rt, tmp_path))
    assert rc == 0, out + err
    tts_line = next(line for line in out.splitlines() if line.startswith("TTS"))
    assert f"[{kind}]" in tts_line and "first audio after" in tts_line and "key accepted, socket open" in tts_line
    assert any(line.startswith("STT live (Flux) [deepgram-flux]: ok") for line in out.splitlines()), out
    assert "WARNING" not in out


@pytest.mark.parametrize("kind", ["deepgram", "openai-realtime"])
async def test_doctor_says_the_key_was_refused(kind, servers, tmp_path):
    chat, dg, rt = servers
    rc, out, err = await run_cli("doctor", env=env_for(kind, chat, dg, rt, tmp_path, DEEPGRAM_API_KEY="bad", OPENAI_API_KEY="bad"))
    assert rc == 1
    tts_line = next(line for line in out.splitlines() if line.startswith("TTS"))
    assert "FAIL" in tts_line and "rejected the API key" in tts_line
    assert "bad" not in out.replace("bad key", "")


async def test_doctor_warns_about_a_retiring_openai_model(servers, tmp_path):
    chat, dg, rt = servers
    env = env_for("openai", chat, dg, rt, tmp_path, VOICECLAW_TTS_MODEL="tts-1", VOICECLAW_TTS_BASE_URL="https://api.openai.com/v1", OPENAI_API_KEY="")
    rc, out, err = await run_cli("doctor", env=env)
    warning = next(line for line in out.splitlines() if "WARNING" in line)
    assert "2027-01-06" in warning and "openai-realtime" in warning and "deepgram" in warning


def test_retiring_warning_names_the_three_models_only(monkeypatch):
    for model in ("tts-1", "tts-1-hd", "gpt-4o-mini-tts"):
        assert "retired by OpenAI on 2027-01-06" in retiring_tts_warning("openai", model, "https://api.openai.com/v1")
    assert retiring_tts_warning("openai", "gpt-realtime-2.1-mini", "") is None
    assert retiring_tts_warning("openai-realtime", "gpt-4o-mini-tts", "") is None  # that provider ignores the name
    assert retiring_tts_warning("openai", "tts-1", "http://kokoro:8880/v1") is None  # a compatible server keeps working
    monkeypatch.delenv("VOICECLAW_TTS_BASE_URL", raising=False)
    assert "'tts-1-hd'" in VoiceSettings(tts_provider="openai", tts_model="tts-1-hd").tts_retirement_warning()
    monkeypatch.setenv("VOICECLAW_TTS", "openai-realtime")
    monkeypatch.delenv("VOICECLAW_TTS_MODEL", raising=False)
    assert VoiceSettings.from_env().tts_model == "gpt-realtime-2.1-mini"
