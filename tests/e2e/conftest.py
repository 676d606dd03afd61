"""Browser end-to-end tests: the app in prod mode (built once per session) + Debian Chromium.

Set VOICECLAW_E2E_URL (with VOICECLAW_DATA_DIR) to test an app that is already running.
The app/browser helpers are shared with the browser benchmark.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from voiceclaw_app.bench.browser import CHROMIUM, ROOT, build_mic_wav, chromium_args, prod_app, wait_ready  # noqa: F401

ARTIFACTS = ROOT / "test-artifacts"
PORT = int(os.environ.get("VOICECLAW_E2E_PORT", "3117"))
#: the header naming the person (a number) in tests; see server/ws_voice.header_identity
IDENTITY_HEADER = "x-voiceclaw-test-user"


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
    # two browsers may be two people: the stand-in identity until accounts land
    with prod_app(PORT, data, extra_env={"VOICECLAW_TEST_IDENTITY_HEADER": IDENTITY_HEADER}) as (base, log_path):
        yield base, data, log_path


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
