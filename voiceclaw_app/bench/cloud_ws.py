"""``bench cloud --via-ws``: the cloud scenario through the running app's ``/ws/voice``.

The app is started in prod mode with Deepgram (v1 or Flux: ``--stt``), the LLM and
the TTS (``--tts openai|deepgram|openai-realtime``) all pointed at the local protocol
servers (guide's latency profile, :class:`.cloud.CloudVoices`). The
benchmark is the browser's microphone: it opens ``/ws/voice`` (hello -> ready),
streams the spoken fixtures as 20 ms PCM frames paced at real time over one voice
session, and reads each turn's stored timing marks back from the database, so the
figure includes the WebSocket hop, the session's listener and turn starter, the
Reflex-side turn task and its database writes.

Figure: ``first_audio_ready - speech_end`` as the app stored it, where the app's
speech end is the listener's estimate of the last voiced audio (Deepgram word
timings mapped onto frame arrival; within a few ms of the fixture's known last
voiced sample, see ``listener_speech_end_error`` in the direct ``cloud`` run).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ..pipeline.text import chunk_text
from ..pipeline.timing import now_ms
from .browser import BENCH_USER, http_login, prod_app
from .cloud import FRAME_MS, LEAD_S, RATE, TAIL_S, CloudVoices
from .drive import dither, load_fixtures, paced
from .pipeline import replies
from .stats import p50_p95

import os

#: the app's port (``VOICECLAW_BENCH_PORT``: parallel runs on one machine must not collide)
PORT = int(os.environ.get("VOICECLAW_BENCH_PORT", "3127"))


def _timings(db: Path) -> list[tuple[float | None, str]]:
    """(first_audio_ready ms after speech end, the reply) per stored spoken turn, oldest first."""
    con = sqlite3.connect(str(db))
    try:
        return con.execute(
            "select t.first_audio_ready, m.content from vc_turn_timing t join vc_message m on m.id = t.message_id "
            "where t.spoken_input = 1 order by t.id"
        ).fetchall()
    finally:
        con.close()


async def run_cloud_ws(runs: int = 8, *, tts: str = "openai", stt: str = "deepgram", preemptive: bool = True) -> dict[str, Any]:
    import websockets

    fixtures = load_fixtures()
    # the direct run's replies; the app's TTS cache is emptied before each turn (below), so
    # every first chunk is really synthesized, with no marker making it longer
    answers = iter(replies(runs * 4, seed=13))
    rng = np.random.default_rng(9)
    ttfa: list[float] = []
    overhead: list[float] = []
    floors: list[float] = []
    errors = 0

    def reply_fn(messages: list[dict]) -> str:
        return next(answers, "Let me think about that, one moment please.")

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        async with CloudVoices(tts, stt, reply_fn) as voices:
            app = prod_app(PORT, data, voices.env())
            await asyncio.to_thread(app.__enter__)  # the fake servers keep answering meanwhile
            try:
                from ..server.auth import SESSION_COOKIE

                token = await asyncio.to_thread(http_login, f"http://localhost:{PORT}", BENCH_USER)  # the socket needs a login
                async with websockets.connect(f"ws://localhost:{PORT}/ws/voice", max_size=None, additional_headers={"Cookie": f"{SESSION_COOKIE}={token}"}) as ws:
                    await ws.send(json.dumps({"type": "hello", "client_token": secrets.token_hex(16), "sample_rate": RATE, "mode": "hands_free"}))
                    ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    assert ready.get("type") == "ready", ready
                    drain = asyncio.create_task(_drain(ws))
                    db = data / "voiceclaw.db"
                    for i in range(runs):
                        fx = fixtures[i % len(fixtures)]
                        voices.say(fx)
                        await asyncio.to_thread(empty_tts_cache, data)
                        before = len(await asyncio.to_thread(_timings, db))
                        pcm = dither(int(LEAD_S * RATE), rng) + fx.pcm + dither(int(TAIL_S * RATE), rng)
                        async for _, frame, _due in paced(pcm, FRAME_MS, now_ms()):
                            await ws.send(frame)
                        rows = await _wait_for_row(db, before, 15.0)
                        if rows is None or rows[-1][0] is None:
                            errors += 1
                            continue
                        measured, reply = rows[-1]
                        ideal = voices.floor_ms(reply, chunk_text(reply)[0], preemptive)
                        floors.append(ideal)
                        ttfa.append(measured)
                        overhead.append(measured - ideal)
                    drain.cancel()
            finally:
                await asyncio.to_thread(app.__exit__, None, None, None)
            profile = voices.profile()
    return {
        "scenario": "cloud",
        "via": "/ws/voice of the running app",
        "tts": tts,
        "stt": stt,
        "runs": runs,
        "time_to_first_audio_ms": p50_p95(ttfa),
        "overhead_ms": p50_p95(overhead),
        "floor_ms": p50_p95(floors),
        "stages_ms": {},
        "errors": errors,
        "profile": profile,
        "measured": "first_audio_ready - speech_end as stored by the app (speech end: the listener's estimate)",
    }


def empty_tts_cache(data: Path) -> None:
    """A benchmark measures synthesis, not cache hits (replies repeat); the fixed
    phrases' pinned entries stay."""
    for path in (data / "audio" / "cache").glob("r-*.wav"):
        path.unlink(missing_ok=True)


async def _drain(ws) -> None:
    """Read (and ignore) what the server sends on the mic socket (pong, barge_in...)."""
    async for _ in ws:
        pass


async def _wait_for_row(db: Path, before: int, timeout_s: float):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        rows = await asyncio.to_thread(_timings, db)
        if len(rows) > before:
            return rows
        await asyncio.sleep(0.2)
    return None
