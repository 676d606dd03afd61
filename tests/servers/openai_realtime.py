"""A local server speaking OpenAI's Realtime WebSocket (GA interface), for text-to-speech use.

Written from OpenAI's published Realtime reference (client and server events) and
the SDK's event types:

* ``GET /v1/realtime?model=...`` upgraded to a WebSocket, ``Authorization: Bearer
  <key>``. A bad key is **not** an HTTP 401: the upgrade succeeds, then an ``error``
  event (``invalid_request_error`` / ``invalid_api_key``) and close code 3000.
* On open: ``session.created`` (GA shape: ``session.type: "realtime"``,
  ``output_modalities``, ``audio.output.format``/``voice``). ``session.update``
  must carry ``session.type: "realtime"`` (else an ``error``), answered by
  ``session.updated``.
* ``response.create``: ``response.created`` (with the request's ``metadata`` and
  ``conversation_id: null`` for ``conversation: "none"``), output item / content
  part events, then ``response.output_audio.delta`` (base64 PCM16 24 kHz) with
  ``response.output_audio_transcript.delta``, the ``.done`` events and
  ``response.done`` (``status: "completed"``). Responses run side by side (out of
  band), so their events interleave; all carry ``response_id``.
* The "model": with instructions asking to read the text exactly it reads the
  ``input`` text (``reword`` makes it change a word, as the real one sometimes does);
  without them it *answers* the text ("Sure! ..."), which is what happens on the real
  service.
* ``response.cancel`` with a running ``response_id``: ``response.done`` with
  ``status: "cancelled"``; an unknown one: ``error`` ``response_cancel_not_active``.

Audio is the spoken text (:mod:`tests.servers.speech_audio`). Latency and faults:
``first_audio_s``, ``delta_chars``/``rtf`` pacing; per connection
(:meth:`FakeRealtimeServer.then`): ``close_after_deltas`` (close 1011 mid reply),
``first_audio_s``, ``reject_status`` (an HTTP refusal before the upgrade).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import struct
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from .deepgram import _frame, _read_frame, ws_accept
from .deepgram_speak import contextlib_suppress
from .speech_audio import SAMPLES_PER_CHAR, SAMPLE_RATE, encode_speech


@dataclass
class RealtimeProfile:
    first_audio_s: float = 0.175
    delta_chars: int = 4
    rtf: float = 0.2
    reword: bool = False  # replace one word in what is "read"


@dataclass
class RealtimeFault:
    reject_status: int | None = None
    close_after_deltas: int | None = None
    first_audio_s: float | None = None


@dataclass
class RealtimeSession:
    query: dict[str, str]
    headers: dict[str, str]
    session_updates: list[dict] = field(default_factory=list)
    responses: list[dict] = field(default_factory=list)  # response.create payloads
    cancels: list[str] = field(default_factory=list)
    deltas: int = 0
    closed_code: int | None = None


_ids = itertools.count(1)


def _id(prefix: str) -> str:
    return f"{prefix}_{next(_ids):06d}"


@dataclass
class FakeRealtimeServer:
    api_key: str | None = "sk-test"
    profile: RealtimeProfile = field(default_factory=RealtimeProfile)
    faults: deque = field(default_factory=deque)
    sessions: list[RealtimeSession] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _tasks: set = field(default_factory=set)

    async def start(self) -> "FakeRealtimeServer":
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for t in list(self._tasks):
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "FakeRealtimeServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        """What ``VOICECLAW_TTS_BASE_URL`` is set to (the SDK adds ``/realtime``)."""
        return f"http://{self.host}:{self.port}/v1"

    def then(self, **fault) -> "FakeRealtimeServer":
        self.faults.append(RealtimeFault(**fault))
        return self

    async def _serve(self, reader, writer) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            line = await reader.readline()
            if not line:
                return
            _, target, _ = line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while True:
                h = await reader.readline()
                if h in (b"\r\n", b"\n", b""):
                    break
                k, _, v = h.decode("latin-1").partition(":")
                headers[k.strip().lower()] = v.strip()
            parts = urlsplit(target)
            query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
            fault = self.faults.popleft() if self.faults else RealtimeFault()
            if parts.path.rstrip("/") != "/v1/realtime" or headers.get("upgrade", "").lower() != "websocket":
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            if fault.reject_status is not None:
                body = json.dumps({"error": {"message": "Injected fault.", "type": "server_error", "code": None}}).encode()
                writer.write(f"HTTP/1.1 {fault.reject_status} Error\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                return
            await self._session(reader, writer, query, headers, fault)
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            with contextlib_suppress():
                writer.close()

    async def _session(self, reader, writer, query, headers, fault: RealtimeFault) -> None:
        writer.write(ws_accept(headers, _id("req")))
        await writer.drain()
        sess = RealtimeSession(query=query, headers={k: v for k, v in headers.items() if k != "authorization"})
        self.sessions.append(sess)
        lock = asyncio.Lock()
        closed = asyncio.Event()
        p = self.profile
        first_audio_s = fault.first_audio_s if fault.first_audio_s is not None else p.first_audio_s

        async def send(msg: dict) -> None:
            if closed.is_set():
                return
            msg = {"event_id": _id("event"), **msg}
            async with lock:
                writer.write(_frame(1, json.dumps(msg).encode()))
                await writer.drain()

        async def close(code: int, reason: str) -> None:
            if closed.is_set():
                return
            closed.set()
            sess.closed_code = code
            async with lock:
                writer.write(_frame(8, struct.pack(">H", code) + reason.encode()[:120]))
                with contextlib_suppress():
                    await writer.drain()
            writer.close()

        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            await send({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_api_key", "message": "Incorrect API key provided.", "param": None, "event_id": None}})
            await close(3000, "invalid_api_key")
            return
        session = {"type": "realtime", "object": "realtime.session", "id": _id("sess"), "model": query.get("model", ""), "output_modalities": ["audio"],
                   "instructions": "", "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": "alloy", "speed": 1.0}}}
        await send({"type": "session.created", "session": session})
        running: dict[str, asyncio.Task] = {}

        async def respond(rid: str, params: dict) -> None:
            status = "cancelled"
            item_id = _id("item")
            try:
                text = ""
                for item in params.get("input") or []:
                    for c in item.get("content") or []:
                        if c.get("type") in ("input_text", "text"):
                            text += c.get("text", "")
                instructions = str(params.get("instructions") or session.get("instructions") or "").lower()
                if "exactly" in instructions or "verbatim" in instructions:
                    said = text.replace("the ", "a ", 1) if p.reword else text
                else:
                    said = f"Sure! Here is what I think about that: {text[:20]}"
                await send({"type": "response.output_item.added", "response_id": rid, "output_index": 0, "item": {"id": item_id, "type": "message", "role": "assistant", "status": "in_progress", "content": []}})
                await asyncio.sleep(first_audio_s)
                for i in range(0, len(said), max(1, p.delta_chars)):
                    piece = said[i : i + p.delta_chars]
                    await send({"type": "response.output_audio_transcript.delta", "response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0, "delta": piece})
                    await send({"type": "response.output_audio.delta", "response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0, "delta": base64.b64encode(encode_speech(piece)).decode()})
                    sess.deltas += 1
                    if fault.close_after_deltas is not None and sess.deltas >= fault.close_after_deltas:
                        await close(1011, "injected fault: closed mid reply")
                        return
                    await asyncio.sleep(len(piece) * SAMPLES_PER_CHAR / SAMPLE_RATE * p.rtf)
                await send({"type": "response.output_audio.done", "response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0})
                await send({"type": "response.output_audio_transcript.done", "response_id": rid, "item_id": item_id, "output_index": 0, "content_index": 0, "transcript": said})
                await send({"type": "response.output_item.done", "response_id": rid, "output_index": 0, "item": {"id": item_id, "type": "message", "role": "assistant", "status": "completed"}})
                status = "completed"
            except asyncio.CancelledError:
                status = "cancelled"
            finally:
                running.pop(rid, None)
                with contextlib_suppress():
                    await send({"type": "response.done", "response": {"id": rid, "object": "realtime.response", "status": status, "conversation_id": None,
                                                                      "metadata": params.get("metadata"), "status_details": {"type": status} if status != "completed" else None}})

        try:
            while not closed.is_set():
                op, payload = await _read_frame(reader)
                if op == 8:
                    await close(1000, "")
                    return
                if op == 9:
                    async with lock:
                        writer.write(_frame(10, payload))
                    continue
                if op != 1:
                    continue
                try:
                    ev = json.loads(payload)
                except ValueError:
                    await send({"type": "error", "error": {"type": "invalid_request_error", "code": "invalid_json", "message": "Not JSON."}})
                    continue
                kind = ev.get("type")
                if kind == "session.update":
                    s = ev.get("session") or {}
                    if s.get("type") != "realtime":
                        await send({"type": "error", "error": {"type": "invalid_request_error", "code": "missing_required_parameter", "param": "session.type", "message": "Missing required parameter: 'session.type'."}})
                        continue
                    sess.session_updates.append(s)
                    for k, v in s.items():
                        if k == "audio":
                            session["audio"]["output"].update((v or {}).get("output") or {})
                        else:
                            session[k] = v
                    await send({"type": "session.updated", "session": session})
                elif kind == "response.create":
                    params = ev.get("response") or {}
                    sess.responses.append(params)
                    rid = _id("resp")
                    await send({"type": "response.created", "response": {"id": rid, "object": "realtime.response", "status": "in_progress", "output": [],
                                                                         "conversation_id": None if params.get("conversation") == "none" else "conv_1",
                                                                         "metadata": params.get("metadata"), "output_modalities": params.get("output_modalities", ["audio"])}})
                    running[rid] = asyncio.create_task(respond(rid, params))
                elif kind == "response.cancel":
                    rid = ev.get("response_id", "")
                    sess.cancels.append(rid)
                    task = running.get(rid)
                    if task is None:
                        await send({"type": "error", "error": {"type": "invalid_request_error", "code": "response_cancel_not_active", "message": "Cancellation failed: no active response found."}})
                    else:
                        task.cancel()
                else:
                    await send({"type": "error", "error": {"type": "invalid_request_error", "code": "unknown_event", "message": f"Invalid value: {kind!r}."}})
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            for task in list(running.values()):
                task.cancel()
