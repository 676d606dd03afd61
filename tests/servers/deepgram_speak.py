"""Deepgram Aura's ``/v1/speak`` WebSocket, served by :class:`~tests.servers.deepgram.FakeDeepgramServer`.

Written from Deepgram's published protocol (streaming TTS guide, Flush / Clear /
Close pages, the SDK's message types):

* Handshake ``GET /v1/speak?model=aura-2-...&encoding=linear16&sample_rate=24000``
  with ``Authorization: Token <key>``; a bad key is refused with HTTP 401 before the
  upgrade. On open the server sends ``Metadata`` (request id, model name/version).
* Client text frames: ``{"type": "Speak", "text": ...}`` appends to the buffer
  exactly as sent (no separator added); ``Flush`` synthesizes the buffer: binary
  frames of linear16 audio, then ``{"type": "Flushed", "sequence_id": n}``;
  ``Clear`` drops the buffer and pending audio (a frame already on its way may
  still arrive) and answers ``{"type": "Cleared", "sequence_id": n}``; ``Close``
  closes the socket (pending audio dropped).
* More than 20 flushes in 60 s: the flush is ignored and a ``Warning`` is sent.
* No audio before a flush. Unknown messages get a ``Warning``.

The audio is the text (:mod:`tests.servers.speech_audio`), so tests read back what
was synthesized. Latency: first audio ``first_audio_s`` after the flush, then
frames of ``frame_chars`` characters generated ``rtf`` times faster than they
play; both are read per flush, so changing the profile slows down (or silences,
with a long ``first_audio_s``) sockets already open, such as a client's warm one.
Faults (per connection, :meth:`FakeDeepgramServer.speak_then`):
``reject_status``, ``close_after_frames`` (close 1011 mid reply), ``first_audio_s``
(slow first audio), ``idle_close_s`` (the service closes an idle socket).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

from .speech_audio import SAMPLE_RATE, SAMPLES_PER_CHAR, encode_speech


@dataclass
class SpeakProfile:
    first_audio_s: float = 0.175  # flush -> first audio frame (the guide: 150-200 ms)
    frame_chars: int = 4  # characters of text per audio frame (200 ms of audio)
    rtf: float = 0.2  # generation time / audio time
    flush_limit: int = 20
    flush_window_s: float = 60.0
    idle_close_s: float = 60.0


@dataclass
class SpeakFault:
    reject_status: int | None = None
    close_after_frames: int | None = None  # audio frames sent on this socket before it closes (1011)
    first_audio_s: float | None = None  # overrides the profile on this socket
    idle_close_s: float | None = None


@dataclass
class SpeakSession:
    """What one speak socket saw (for assertions)."""

    query: dict[str, str]
    texts: list[str] = field(default_factory=list)  # Speak texts as received
    flushed: list[str] = field(default_factory=list)  # the buffer at each accepted flush
    flushes: int = 0
    refused_flushes: int = 0
    clears: int = 0
    closed_by_client: bool = False
    closed_code: int | None = None
    frames: int = 0
    first_audio_at: list[float] = field(default_factory=list)  # monotonic s, per flush


class SpeakService:
    """The speak side of the fake Deepgram host."""

    def __init__(self, server) -> None:
        self.srv = server
        self.profile = SpeakProfile()
        self.faults: deque[SpeakFault] = deque()
        self.sessions: list[SpeakSession] = []

    fault_type = SpeakFault

    def then(self, **fault) -> "SpeakService":
        """Queue a fault for the next speak connection."""
        self.faults.append(SpeakFault(**fault))
        return self

    async def serve(self, reader, writer, query: dict, headers: dict, fault: SpeakFault) -> None:
        from .deepgram import _frame, _read_frame, ws_accept

        sess = SpeakSession(query=query)
        self.sessions.append(sess)
        writer.write(ws_accept(headers, self.srv.request_id))
        await writer.drain()
        p = self.profile
        idle_close_s = fault.idle_close_s if fault.idle_close_s is not None else p.idle_close_s
        rate = int(query.get("sample_rate") or SAMPLE_RATE)
        lock = asyncio.Lock()
        closed = asyncio.Event()

        async def send(opcode: int, payload: bytes) -> None:
            async with lock:
                writer.write(_frame(opcode, payload))
                await writer.drain()

        async def send_json(msg: dict) -> None:
            await send(1, json.dumps(msg).encode())

        async def close(code: int, reason: str = "") -> None:
            sess.closed_code = code
            closed.set()
            with contextlib_suppress():
                await send(8, struct.pack(">H", code) + reason.encode()[:120])
            writer.close()

        await send_json({"type": "Metadata", "request_id": self.srv.request_id, "model_name": query.get("model", ""), "model_version": "2025-01-01.0", "model_uuid": str(uuid.uuid4())})
        buffer: list[str] = []
        jobs: asyncio.Queue = asyncio.Queue()
        flush_times: deque[float] = deque()
        seq = {"n": 0}
        state = {"sending": False}

        async def synth() -> None:
            while True:
                n, text = await jobs.get()
                state["sending"] = True
                await asyncio.sleep(fault.first_audio_s if fault.first_audio_s is not None else p.first_audio_s)
                sess.first_audio_at.append(time.monotonic())
                per_frame = max(1, p.frame_chars)
                for i in range(0, len(text), per_frame):
                    piece = text[i : i + per_frame]
                    await send(2, encode_speech(piece, rate))
                    sess.frames += 1
                    if fault.close_after_frames is not None and sess.frames >= fault.close_after_frames:
                        await close(1011, "injected fault: closed mid reply")
                        return
                    await asyncio.sleep(len(piece) * SAMPLES_PER_CHAR / SAMPLE_RATE * p.rtf)
                state["sending"] = False
                await send_json({"type": "Flushed", "sequence_id": n})

        synth_task = asyncio.create_task(synth())
        try:
            while not closed.is_set():
                try:
                    op, payload = await asyncio.wait_for(_read_frame(reader), idle_close_s)
                except asyncio.TimeoutError:
                    await close(1000, "idle")
                    return
                if op == 8:
                    sess.closed_by_client = True
                    await close(1000)
                    return
                if op == 9:
                    await send(10, payload)
                    continue
                if op != 1:
                    await send_json({"type": "Warning", "description": "Binary messages are not accepted.", "code": "INVALID_MESSAGE"})
                    continue
                try:
                    msg = json.loads(payload)
                except ValueError:
                    msg = {}
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind == "Speak":
                    sess.texts.append(str(msg.get("text", "")))
                    buffer.append(str(msg.get("text", "")))
                elif kind == "Flush":
                    now = time.monotonic()
                    while flush_times and now - flush_times[0] >= p.flush_window_s:
                        flush_times.popleft()
                    if len(flush_times) >= p.flush_limit:
                        sess.refused_flushes += 1
                        await send_json({"type": "Warning", "description": f"Exceeded the limit of {p.flush_limit} Flush messages per {p.flush_window_s:.0f} seconds.", "code": "FLUSH_LIMIT_EXCEEDED"})
                        continue
                    flush_times.append(now)
                    text = "".join(buffer)
                    buffer.clear()
                    sess.flushes += 1
                    sess.flushed.append(text)
                    jobs.put_nowait((seq["n"], text))
                    seq["n"] += 1
                elif kind == "Clear":
                    sess.clears += 1
                    buffer.clear()
                    was_sending = state["sending"]
                    synth_task.cancel()
                    with contextlib_suppress():
                        await synth_task
                    while not jobs.empty():
                        jobs.get_nowait()
                    if was_sending:  # a frame already on its way arrives after the Clear
                        await send(2, encode_speech("~", rate))
                    state["sending"] = False
                    await send_json({"type": "Cleared", "sequence_id": seq["n"]})
                    synth_task = asyncio.create_task(synth())
                elif kind == "Close":
                    sess.closed_by_client = True
                    await close(1000)
                    return
                else:
                    await send_json({"type": "Warning", "description": f"Unknown message type {kind!r}.", "code": "UNKNOWN_MESSAGE"})
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            synth_task.cancel()
            with contextlib_suppress():
                await synth_task


class contextlib_suppress:
    """Suppress everything, cancellation included (tearing a fake connection down)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return True

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        return True
