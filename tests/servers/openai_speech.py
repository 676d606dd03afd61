"""A local server speaking OpenAI's ``POST /v1/audio/speech``, with latency and faults.

It answers like the real endpoint: JSON body ``{model, input, voice, speed,
response_format}``, ``Authorization: Bearer <key>``, the audio streamed back with
chunked transfer encoding, errors as ``{"error": {"message", "type", "code"}}``.
The audio is a deterministic tone whose length scales with the text (about 65 ms per
character, like speech), so clients and benchmarks can check durations.

Latency profile (``ttfb_s``: time to first byte, default 0.2 s; ``realtime_factor``:
audio produced at N x real time, default 5) and faults (status codes with optional
``Retry-After``, a drop mid-body, a stall before or after the headers, a body
trickled at ``trickle_bytes_per_s`` so no single read times out) are set per
server (``behavior``) or queued per request (``then(...)``) so "429, then succeed"
can be tested.

Usage::

    async with FakeSpeechServer(api_key="k") as srv:
        srv.then(status=429).then(drop_after_bytes=1000)   # next two requests
        tts = OpenAITTS(base_url=srv.base_url, api_key="k")

Used by the tests and by ``python -m voiceclaw_app.bench cloud``.
"""

from __future__ import annotations

import asyncio
import json
import math
import struct
import time
from collections import deque
from dataclasses import dataclass, field

from .http import FakeServer, RawHTTPServer, Request, Responder

SAMPLE_RATE = 24000  # what OpenAI's `pcm` format is: 24 kHz, 16-bit signed LE, mono
MS_PER_CHAR = 65.0


@dataclass
class SpeechBehavior:
    ttfb_s: float = 0.2
    realtime_factor: float = 5.0  # audio bytes per second = 48000 * factor
    status: int = 200
    error_body: str | None = None
    retry_after: str | None = None
    drop_after_bytes: int | None = None  # abort the socket after this many audio bytes
    stall_before_headers: bool = False  # accept the request, never answer
    stall_after_bytes: int | None = None  # send some audio, then go silent (socket open)
    write_ms: float = 20.0  # how much wall time each body write covers
    trickle_bytes_per_s: float | None = None  # send the body this slowly (each write well within a read timeout)


def tone_pcm(text: str, sample_rate: int = SAMPLE_RATE, speed: float = 1.0) -> bytes:
    """A 240 Hz tone (faded in and out) whose length follows the text, as 16-bit PCM.

    Built by tiling one precomputed period so even long replies cost microseconds:
    the server must not distort the latency it is there to simulate.
    """
    dur_s = max(0.2, len(text) * MS_PER_CHAR / 1000.0) / max(0.25, speed)
    n = int(dur_s * sample_rate)
    period = max(1, sample_rate // 240)
    one = b"".join(struct.pack("<h", int(8000 * math.sin(2 * math.pi * i / period))) for i in range(period))
    body = bytearray((one * (n // period + 1))[: 2 * n])
    fade = min(n // 2, max(1, int(0.01 * sample_rate)))
    for i in range(fade):  # short linear fades so the chunk joins do not click
        for j in (i, n - 1 - i):
            (v,) = struct.unpack_from("<h", body, 2 * j)
            struct.pack_into("<h", body, 2 * j, int(v * i / fade))
    return bytes(body)


def wav_header_streaming(sample_rate: int = SAMPLE_RATE) -> bytes:
    """The header OpenAI streams before `wav` audio: sizes unknown, set to 0xFFFFFFFF."""
    return (
        b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE"
        + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", 0xFFFFFFFF)
    )


@dataclass
class FakeSpeechServer(FakeServer):
    """``POST /v1/audio/speech`` (+ ``GET /v1/models``); ``await start()`` then ``base_url``."""

    behavior: SpeechBehavior = field(default_factory=SpeechBehavior)
    api_key: str | None = None  # None: accept any key
    queue: deque = field(default_factory=deque)  # per-request behaviours, consumed first
    bodies: list[dict] = field(default_factory=list)
    first_byte_at: list[float] = field(default_factory=list)  # monotonic s of each first audio byte
    _http: RawHTTPServer | None = None
    _cache: dict = field(default_factory=dict)


    def audio_for(self, text: str, speed: float = 1.0) -> bytes:
        key = (text, speed)
        if key not in self._cache:
            self._cache[key] = tone_pcm(text, speed=speed)
        return self._cache[key]

    # ------------------------------------------------------------------
    async def _error(self, out: Responder, status: int, message: str, type_: str, code: str | None = None, headers: dict | None = None) -> bool:
        await out.send(status, json.dumps({"error": {"message": message, "type": type_, "param": None, "code": code}}).encode(), headers=headers)
        return True

    async def _handle(self, req: Request, out: Responder) -> bool:
        path = req.path.split("?", 1)[0].rstrip("/")
        authorized = self.api_key is None or req.headers.get("authorization") == f"Bearer {self.api_key}"
        if req.method in ("GET", "HEAD") and path.endswith("/models"):
            if not authorized:
                return await self._error(out, 401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
            await out.send(200, json.dumps({"object": "list", "data": [{"id": "tts-1", "object": "model"}, {"id": "gpt-4o-mini-tts", "object": "model"}]}).encode())
            return True
        if req.method != "POST" or not path.endswith("/audio/speech"):
            return await self._error(out, 404, f"Invalid URL ({req.method} {path})", "invalid_request_error")
        b = self.next_behavior()
        if b.stall_before_headers:
            await asyncio.sleep(3600)
            return False
        if not authorized:
            return await self._error(out, 401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        try:
            body = req.json()
        except ValueError:
            return await self._error(out, 400, "We could not parse the JSON body of your request.", "invalid_request_error")
        if not isinstance(body, dict):
            return await self._error(out, 400, "The body must be a JSON object.", "invalid_request_error")
        self.bodies.append(body)
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            return await self._error(out, 400, "Missing required parameter: 'input'.", "invalid_request_error")
        if len(text) > 4096:
            return await self._error(out, 400, "'input' is too long (max 4096 characters).", "invalid_request_error")
        if not body.get("model") or not body.get("voice"):
            return await self._error(out, 400, "Missing required parameter: 'model' or 'voice'.", "invalid_request_error")
        fmt = body.get("response_format", "mp3")
        if fmt not in ("pcm", "wav"):
            return await self._error(out, 400, f"This test server only produces pcm and wav, not {fmt!r}.", "invalid_request_error")
        speed = float(body.get("speed", 1.0) or 1.0)
        if not 0.25 <= speed <= 4.0:
            return await self._error(out, 400, "speed must be between 0.25 and 4.0.", "invalid_request_error")
        if b.status != 200:
            headers = {"Retry-After": b.retry_after} if b.retry_after else None
            if b.error_body is not None:
                await out.send(b.status, b.error_body.encode(), headers=headers)
                return True
            return await self._error(out, b.status, f"Injected fault (HTTP {b.status}).", "server_error" if b.status >= 500 else "requests", headers=headers)

        pcm = self.audio_for(text, speed)
        payload = (wav_header_streaming() + pcm) if fmt == "wav" else pcm
        await asyncio.sleep(b.ttfb_s)
        await out.start_chunked(200, "audio/wav" if fmt == "wav" else "audio/pcm")
        bytes_per_s = b.trickle_bytes_per_s or SAMPLE_RATE * 2 * b.realtime_factor
        step = max(2, int(bytes_per_s * b.write_ms / 1000.0) & ~1)
        start = time.monotonic()
        sent = 0
        while sent < len(payload):
            piece = payload[sent : sent + step]
            if b.drop_after_bytes is not None and sent + len(piece) > b.drop_after_bytes:
                await out.chunk(payload[sent : b.drop_after_bytes])
                out.drop()
                return False
            if b.stall_after_bytes is not None and sent >= b.stall_after_bytes:
                await asyncio.sleep(3600)
                return False
            if sent == 0:
                self.first_byte_at.append(time.monotonic())
            await out.chunk(piece)
            sent += len(piece)
            delay = start + sent / bytes_per_s - time.monotonic()
            if delay > 0 and sent < len(payload):
                await asyncio.sleep(delay)
        await out.end()
        return True
