"""A local server speaking Deepgram's ``/v1/listen`` protocols (live WebSocket + pre-recorded HTTP).

Close enough to the real service that the same client code works against both:

* Handshake ``GET /v1/listen?model=nova-3&encoding=linear16&sample_rate=16000&...``
  with ``Authorization: Token <key>``; a bad key is refused with HTTP 401 and
  Deepgram's JSON error body before the upgrade.
* Binary frames are raw audio; text frames are the control messages ``KeepAlive``,
  ``Finalize`` and ``CloseStream``. The server answers with ``Results`` (interim
  ``is_final=false``; ``is_final=true`` segments; ``speech_final=true`` at the
  endpoint; ``from_finalize=true`` after a Finalize), ``SpeechStarted``,
  ``UtteranceEnd`` and, on CloseStream, ``Metadata`` then a normal close. No audio or
  message for ``idle_timeout_s`` closes the socket with code 1011 (Deepgram's NET-0001).
* ``POST /v1/listen`` with a WAV body: the pre-recorded JSON response.

The "recognizer" is deterministic: speech and silence are found by frame energy,
and each voiced segment is transcribed as the next entry of ``script`` (a list of
texts the test supplies). Timing follows *audio time* (what Deepgram does), so
with audio paced at real time the latency profile is the guide's: interim results
every 200 ms during speech, ``is_final`` 150 ms and ``speech_final`` 300 ms after
the end of speech (:class:`DeepgramProfile`, all settable). A script entry is only
consumed when its segment is finalized, so a connection dropped mid-segment re-hears
the same words after a reconnect.

Faults are queued per connection with :meth:`FakeDeepgramServer.then`:
``reject_status``, ``drop_after_audio_s`` (abort the TCP connection, no close
frame), ``drop_after_is_final`` (abort right after the first ``is_final`` result
with words, before its ``speech_final``), ``mute_after_audio_s`` (keep the socket
open and keep reading, but never send another message: a dead server),
``handshake_delay_s``; ``profile.message_delay_s`` delays every message.
``profile.combined_final``: when endpointing fires on the segment's own silence,
one ``Results`` carries both ``is_final`` and ``speech_final`` (what real Deepgram
usually sends) instead of an empty ``speech_final`` result after it.

Usage::

    async with FakeDeepgramServer(api_key="dg", script=["hello there"]) as srv:
        listener = DeepgramListener(api_key="dg", url=srv.url, ...)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import time
import uuid
import wave
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

try:  # numpy makes the energy measure ~free; fall back to pure Python without it
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
WINDOW_S = 0.01  # analysis window


def rms16(pcm: bytes) -> float:
    """Root-mean-square level of 16-bit little-endian mono PCM."""
    n = len(pcm) // 2
    if n == 0:
        return 0.0
    if _np is not None:
        a = _np.frombuffer(pcm[: 2 * n], dtype="<i2").astype(_np.float64)
        return float(_np.sqrt(_np.mean(a * a)))
    vals = struct.unpack(f"<{n}h", pcm[: 2 * n])
    return (sum(v * v for v in vals) / n) ** 0.5


@dataclass
class DeepgramProfile:
    """Timing of the fake recognizer, in seconds of audio after the event it follows."""

    interim_every_s: float = 0.2
    is_final_after_s: float = 0.15  # silence that closes a segment
    speech_final_after_s: float = 0.3  # silence that ends the utterance (endpointing)
    combined_final: bool = False  # one Results with is_final+speech_final (at speech_final_after_s)
    speech_started_after_s: float = 0.05  # voiced audio Deepgram's VAD needs before SpeechStarted
    words_per_s: float = 3.0  # how fast interim results reveal words
    energy_threshold: float = 400.0  # RMS above which a 10 ms window is speech
    message_delay_s: float = 0.0  # extra processing/network delay on every message
    idle_timeout_s: float = 10.0
    default_text: str = "testing one two three"


@dataclass
class ConnFault:
    reject_status: int | None = None  # refuse the handshake with this HTTP status
    drop_after_audio_s: float | None = None  # abort the socket once this much audio arrived
    handshake_delay_s: float = 0.0
    drop_after_is_final: bool = False  # abort right after the first is_final result with words (before speech_final)
    mute_after_audio_s: float | None = None  # after this much audio, send nothing more (socket stays open)


@dataclass
class LiveSession:
    """What one WebSocket connection saw and sent (for assertions)."""

    query: dict[str, str]
    headers: dict[str, str]
    audio_bytes: int = 0
    keepalives: int = 0
    finalizes: int = 0
    close_stream: bool = False
    sent: list[dict] = field(default_factory=list)
    closed_code: int | None = None
    dropped: bool = False
    keepalive_at: list[float] = field(default_factory=list)
    muted: int = 0  # messages withheld by mute_after_audio_s


class _Recognizer:
    """Energy segmentation + scripted transcripts for one connection, on audio time."""

    def __init__(self, server: "FakeDeepgramServer", query: dict[str, str], emit) -> None:
        self.srv = server
        self.p = server.profile
        self.emit = emit
        self.rate = int(query.get("sample_rate", "16000") or 16000)
        self.interim = query.get("interim_results", "false") == "true"
        self.vad_events = query.get("vad_events", "false") == "true"
        self.smart = query.get("smart_format", "false") == "true" or query.get("punctuate", "false") == "true"
        ep = query.get("endpointing", "10")
        self.endpointing = ep != "false"
        ue = query.get("utterance_end_ms")
        self.utterance_end_s = int(ue) / 1000.0 if ue and ue.isdigit() else None
        self.model = query.get("model", "base")
        self.buf = b""
        self.t = 0.0  # audio seconds consumed
        self.seg_start: float | None = None  # voiced segment in progress
        self.last_voiced_end = 0.0
        self.started_sent = False
        self.next_interim = 0.0
        self.utterance_open = False  # a segment was finalized, speech_final not yet sent
        self.pending_combined: list[dict] | None = None
        self.last_word_end: float | None = None  # for UtteranceEnd
        self.window = int(self.rate * WINDOW_S) * 2

    # -- transcript helpers -------------------------------------------
    def _peek_text(self) -> str:
        return self.srv.script[0] if self.srv.script else self.p.default_text

    def _words(self, text: str, start: float, end: float, reveal: int | None = None) -> list[dict]:
        toks = text.split()
        if not toks:
            return []
        step = max(1e-3, (end - start) / len(toks))
        out = []
        for i, tok in enumerate(toks[: reveal if reveal is not None else len(toks)]):
            plain = "".join(ch for ch in tok.lower() if ch.isalnum() or ch in "'-")
            out.append({"word": plain, "start": round(start + i * step, 3), "end": round(start + (i + 1) * step, 3), "confidence": 0.99, "punctuated_word": tok})
        return out

    def _transcript(self, words: list[dict]) -> str:
        return " ".join(w["punctuated_word"] if self.smart else w["word"] for w in words)

    def _results(self, words: list[dict], start: float, duration: float, *, is_final: bool, speech_final: bool = False, from_finalize: bool = False) -> dict:
        return {
            "type": "Results",
            "channel_index": [0, 1],
            "duration": round(max(0.0, duration), 3),
            "start": round(start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "channel": {"alternatives": [{"transcript": self._transcript(words), "confidence": 0.99 if words else 0.0, "words": words}]},
            "metadata": {"request_id": self.srv.request_id, "model_info": {"name": f"general-{self.model}", "version": "2025-01-01.0", "arch": self.model}, "model_uuid": "00000000-0000-0000-0000-000000000000"},
            "from_finalize": from_finalize,
        }

    # -- events -------------------------------------------------------
    def _finalize_segment(self, *, from_finalize: bool = False) -> None:
        """Close the voiced segment in progress: its words become final."""
        assert self.seg_start is not None
        text = self.srv.script.popleft() if self.srv.script else self.p.default_text
        end = max(self.last_voiced_end, self.seg_start + 0.05)
        words = self._words(text, self.seg_start, end)
        msg = self._results(words, self.seg_start, end - self.seg_start, is_final=True, from_finalize=from_finalize)
        self.srv.finalized.append(text)
        self.seg_start = None
        self.last_word_end = end
        if self.p.combined_final and not from_finalize and self.endpointing:
            self.pending_combined = (self.pending_combined or []) + [msg]
        else:
            self.emit(msg)
        self.utterance_open = self.endpointing and not from_finalize

    def _speech_final(self) -> None:
        self.utterance_open = False
        if self.pending_combined:
            msgs, self.pending_combined = self.pending_combined, None
            for m in msgs[:-1]:
                self.emit(m)
            self.emit(dict(msgs[-1], speech_final=True))
        else:
            self.emit(self._results([], self.last_voiced_end, self.t - self.last_voiced_end, is_final=True, speech_final=True))

    def feed(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.window:
            win, self.buf = self.buf[: self.window], self.buf[self.window :]
            self._window(win)

    def _window(self, win: bytes) -> None:
        start = self.t
        self.t += len(win) / 2 / self.rate
        voiced = rms16(win) > self.p.energy_threshold
        if voiced:
            if self.seg_start is None:
                self.seg_start = start
                self.started_sent = False
                self.next_interim = start + self.p.interim_every_s
            self.last_voiced_end = self.t
            if self.vad_events and not self.started_sent and self.t - self.seg_start >= self.p.speech_started_after_s:
                self.started_sent = True
                self.emit({"type": "SpeechStarted", "channel": [0, 1], "timestamp": round(self.seg_start, 3)})
        silence = self.t - self.last_voiced_end
        if self.seg_start is not None:
            if self.interim and voiced and self.t >= self.next_interim:
                self.next_interim += self.p.interim_every_s
                text = self._peek_text()
                n = len(text.split())
                reveal = min(max(1, n - 1), 1 + int((self.t - self.seg_start) * self.p.words_per_s))
                est_end = self.seg_start + max(self.t - self.seg_start, n / self.p.words_per_s)
                words = self._words(text, self.seg_start, est_end, reveal)
                self.emit(self._results(words, self.seg_start, self.t - self.seg_start, is_final=False))
            if not voiced and silence >= self.p.is_final_after_s:
                self._finalize_segment()
        if self.utterance_open and self.seg_start is None and silence >= self.p.speech_final_after_s:
            self._speech_final()
        if self.utterance_end_s is not None and self.interim and self.last_word_end is not None and self.seg_start is None and self.t - self.last_word_end >= self.utterance_end_s:
            self.emit({"type": "UtteranceEnd", "channel": [0, 1], "last_word_end": round(self.last_word_end, 3)})
            self.last_word_end = None

    def finalize(self) -> None:
        """The client's Finalize: flush what is pending, marked ``from_finalize``."""
        if self.seg_start is not None:
            self._finalize_segment(from_finalize=True)
        else:
            if self.pending_combined:
                for m in self.pending_combined:
                    self.emit(m)
                self.pending_combined = None
            self.emit(self._results([], self.t, 0.0, is_final=True, from_finalize=True))
        self.utterance_open = False


@dataclass
class FakeDeepgramServer:
    """Live ``wss://…/v1/listen`` and pre-recorded ``POST /v1/listen``; ``await start()`` then ``url``."""

    api_key: str | None = "dg-test-key"
    script: deque = field(default_factory=deque)
    profile: DeepgramProfile = field(default_factory=DeepgramProfile)
    faults: deque = field(default_factory=deque)  # ConnFault per new connection, consumed first
    http_faults: deque = field(default_factory=deque)  # status codes for pre-recorded requests
    sessions: list[LiveSession] = field(default_factory=list)
    finalized: list[str] = field(default_factory=list)  # script entries consumed, in order
    prerecorded: list[dict] = field(default_factory=list)  # query of each POST
    request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.AbstractServer | None = None
    _tasks: set = field(default_factory=set)
    _speak: object = None
    _flux: object = None

    def __post_init__(self) -> None:
        self.script = deque(self.script)

    async def start(self) -> "FakeDeepgramServer":
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

    async def __aenter__(self) -> "FakeDeepgramServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def url(self) -> str:
        """The base URL clients are configured with (``VOICECLAW_DEEPGRAM_URL``)."""
        return f"http://{self.host}:{self.port}"

    def then(self, **fault) -> "FakeDeepgramServer":
        """Queue a fault for the next WebSocket connection."""
        self.faults.append(ConnFault(**fault))
        return self

    def say(self, *texts: str) -> "FakeDeepgramServer":
        """Append transcripts for the next voiced segments."""
        self.script.extend(texts)
        return self

    # ------------------------------------------------------------------ HTTP
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, target, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                parts = urlsplit(target)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                if headers.get("upgrade", "").lower() == "websocket":
                    await self._live(reader, writer, parts.path, query, headers)
                    return
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                if not await self._http(writer, method, parts.path, query, headers, body):
                    return
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            return
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            try:
                writer.close()
            except Exception:
                pass

    def _authorized(self, headers: dict[str, str]) -> bool:
        return self.api_key is None or headers.get("authorization") == f"Token {self.api_key}"

    @staticmethod
    async def _send_http(writer: asyncio.StreamWriter, status: int, payload: dict, extra: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 402: "Payment Required", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "Status")
        head = [f"HTTP/1.1 {status} {reason}", "Content-Type: application/json", f"Content-Length: {len(body)}"] + [f"{k}: {v}" for k, v in (extra or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await writer.drain()

    def _error_body(self, status: int) -> dict:
        if status == 401:
            return {"err_code": "INVALID_AUTH", "err_msg": "Invalid credentials.", "request_id": self.request_id}
        if status == 403:
            return {"err_code": "INSUFFICIENT_PERMISSIONS", "err_msg": "Project does not have access to the requested model.", "request_id": self.request_id}
        if status == 429:
            return {"err_code": "TOO_MANY_REQUESTS", "err_msg": "Too many requests. Please try again later", "request_id": self.request_id}
        return {"err_code": "INTERNAL_SERVER_ERROR", "err_msg": f"Injected fault (HTTP {status}).", "request_id": self.request_id}

    async def _http(self, writer, method: str, path: str, query: dict, headers: dict, body: bytes) -> bool:
        if method != "POST" or path.rstrip("/") != "/v1/listen":
            await self._send_http(writer, 404, {"err_code": "NOT_FOUND", "err_msg": f"{method} {path} not found"})
            return True
        if not self._authorized(headers):
            await self._send_http(writer, 401, self._error_body(401), {"dg-error": "Invalid credentials."})
            return True
        self.prerecorded.append(query)
        if self.http_faults:
            status = self.http_faults.popleft()
            await self._send_http(writer, status, self._error_body(status))
            return True
        try:
            with wave.open(io.BytesIO(body)) as w:
                rate, pcm = w.getframerate(), w.readframes(w.getnframes())
        except (wave.Error, EOFError):
            await self._send_http(writer, 400, {"err_code": "Bad Request", "err_msg": "Bad Request: failed to process audio: corrupt or unsupported data", "request_id": self.request_id})
            return True
        segments: list[dict] = []
        emitted: list[dict] = []
        rec = _Recognizer(self, {"sample_rate": str(rate), "smart_format": query.get("smart_format", "false"), "punctuate": query.get("punctuate", "false"), "model": query.get("model", "base")}, emitted.append)
        rec.feed(pcm + b"\x00" * int(rate * 2 * (self.profile.is_final_after_s + 0.05)))  # trailing silence closes the last segment
        for m in emitted:
            if m.get("type") == "Results" and m["is_final"]:
                segments.extend(m["channel"]["alternatives"][0]["words"])
        transcript = rec._transcript(segments)
        await self._send_http(writer, 200, {
            "metadata": {"transaction_key": "deprecated", "request_id": self.request_id, "sha256": hashlib.sha256(body).hexdigest(), "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "duration": round(len(pcm) / 2 / rate, 3), "channels": 1, "models": ["00000000-0000-0000-0000-000000000000"], "model_info": {}},
            "results": {"channels": [{"alternatives": [{"transcript": transcript, "confidence": 0.99 if segments else 0.0, "words": segments}]}]},
        })
        return True

    # ------------------------------------------------------------------ WebSocket
    @property
    def speak(self):
        """The ``/v1/speak`` (Aura TTS) side of this host (:mod:`tests.servers.deepgram_speak`)."""
        if self._speak is None:
            from .deepgram_speak import SpeakService

            self._speak = SpeakService(self)
        return self._speak

    @property
    def flux(self):
        """The ``/v2/listen`` (Flux) side of this host (:mod:`tests.servers.deepgram_flux`)."""
        if self._flux is None:
            from .deepgram_flux import FluxService

            self._flux = FluxService(self)
        return self._flux

    async def _live(self, reader, writer, path: str, query: dict, headers: dict) -> None:
        route = path.rstrip("/")
        if route in ("/v1/speak", "/v2/listen"):
            service = self.speak if route == "/v1/speak" else self.flux
            fault = service.faults.popleft() if service.faults else service.fault_type()
            if getattr(fault, "handshake_delay_s", 0.0):
                await asyncio.sleep(fault.handshake_delay_s)
            if fault.reject_status is not None or not self._authorized(headers):
                status = fault.reject_status or 401
                await self._send_http(writer, status, self._error_body(status), {"dg-error": self._error_body(status)["err_msg"]})
                return
            await service.serve(reader, writer, query, headers, fault)
            return
        fault = self.faults.popleft() if self.faults else ConnFault()
        if fault.handshake_delay_s:
            await asyncio.sleep(fault.handshake_delay_s)
        if path.rstrip("/") != "/v1/listen":
            await self._send_http(writer, 404, {"err_code": "NOT_FOUND", "err_msg": "Not found"})
            return
        if fault.reject_status is not None or not self._authorized(headers):
            status = fault.reject_status or 401
            await self._send_http(writer, status, self._error_body(status), {"dg-error": self._error_body(status)["err_msg"]})
            return
        if query.get("encoding") not in (None, "linear16") or (query.get("encoding") and not query.get("sample_rate")):
            await self._send_http(writer, 400, {"err_code": "Bad Request", "err_msg": "encoding linear16 needs sample_rate"})
            return
        writer.write(ws_accept(headers, self.request_id))
        await writer.drain()
        sess = LiveSession(query=query, headers={k: v for k, v in headers.items() if k != "authorization"})
        self.sessions.append(sess)
        outq: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def emit(msg: dict) -> None:
            outq.put_nowait((loop.time() + self.profile.message_delay_s, msg))

        rec = _Recognizer(self, query, emit)

        async def sender() -> None:
            while True:
                due, msg = await outq.get()
                if msg is None:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                if fault.mute_after_audio_s is not None and sess.audio_bytes >= fault.mute_after_audio_s * rec.rate * 2 and msg.get("type") != "Metadata":
                    sess.muted += 1
                    continue
                sess.sent.append(msg)
                writer.write(_frame(1, json.dumps(msg).encode()))
                await writer.drain()
                if fault.drop_after_is_final and msg.get("type") == "Results" and msg.get("is_final") and not msg.get("speech_final") and msg["channel"]["alternatives"][0]["transcript"]:
                    sess.dropped = True
                    writer.transport.abort()
                    return

        send_task = asyncio.create_task(sender())
        try:
            while True:
                try:
                    op, payload = await asyncio.wait_for(_read_frame(reader), self.profile.idle_timeout_s)
                except asyncio.TimeoutError:
                    sess.closed_code = 1011
                    await _flush_and_close(outq, send_task, writer, 1011, "Deepgram did not receive audio data or a text message within the timeout window.")
                    return
                if op == 8:  # close from the client
                    sess.closed_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    await _flush_and_close(outq, send_task, writer, 1000, "")
                    return
                if op == 9:
                    writer.write(_frame(10, payload))
                    continue
                if op == 10:
                    continue
                if op == 2:
                    sess.audio_bytes += len(payload)
                    rec.feed(payload)
                    if fault.drop_after_audio_s is not None and sess.audio_bytes >= fault.drop_after_audio_s * rec.rate * 2:
                        sess.dropped = True
                        send_task.cancel()
                        writer.transport.abort()
                        return
                    continue
                if op == 1:
                    try:
                        msg = json.loads(payload)
                    except ValueError:
                        msg = {}
                    kind = msg.get("type") if isinstance(msg, dict) else None
                    if kind == "KeepAlive":
                        sess.keepalives += 1
                        sess.keepalive_at.append(time.monotonic())
                    elif kind == "Finalize":
                        sess.finalizes += 1
                        rec.finalize()
                    elif kind == "CloseStream":
                        sess.close_stream = True
                        if rec.seg_start is not None:
                            rec._finalize_segment()
                        emit({"type": "Metadata", "transaction_key": "deprecated", "request_id": self.request_id, "sha256": "", "created": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()), "duration": round(rec.t, 3), "channels": 1, "models": ["00000000-0000-0000-0000-000000000000"], "model_info": {}})
                        sess.closed_code = 1000
                        await _flush_and_close(outq, send_task, writer, 1000, "")
                        return
                    else:
                        emit({"type": "Error", "description": f"Unknown message type {kind!r}", "message": "", "variant": "UNKNOWN_MESSAGE"})
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if not send_task.done():
                send_task.cancel()


async def _flush_and_close(outq: asyncio.Queue, send_task: asyncio.Task, writer, code: int, reason: str) -> None:
    outq.put_nowait((0.0, None))
    try:
        await asyncio.wait_for(send_task, 5.0)
    except (asyncio.TimeoutError, asyncio.CancelledError, ConnectionError):
        pass
    writer.write(_frame(8, struct.pack(">H", code) + reason.encode()[:120]))
    try:
        await writer.drain()
    except ConnectionError:
        pass


def ws_accept(headers: dict[str, str], request_id: str) -> bytes:
    """The server's ``101 Switching Protocols`` answer to a WebSocket handshake."""
    accept = base64.b64encode(hashlib.sha1((headers.get("sec-websocket-key", "") + WS_GUID).encode()).digest()).decode()
    return ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" f"Sec-WebSocket-Accept: {accept}\r\ndg-request-id: {request_id}\r\n\r\n").encode()


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server-to-client WebSocket frame (FIN set, unmasked)."""
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack(">BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack(">BBQ", 0x80 | opcode, 127, n)
    return head + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One whole client message (continuations joined, mask removed)."""
    opcode, data = None, b""
    while True:
        b1, b2 = await reader.readexactly(2)
        fin, op = b1 & 0x80, b1 & 0x0F
        n = b2 & 0x7F
        if n == 126:
            n = struct.unpack(">H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack(">Q", await reader.readexactly(8))[0]
        mask = await reader.readexactly(4) if b2 & 0x80 else b"\x00\x00\x00\x00"
        raw = await reader.readexactly(n)
        if b2 & 0x80 and n:  # unmask with one big-int XOR: fast enough for audio bursts
            key = (mask * (n // 4 + 1))[:n]
            payload = (int.from_bytes(raw, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")
        else:
            payload = raw
        if op >= 8:  # control frames may interleave
            return op, payload
        if op != 0:
            opcode = op
        data += payload
        if fin:
            return opcode or 2, data
