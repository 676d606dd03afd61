"""Browser end-to-end tests: the app in prod mode (built once per session) + Debian Chromium.

Set VOICECLAW_E2E_URL (with VOICECLAW_DATA_DIR) to test an app that is already running
(then VOICECLAW_E2E_USER / VOICECLAW_E2E_PASSWORD name an existing admin account).
The app/browser helpers are shared with the browser benchmark.

Every browser the tests launch starts logged in (``launch_browser``: each new page or
context carries the session cookie of a real ``POST /auth/login``), except those from
``launch_anonymous``. The app has two accounts: ``ADMIN`` (the benchmark's admin) and
``OTHER`` (a plain user), for the tests that check one cannot see the other's data.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from voiceclaw_app.bench.browser import (  # noqa: F401
    BENCH_USER,
    CHROMIUM,
    ROOT,
    AppUser,
    LoggedInBrowser,
    build_mic_wav,
    chromium_args,
    http_login,
    prod_app,
    wait_ready,
)

ARTIFACTS = ROOT / "test-artifacts"
PORT = int(os.environ.get("VOICECLAW_E2E_PORT", "3117"))
ADMIN = BENCH_USER
OTHER = AppUser("second", "second-password-2")


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
    with prod_app(PORT, data, users=(OTHER,)) as (base, log_path):
        yield base, data, log_path


def _admin() -> AppUser:
    if os.environ.get("VOICECLAW_E2E_URL"):
        return AppUser(os.environ.get("VOICECLAW_E2E_USER", ""), os.environ.get("VOICECLAW_E2E_PASSWORD", ""), admin=True)
    return ADMIN


@pytest.fixture(scope="session")
def session_cookies(app_server):
    """user name -> a session cookie value, logged in once per test session."""
    base = app_server[0]
    cache: dict[str, str] = {}

    def get(user: AppUser) -> str:
        if user.name not in cache:
            cache[user.name] = http_login(base, user)
        return cache[user.name]

    return get


@pytest.fixture()
def _browsers():
    """One Playwright per test (a second sync instance cannot start inside the first)
    and every browser launched in it; all closed after the test."""
    from playwright.sync_api import sync_playwright

    pw = sync_playwright().start()
    browsers: list = []

    def launch(mic_wav: Path | None = None):
        b = pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(mic_wav))
        browsers.append(b)
        return b

    yield launch
    for b in browsers:
        b.close()
    pw.stop()


@pytest.fixture()
def launch_browser(app_server, session_cookies, _browsers):
    """launch(mic_wav=None, user=ADMIN) -> a Chromium browser whose pages start logged in."""

    def launch(mic_wav: Path | None = None, user: AppUser | None = None):
        return LoggedInBrowser(_browsers(mic_wav), app_server[0], session_cookies(user or _admin()))

    return launch


@pytest.fixture()
def launch_anonymous(_browsers):
    """launch() -> a Chromium browser with no login."""
    return _browsers


def login(page, base: str, user: AppUser) -> None:
    """Log in through the login form, as a person would."""
    page.goto(base + "/login")
    page.wait_for_selector("#login-username")
    page.fill("#login-username", user.name)
    page.fill("#login-password", user.password)
    page.click("#login-submit")


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)
