"""``python -m voiceclaw_app.bench load --sessions N --minutes M [--workers W] --json``.

N simulated users talk to a real cluster (what ``make cluster`` starts: Redis,
PostgreSQL, W backend workers, Caddy with TLS; see ``deploy/cluster.py``) whose
providers are the local protocol servers with the guide's cloud profile (Deepgram
live, LLM first token 300 ms then 40 tokens/s, TTS first byte 200 ms), run in a
child process so the clients' pacing never delays them.

Each user is what a browser tab is to the server: a Reflex event socket (a raw
socket.io client on ``wss://.../_event?token=...``, receiving the state updates the
page would render) and a ``/ws/voice`` socket streaming microphone audio at real
time without pause (noise between turns, a spoken fixture from tests/fixtures per
turn, as a hands-free mic does). A turn counts as answered when the page state
reaches "speaking" and then leaves it; one that shows an error or never answers
within 30 s is an error.

Figures (ms, p50/p95), from the timing marks the app stored per turn (PostgreSQL):
``time_to_first_audio`` = first audio ready - speech end (the listener's estimate,
as in ``cloud --via-ws``); ``overhead`` = that minus the ideal critical path of the
reply (is_final delay + first token + the first chunk's remaining tokens + TTS first
byte + the transfer of the first playable piece); ``stages_ms``: each stored mark of
:data:`STAGE_MARKS` (ms after speech end), to see which stage a busy box delays.
The users run in a harness process (``--harness-processes`` spreads them over more);
``harness_loop_lag_ms`` says how late its event loop ran while it paced the
microphones: a microphone paced late delivers the silence that ends a turn late, and
the app measures that as its own lateness, so when its p99 nears the overhead
figures the harness, not the app, was the bottleneck (on 2 cores, at 50 sessions, it
ran up to 9 s late; spread over 5 processes it took the cores from the app instead).
``cpu_pct``: the CPU each part of the box used while the users talked (% of one core:
workers with their VAD helpers, proxy, redis, postgres, protocol_servers, harness) and
``box_pct`` (every process on the box; 200 is a full 2-core box), to see who had the cores.
``--idle``: nobody speaks, no warm-up turn: what N open microphones cost on their own.
``error_log``: user, time (UTC) and problem of the first 50 errors, to find them in the
workers' logs (``VOICECLAW_LOAD_DIR`` keeps those). ``rss_mb_start`` / ``rss_mb_end``:
resident memory of all worker processes together, after warm-up and at the end.

Logging in: each simulated user is an account of its own (``load-<index>``, created
once in the cluster's PostgreSQL); both sockets and every audio fetch carry its
session cookie (:func:`login_headers`), as a logged-in tab does. Playback reports and
typed text go on the tab's ``/ws/voice`` as the page's audio queue and mic component
send them (assets/audio_queue.jsx, assets/mic_capture.jsx).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import threading
import ssl
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..pipeline.text import chunk_text
from ..pipeline.timing import now_ms
from ..server.loop_watch import LoopWatch, lag_summary, threshold_ms_from_env
from .cloud import FRAME_MS, IS_FINAL_S, LEAD_S, RATE
from .cpu import CpuMeter
from .drive import Fixture, dither, load_fixtures
from .pipeline import TOKENS_PER_S, TTFT_S, TTS_TTFB_S, first_chunk_tokens, transfer_s
from .stats import p50_p95, stages

# ports of the benchmark's own cluster (within 3800-3899; make cluster and the tests use others)
FIRST_WORKER_PORT, HTTPS_PORT, REDIS_PORT, PG_PORT = 3821, 3853, 3870, 3871
TURN_TIMEOUT_S = 30.0
SPOKEN_TEXT = "What is the capital of France?"  # what the fake recognizer hears
EVENT_NAMESPACE = "/_event"  # Reflex's socket.io path and namespace (both "/_event")
CHAT_STATE = "reflex___state____state.voiceclaw_app___states___chat____chat_state"  # ChatState.get_full_name()


_logins: dict[tuple[str, int], str] = {}
_logins_lock = threading.Lock()


def login_headers(user_index: int) -> dict[str, str]:
    """The ``Cookie`` header that logs simulated user ``user_index`` in (both sockets, audio).

    The account ``load-<index>`` is created once in the configured database (set
    ``VOICECLAW_DATABASE_URL`` to the cluster's PostgreSQL first: the workers look the
    session up there) and logged in once; later calls (a reconnecting page) reuse the
    session. Blocking (database): call it from a thread inside an event loop."""
    from .. import accounts
    from ..db.engine import database_url
    from ..server.auth import SESSION_COOKIE, create_login_session

    key = (database_url(), user_index)
    with _logins_lock:
        token = _logins.get(key)
        if token is None:
            name = f"load-{user_index}"
            account = accounts.find_user(name) or accounts.add_user(name, secrets.token_urlsafe(18))
            token = _logins[key] = create_login_session(account.id)
    return {"Cookie": f"{SESSION_COOKIE}={token}"}


def _origin(url: str) -> str:
    """scheme://host:port of ``url`` (what a browser sends as Origin for a page there)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


@dataclass
class UserStats:
    turns: int = 0
    answered: int = 0
    errors: int = 0
    #: (wall-clock time, problem) of each error: the time finds the turn in the workers' logs
    incidents: list[tuple[float, str]] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [problem for _, problem in self.incidents]


class PageState:
    """What the page would show, from the Reflex state updates of one tab."""

    def __init__(self) -> None:
        self.status = ""
        self.error = ""
        self.notice = ""
        self.audio_turn = ""
        self.audio_urls: list[str] = []
        self.audio_done = True
        self.changed = asyncio.Event()
        self.updates = 0

    def apply(self, update: Any) -> None:
        if isinstance(update, str):
            update = json.loads(update)
        delta = (update or {}).get("delta") or {}
        for sub, values in delta.items():
            if not isinstance(values, dict):
                continue
            for key, value in values.items():
                name = key.removesuffix("_rx_state_")
                if sub.endswith("chat_state"):
                    if name == "session_status":  # ``status`` is a computed var over it
                        self.status = str(value)
                    elif name == "error" and value:
                        self.error = str(value)
                    elif name == "notice":
                        self.notice = str(value or "")
                elif sub.endswith("stream_state"):
                    if name == "audio_turn":
                        self.audio_turn = str(value)
                    elif name == "audio_urls":
                        self.audio_urls = list(value or [])
                    elif name == "audio_done":
                        self.audio_done = bool(value)
        self.updates += 1
        self.changed.set()

    async def wait_for(self, predicate, timeout_s: float) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate():
            left = deadline - loop.time()
            if left <= 0:
                return False
            self.changed.clear()
            try:  # asyncio.timeout, not wait_for: a cancel arriving with an update is never swallowed
                async with asyncio.timeout(min(left, 0.5)):
                    await self.changed.wait()
            except TimeoutError:
                pass
        return True


class SimulatedUser:
    """One tab: a Reflex event socket and a mic socket streaming at real time.

    Also used by the cluster and fault tests (``connect``, ``speak``, ``close``)."""

    def __init__(self, base_url: str, ssl_context: ssl.SSLContext | None, index: int = 0, *, token: str | None = None, event_url: str | None = None, voice_url: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.event_url = (event_url or self.base_url).rstrip("/")
        self.voice_url = (voice_url or self.base_url).rstrip("/")
        self.ssl = ssl_context
        self.index = index
        self.token = token or str(uuid.uuid4())
        self.page = PageState()
        self.stats = UserStats()
        self._rng = np.random.default_rng(index)
        self._speech: bytearray = bytearray()
        self._sio = None
        self._ws = None
        self._headers: dict[str, str] = {}
        self._tasks: list[asyncio.Task] = []
        self.server_messages: list[dict] = []
        self.audio_fetched = 0
        self.mic_closed = ""
        self.played_urls: list[str] = []
        self.audio_errors: list[str] = []

    async def connect(self) -> None:
        import aiohttp
        import socketio
        import websockets

        headers = self._headers = await asyncio.to_thread(login_headers, self.index)
        self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.ssl if self.ssl is not None else False))
        self._sio = socketio.AsyncClient(http_session=self._http, reconnection=True, reconnection_delay=0.5)
        self._sio.on("event", self.page.apply, namespace=EVENT_NAMESPACE)
        await self._sio.connect(f"{self.event_url}?token={self.token}", socketio_path=EVENT_NAMESPACE, namespaces=[EVENT_NAMESPACE], transports=["websocket"], headers={**headers, "Origin": _origin(self.event_url)}, wait_timeout=20)
        ws_base = self.voice_url.replace("https://", "wss://").replace("http://", "ws://")
        self._ws = await websockets.connect(f"{ws_base}/ws/voice?token={self.token}", ssl=self.ssl, max_size=None, additional_headers={**headers, "Origin": _origin(self.voice_url)}, open_timeout=20)
        await self._ws.send(json.dumps({"type": "hello", "client_token": self.token, "sample_rate": RATE, "mode": "hands_free"}))
        ready = json.loads(await asyncio.wait_for(self._ws.recv(), 20))
        if ready.get("type") != "ready":
            raise RuntimeError(f"mic socket refused: {ready}")
        await self.control({"type": "playback", "event": "mounted"})  # the page's audio queue mounts
        self._tasks = [asyncio.create_task(self._stream_mic()), asyncio.create_task(self._read_mic()), asyncio.create_task(self._play())]
        await self.control({"type": "mic", "on": True})  # capture started: claims the account's mic
        await self.event("on_mic_event", "listening")  # what the page's mic component reports once capturing

    async def control(self, msg: dict) -> None:
        """A JSON control message on the tab's ``/ws/voice`` (as the mic component sends it)."""
        await self._ws.send(json.dumps(msg))

    async def type_text(self, text: str) -> None:
        """A typed message: the page hands it to the voice socket (``{"type": "text"}``)."""
        await self.control({"type": "text", "text": text})

    async def event(self, handler: str, payload: str | None = None) -> None:
        """Send a ChatState event as the page does (a button, a component report)."""
        args = {"payload": payload} if payload is not None else {}
        await self._sio.emit("event", {"name": f"{CHAT_STATE}.{handler}", "payload": args, "router_data": {"pathname": "/", "query": {}, "asPath": "/"}}, namespace=EVENT_NAMESPACE)

    async def _play(self) -> None:
        """The page's audio queue: fetch each reply URL (through the proxy, any worker),
        "play" it for its duration, and report first_playing / chunk / ended as the page does."""
        turn, played = "", 0
        while True:
            await self.page.wait_for(lambda: self.page.audio_turn != turn or played < len(self.page.audio_urls) or (played and self.page.audio_done), 3600)
            if self.page.audio_turn != turn:
                turn, played = self.page.audio_turn, 0
                continue
            if played < len(self.page.audio_urls):
                url = self.page.audio_urls[played]
                seconds = await self._fetch_audio(url)
                await self._report({"event": "first_playing" if played == 0 else "chunk", "turn": turn, "index": played, "client_ms": now_ms(), "server_ms": now_ms()})
                played += 1
                self.audio_fetched += 1
                await asyncio.sleep(seconds)
                continue
            if played and self.page.audio_done:
                await self._report({"event": "ended", "turn": turn, "played": played, "client_ms": now_ms()})
                turn_done = turn
                await self.page.wait_for(lambda: self.page.audio_turn != turn_done, 3600)

    async def _fetch_audio(self, url: str) -> float:
        """GET the clip like the browser does; its duration in seconds (0 if it failed)."""
        import wave
        import io

        self.played_urls.append(url)
        full = url if url.startswith("http") else self.base_url + url
        try:
            async with self._http.get(full, headers=self._headers) as resp:
                body = await resp.read()
                if resp.status != 200:
                    self.audio_errors.append(f"{resp.status} for {url}")
                    return 0.0
            with wave.open(io.BytesIO(body), "rb") as w:
                return w.getnframes() / float(w.getframerate() or 1)
        except Exception as exc:
            self.audio_errors.append(f"{exc.__class__.__name__} for {url}")
            return 0.0

    async def _report(self, data: dict) -> None:
        """A playback report, as the page's audio queue sends it: on the voice socket."""
        await self.control({"type": "playback", **data})

    async def _stream_mic(self) -> None:
        """20 ms frames at real time, forever: speech when queued, room noise otherwise."""
        frame_samples = RATE * FRAME_MS // 1000
        frame_bytes = frame_samples * 2
        t0 = time.monotonic()
        sent = 0
        while True:
            if self._speech:
                frame = bytes(self._speech[:frame_bytes])
                del self._speech[:frame_bytes]
                if len(frame) < frame_bytes:
                    frame += dither(frame_samples - len(frame) // 2, self._rng)
            else:
                frame = dither(frame_samples, self._rng)
            await self._ws.send(frame)
            sent += 1
            delay = t0 + sent * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)

    async def _read_mic(self) -> None:
        import websockets

        try:
            async for msg in self._ws:
                if isinstance(msg, str):
                    try:
                        self.server_messages.append(json.loads(msg))
                    except ValueError:
                        pass
        except websockets.ConnectionClosed:
            pass
        code = self._ws.close_code
        if code not in (None, 1000, 1001):
            # e.g. 4003 (no login / foreign origin), or the account's mic taken by another tab
            self.mic_closed = f"mic socket closed by the server ({code} {self._ws.close_reason or ''})".strip()

    async def speak(self, fx: Fixture, timeout_s: float = TURN_TIMEOUT_S) -> bool:
        """Say one fixture; True once the reply was spoken and the page left "speaking"."""
        self.stats.turns += 1
        self.page.error = ""
        lead = dither(int(LEAD_S * RATE), self._rng)
        self._speech += lead + fx.pcm
        fetched = self.audio_fetched
        speaking = await self.page.wait_for(lambda: self.page.status == "speaking" or bool(self.page.error), timeout_s)
        done = speaking and not self.page.error and await self.page.wait_for(lambda: self.page.status not in ("speaking", "thinking") or bool(self.page.error), timeout_s)
        done = done and self.audio_fetched > fetched
        if done and not self.page.error:
            self.stats.answered += 1
            return True
        self.stats.errors += 1
        problem = self.page.error or self.mic_closed or f"no answer within {timeout_s:.0f} s (status {self.page.status!r})"
        self.stats.incidents.append((time.time(), problem))
        return False

    async def close(self) -> None:
        """Close both sockets (bounded: a dead worker must not hang the caller)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        closers = []
        if self._ws is not None:
            closers.append(self._ws.close())
        if self._sio is not None:
            closers.append(self._sio.disconnect())
        for closer in closers:
            try:
                await asyncio.wait_for(closer, 5)
            except Exception:
                pass
        if getattr(self, "_http", None) is not None:
            await self._http.close()


#: the stored marks reported per stage (ms after speech end), in the order of a turn
STAGE_MARKS = ("eot_decided", "stt_final", "llm_request", "llm_first_token", "first_chunk", "tts_first_request", "first_audio_ready")


def stored_turns(database_url: str, since: float) -> list[dict[str, Any]]:
    """The spoken turns stored since ``since``: their :data:`STAGE_MARKS` and reply text."""
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                text(f"select {', '.join('t.' + m for m in STAGE_MARKS)}, m.content from vc_turn_timing t join vc_message m on m.id = t.message_id "
                     "where t.spoken_input = :yes and m.created_at >= :since order by t.id"),
                {"yes": True, "since": since},
            ).fetchall()
    finally:
        engine.dispose()
    return [{**dict(zip(STAGE_MARKS, r[:-1])), "content": r[-1]} for r in rows]


def ideal_ms(reply: str) -> float:
    """The reply's critical path with zero overhead (see the module docstring)."""
    first = chunk_text(reply)[0]
    return 1000.0 * (IS_FINAL_S + TTFT_S + first_chunk_tokens(reply, first.text) / TOKENS_PER_S + TTS_TTFB_S + transfer_s(first.speech))


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024.0


async def _user_loop(user: SimulatedUser, fixtures: list[Fixture], stop_at: float) -> None:
    rnd = random.Random(user.index)
    await asyncio.sleep(rnd.uniform(0, 3.0))  # users do not all start talking in the same 20 ms
    k = user.index
    while time.monotonic() < stop_at:
        await user.speak(fixtures[k % len(fixtures)])
        k += 1
        await asyncio.sleep(rnd.uniform(1.0, 3.0))  # the user listens, then thinks


def _fixtures() -> list[Fixture]:
    return [f for f in load_fixtures() if f.name.startswith("q_")]


def _harness_main(conn: Any, url: str, cafile: str, indices: list[int], database_url: str, idle: bool = False) -> None:
    """A harness process (spawned): its users connect, take a warm-up turn, say "ready",
    then talk for the seconds the "go" message gives and send back what happened
    (``idle``: no turns at all, the microphones only stream room noise)."""
    os.environ["VOICECLAW_DATABASE_URL"] = database_url  # login_headers: the cluster's accounts
    asyncio.run(_harness(conn, url, cafile, indices, idle))


async def _harness(conn: Any, url: str, cafile: str, indices: list[int], idle: bool = False) -> None:
    fixtures = _fixtures()
    users = [SimulatedUser(url, ssl.create_default_context(cafile=cafile), i) for i in indices]
    connect_errors = 0
    for chunk in range(0, len(users), 10):  # connect in groups: a page load is not a stampede
        results = await asyncio.gather(*(u.connect() for u in users[chunk:chunk + 10]), return_exceptions=True)
        connect_errors += sum(isinstance(r, BaseException) for r in results)
    # one warm-up turn each (connections, runner, phrase audio), not measured
    warm = [] if idle else await asyncio.gather(*(u.speak(fixtures[0]) for u in users), return_exceptions=True)
    for u in users:
        u.stats = UserStats()
    conn.send(("ready", None))
    _go, seconds = await asyncio.to_thread(conn.recv)
    # the harness paces the microphones: when its loop runs late, their audio (and so
    # the recognizer's silence) reaches the app late, and that is measured as the app's
    watch = LoopWatch(threshold_ms_from_env() or 60_000, report_every_s=math.inf).start()
    stop_at = time.monotonic() + seconds
    if idle:
        await asyncio.sleep(seconds)
    else:
        await asyncio.gather(*(_user_loop(u, fixtures, stop_at) for u in users), return_exceptions=True)
    watch.stop()
    conn.send(("done", {
        "connect_errors": connect_errors,
        "warmup_errors": sum(1 for w in warm if w is not True),
        "users": [(u.index, u.stats) for u in users],
        "lags": watch.lags,
    }))
    await asyncio.gather(*(u.close() for u in users), return_exceptions=True)


async def _receive(proc: Any, pipe: Any, timeout_s: float, what: str) -> Any:
    """The harness process's next message; a clear error if it died or went quiet."""
    deadline = time.monotonic() + timeout_s
    while not await asyncio.to_thread(pipe.poll, 1.0):
        if not proc.is_alive():
            raise RuntimeError(f"a load harness process exited (code {proc.exitcode}) before {what}: see its traceback above")
        if time.monotonic() > deadline:
            raise RuntimeError(f"a load harness process did not report {what} within {timeout_s:.0f} s")
    return pipe.recv()


async def run_load(sessions: int = 50, minutes: float = 5.0, workers: int = 3, harness_processes: int = 1, idle: bool = False) -> dict[str, Any]:
    """See the module docstring. ``harness_processes``: the simulated users are spread
    over that many processes (each its own event loop pacing its microphones).
    ``idle``: nobody speaks (no warm-up turn either): what N open microphones cost
    before any turn, in ``cpu_pct``."""
    import multiprocessing as mp
    import sys

    root = Path(__file__).resolve().parents[2]
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    from deploy.cluster import Cluster
    from tests.servers.fleet import fleet_process

    keep = os.environ.get("VOICECLAW_LOAD_DIR")  # keep the cluster's logs there (debugging)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
    dir_cm = contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="voiceclaw-load-")
    fleet = fleet_process(default_text=SPOKEN_TEXT)
    with dir_cm as tmp, fleet as provider_env:
        os.chmod(tmp, 0o755)  # PostgreSQL runs as its own user
        cluster = Cluster(root=Path(tmp), workers=workers, first_port=FIRST_WORKER_PORT, https_port=HTTPS_PORT, redis_port=REDIS_PORT, pg_port=PG_PORT, extra_env=provider_env)
        await asyncio.to_thread(cluster.start, False)
        harnesses: list[tuple[Any, Any]] = []
        try:
            pids = lambda: [p for i in range(workers) for p in cluster.worker_pids(i)]  # noqa: E731
            spawn = mp.get_context("spawn")
            processes = max(1, min(harness_processes, sessions))
            for k in range(processes):
                ours, theirs = spawn.Pipe()
                indices = list(range(k, sessions, processes))
                proc = spawn.Process(target=_harness_main, args=(theirs, cluster.url, str(cluster.ca_cert), indices, cluster.postgres.url, idle), daemon=True)
                proc.start()
                harnesses.append((proc, ours))
            for proc, pipe in harnesses:  # every user connected and warm
                await _receive(proc, pipe, 600, "its users ready")
            await asyncio.sleep(2.0)
            rss_start = rss_mb(pids())
            since = time.time()
            t_start = now_ms()
            # who had the cores while the users talked (% of one core per part of the box)
            cpu = CpuMeter(lambda: {**cluster.processes(), "protocol_servers": [fleet.pid], "harness": [p.pid for p, _ in harnesses]}).start()
            for _proc, pipe in harnesses:
                pipe.send(("go", minutes * 60))
            reports = []
            for proc, pipe in harnesses:
                reports.append((await _receive(proc, pipe, minutes * 60 + 120, "its users' turns"))[1])
            cpu_pct = cpu.stop()
            elapsed_s = (now_ms() - t_start) / 1000
            await asyncio.sleep(1.0)
            rss_end = rss_mb(pids())
            rows = await asyncio.to_thread(stored_turns, cluster.postgres.url, since)
        finally:
            for proc, _pipe in harnesses:
                proc.join(10)
                if proc.is_alive():
                    proc.kill()
            await asyncio.to_thread(cluster.stop)
    users = [(index, stats) for rep in reports for index, stats in rep["users"]]
    connect_errors = sum(rep["connect_errors"] for rep in reports)
    ttfa = [r["first_audio_ready"] for r in rows if r["first_audio_ready"] is not None]
    overhead = [r["first_audio_ready"] - ideal_ms(r["content"]) for r in rows if r["first_audio_ready"] is not None and r["content"]]
    per_stage = stages([{m: r[m] for m in STAGE_MARKS if r[m] is not None} for r in rows])
    turns = sum(st.turns for _, st in users)
    turn_errors = sum(st.errors for _, st in users)
    problems: dict[str, int] = {}
    for _, st in users:
        for p in st.problems:
            problems[p] = problems.get(p, 0) + 1
    return {
        "scenario": "load",
        "sessions": sessions,
        "minutes": minutes,
        "workers": workers,
        "runs": len(ttfa),
        "turns_spoken": turns,
        "turns_per_minute": round(turns / max(elapsed_s / 60, 1e-9), 1),
        "time_to_first_audio_ms": p50_p95(ttfa),
        "overhead_ms": p50_p95(overhead),
        "stages_ms": per_stage,
        "errors": turn_errors + connect_errors + sum(1 for r in rows if r["first_audio_ready"] is None),
        "error_kinds": problems,
        # who and when (UTC, when the turn was given up), the first 50: grep the workers' logs there
        "error_log": [
            {"user": f"load-{index}", "utc": time.strftime("%H:%M:%S", time.gmtime(t)), "problem": p}
            for t, index, p in sorted(((t, index, p) for index, st in users for t, p in st.incidents), key=lambda x: x[0])[:50]
        ],
        "warmup_errors": sum(rep["warmup_errors"] for rep in reports),
        # how late the harness processes' loops ran while they paced the microphones
        "harness_loop_lag_ms": lag_summary([lag for rep in reports for lag in rep["lags"]]),
        "harness_processes": len(reports),
        # % of one core each part used while the users talked (box_pct: every process on the box)
        "cpu_pct": cpu_pct,
        "idle": idle,
        "rss_mb_start": round(rss_start, 1),
        "rss_mb_end": round(rss_end, 1),
        "rss_growth_pct": round(100.0 * (rss_end - rss_start) / rss_start, 1) if rss_start else None,
        "measured": "first_audio_ready - speech_end as stored by the app; through Caddy (TLS), Redis, PostgreSQL",
    }
