"""OpenAI text-to-speech through the Realtime API (``gpt-realtime-2.1-mini``), the
replacement for the ``/v1/audio/speech`` models that shut down on 2027-01-06.

Built on the ``openai`` SDK's realtime client (``AsyncOpenAI.realtime.connect``): one
warm WebSocket per voice session (opened by :meth:`warm` when the user starts
speaking), each flushed chunk an **out-of-band response** (``conversation: "none"``
with the text as ``input``), so nothing accumulates in a server-side conversation and
responses can run side by side. Protocol facts this relies on (OpenAI's docs and the
SDK's code):

* The GA session shape: ``session.type: "realtime"``, ``output_modalities``,
  ``audio.output.format`` (``audio/pcm`` at 24 kHz) and ``audio.output.voice``.
* Without instructions to read the text exactly, the model *answers* it; with them
  it may still reword slightly, so the transcript it reports
  (``response.output_audio_transcript.done``) is compared with the text and a
  difference is logged.
* Events of several responses interleave: they are matched by ``response_id``; the
  ``metadata`` sent with ``response.create`` (reply and flush ids) comes back in
  ``response.created``, which ties a response id to its flush.
* Barge-in sends ``response.cancel`` with each running response's id.
* A bad key is an ``error`` event (``invalid_api_key``) and then close code 3000,
  not an HTTP 401: the socket counts as open only after ``session.created``.

``VOICECLAW_TTS_BASE_URL`` redirects it (the SDK derives ``ws(s)://…/realtime``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import logging
import re
from typing import Any, AsyncIterator

from .base import (
    TTS,
    AudioClip,
    AuthError,
    BadRequestError,
    CancelToken,
    ConnectError,
    NotFoundError,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    RateLimitError,
    ReplyAudio,
    ReplyEvent,
    ReplyFlushed,
    QueuedReplyStream,
    ReplyStream,
    ServerError,
    StreamDropped,
    TTSCapabilities,
    WarmSocket,
    WarmSockets,
    error_for_status,
    one_flush_reply,
    whole_clip,
)

log = logging.getLogger("voiceclaw.tts.realtime")

SERVICE = "OpenAI Realtime speech service"
DEFAULT_MODEL = "gpt-realtime-2.1-mini"
DEFAULT_VOICE = "marin"
SAMPLE_RATE = 24000
#: what makes the model read instead of reply
READ_EXACTLY = (
    "You are a text-to-speech engine. Read the user's text aloud exactly as written, word for word, "
    "in a natural, friendly voice. Do not answer it, comment on it, translate it, or add or drop any word."
)
_WORDS = re.compile(r"[\w']+")
_reply_ids = itertools.count(1)


def _as_dict(event: Any) -> dict:
    if isinstance(event, dict):
        return event
    for name in ("to_dict", "model_dump"):
        fn = getattr(event, name, None)
        if fn is not None:
            with contextlib.suppress(TypeError):
                return fn()
    return {}


def error_from_event(err: dict) -> ProviderError:
    """A Realtime ``error`` event's ``error`` object -> a typed error in plain words."""
    code = str(err.get("code") or "")
    etype = str(err.get("type") or "")
    message = str(err.get("message") or "")[:200]
    if code in ("invalid_api_key", "invalid_authentication") or etype == "authentication_error":
        # the service's message quotes part of the key: not kept, not logged
        return AuthError(f"The {SERVICE} rejected the API key.", detail=code)
    if code == "model_not_found":
        return NotFoundError(f"The {SERVICE} does not know that model: check the TTS model setting.", detail=message)
    if code == "rate_limit_exceeded" or etype == "rate_limit_error":
        return RateLimitError(f"The {SERVICE} is rate-limiting requests; try again in a moment.", retryable=True, detail=message)
    if etype == "server_error":
        return ServerError(f"The {SERVICE} had an internal error.", retryable=True, detail=message)
    return BadRequestError(f"The {SERVICE} refused the request: {message or code or etype}.", detail=message)


def map_error(exc: BaseException) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(status, int):
        return error_for_status(SERVICE, status)
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ProviderTimeout(f"The {SERVICE} did not answer in time.", retryable=True)
    if isinstance(exc, OSError):
        return ConnectError(f"Could not connect to the {SERVICE}: check VOICECLAW_TTS_BASE_URL and the network.", retryable=True, detail=type(exc).__name__)
    rcvd = getattr(exc, "rcvd", None)
    code = getattr(rcvd, "code", None)
    if code == 3000:
        return AuthError(f"The {SERVICE} closed the connection: the API key was not accepted.")
    if "ConnectionClosed" in type(exc).__name__ or "ConnectionClosed" in str(type(exc).__mro__):
        return StreamDropped(f"The connection to the {SERVICE} dropped.", retryable=True, detail=str(exc)[:200])
    return ProtocolError(f"The {SERVICE} sent something unexpected.", detail=f"{type(exc).__name__}: {exc}"[:200])


def same_words(a: str, b: str) -> bool:
    return _WORDS.findall(a.lower()) == _WORDS.findall(b.lower())


class _RealtimeSocket(WarmSocket):
    """One Realtime connection (session configured) and its reader."""

    label = "Realtime socket"
    log = log  # the provider's logger (WarmSocket logs the socket's end with it)

    def __init__(self, manager: Any, conn: Any):
        self._manager = manager
        self.conn = conn
        self.reply: _RealtimeReply | None = None
        self.live: set[str] = set()  # response ids running (created, not done)
        self._start_reader("realtime-reader")

    async def _read(self) -> None:
        while True:
            ev = _as_dict(await self.conn.recv())
            kind = ev.get("type", "")
            rid = ev.get("response_id") or (ev.get("response") or {}).get("id")
            if kind == "response.created":
                self.live.add(rid)
                meta = (ev.get("response") or {}).get("metadata") or {}
                reply = self.reply
                if reply is not None and meta.get("voiceclaw_reply") == reply.reply_id:
                    await reply.created(rid, int(meta.get("voiceclaw_flush", -1)))
                else:  # a response of a reply already cancelled
                    await self.cancel(rid)
            elif kind == "response.done":
                self.live.discard(rid)
                if self.reply is not None:
                    self.reply.done(rid, ev.get("response") or {})
            elif kind == "error":
                err = ev.get("error") or {}
                if "cancel" in str(err.get("code") or ""):
                    continue  # cancelling a response that had just finished
                exc = error_from_event(err)
                log.warning("Realtime error event %s: %s", err.get("code"), exc.detail)
                if self.reply is not None:
                    self.reply.fail(exc)
            elif self.reply is not None and rid:
                self.reply.event(kind, rid, ev)

    def _ended_error(self, exc: Exception) -> ProviderError:
        return map_error(exc)

    async def cancel(self, rid: str) -> None:
        if rid in self.live:
            with contextlib.suppress(Exception):
                await self.conn.response.cancel(response_id=rid)

    async def _close_transport(self) -> None:
        await self.conn.close()


class _RealtimeReply(QueuedReplyStream):
    """A reply on a :class:`_RealtimeSocket`: each flush is one out-of-band response."""

    sample_rate = SAMPLE_RATE

    def __init__(self, owner: "OpenAIRealtimeTTS", socket: _RealtimeSocket, voice: str):
        self._owner = owner
        self._socket = socket
        self.voice = voice
        self.stall_timeout_s = owner.first_audio_timeout_s
        self.reply_id = str(next(_reply_ids))
        self._queue: asyncio.Queue = asyncio.Queue()
        self._text: list[str] = []  # pushed since the last flush
        self._texts: dict[int, str] = {}  # flush id -> its text (for the transcript check)
        self._flush_of: dict[str, int] = {}  # response id -> flush id
        self._next = 0
        self._closed = False
        self._cleared = False
        # out-of-band responses may run side by side; the audio goes out in flush order
        self._buffers: dict[int, list[ReplyEvent]] = {}
        self._finished: set[int] = set()
        self._head = 0
        self._transcripts: dict[int, str] = {}
        socket.reply = self

    # ---- from the socket's reader
    async def created(self, rid: str, flush_id: int) -> None:
        if self._cleared:
            await self._socket.cancel(rid)
            return
        self._flush_of[rid] = flush_id

    def event(self, kind: str, rid: str, ev: dict) -> None:
        fid = self._flush_of.get(rid)
        if fid is None or self._cleared:
            return
        if kind == "response.output_audio.delta":
            pcm = base64.b64decode(ev.get("delta") or "")
            if pcm:
                self._emit(fid, ReplyAudio(fid, pcm))
        elif kind == "response.output_audio_transcript.done":
            said, asked = str(ev.get("transcript") or ""), self._texts.get(fid, "")
            if not same_words(said, asked):
                log.warning("Realtime TTS did not read the text verbatim: asked %r, it said %r", asked[:200], said[:200])
            self._transcripts[fid] = said

    def done(self, rid: str, response: dict) -> None:
        fid = self._flush_of.pop(rid, None)
        if fid is None or self._cleared:
            return
        status = response.get("status")
        if status == "failed":
            details = response.get("status_details") or {}
            self.fail(error_from_event(details.get("error") or {"message": str(details)[:200]}))
            return
        self._emit(fid, ReplyFlushed(fid, self._transcripts.pop(fid, None)), last=True)

    def fail(self, exc: ProviderError) -> None:
        self._queue.put_nowait(exc)

    def _emit(self, fid: int, ev: ReplyEvent, last: bool = False) -> None:
        """Deliver in flush order: a later response's audio waits for the ones before."""
        if fid == self._head:
            self._queue.put_nowait(ev)
        else:
            self._buffers.setdefault(fid, []).append(ev)
        if last:
            self._finished.add(fid)
            while self._head in self._finished:
                self._finished.discard(self._head)
                self._head += 1
                for queued in self._buffers.pop(self._head, []):
                    self._queue.put_nowait(queued)

    # ---- the ReplyStream API
    async def push(self, text: str) -> None:
        self._text.append(text)

    async def flush(self) -> int:
        fid = self._next
        self._next += 1
        text = "".join(self._text).strip()
        self._text = []
        self._texts[fid] = text
        try:
            await self._socket.conn.response.create(response=self._owner.response_params(text, self.voice, {"voiceclaw_reply": self.reply_id, "voiceclaw_flush": str(fid)}))
        except Exception as exc:
            raise map_error(exc) from exc
        return fid

    async def clear(self) -> None:
        self._cleared = True
        self._text = []
        for rid in list(self._flush_of):
            await self._socket.cancel(rid)
        self._flush_of.clear()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._flush_of:
            await self.clear()
        if self._socket.reply is self:
            self._socket.reply = None
        self._owner.pool.give_back(self._socket)


class OpenAIRealtimeTTS(TTS):
    """Speech through out-of-band Realtime responses on one warm socket per voice session."""

    name = "openai-realtime"
    capabilities = TTSCapabilities(streaming=True, sample_rate=SAMPLE_RATE, text_stream=True)

    def __init__(self, *, api_key: str, base_url: str | None = None, model: str = DEFAULT_MODEL, voice: str = "", connect_timeout_s: float = 5.0, first_audio_timeout_s: float = 15.0):
        from .openai_tts import tts_base_url_from_env

        self._api_key = str(api_key or "")
        self.base_url = (base_url or tts_base_url_from_env()).rstrip("/")
        self.model = model or DEFAULT_MODEL
        self.voice = voice or DEFAULT_VOICE  # the session's voice (set before any audio: it cannot change after)
        self.connect_timeout_s = connect_timeout_s
        self.first_audio_timeout_s = first_audio_timeout_s
        self.pool = WarmSockets(self._open_socket)

    @classmethod
    def from_settings(cls, settings, keys, **kw) -> "OpenAIRealtimeTTS":
        model = (settings.tts_model or "").strip()
        if not model.startswith("gpt-realtime"):
            model = DEFAULT_MODEL  # e.g. a retired /v1/audio/speech model left in the settings
        kw.setdefault("voice", settings.tts_voice)
        return cls(api_key=keys.openai_api_key, model=model, **kw)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIRealtimeTTS(base_url={self.base_url!r}, model={self.model!r})"

    def cache_identity(self, voice: str, speed: float) -> tuple[str, str, float]:
        return (f"{self.name}:{self.model}", voice or self.voice, round(speed, 3))

    def response_params(self, text: str, voice: str, metadata: dict[str, str]) -> dict:
        return {
            "conversation": "none",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}],
            "instructions": READ_EXACTLY,
            "output_modalities": ["audio"],
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": voice or self.voice}},
            "metadata": metadata,
        }

    async def _open_socket(self) -> _RealtimeSocket:
        import openai

        if not self._api_key and "api.openai.com" in self.base_url:
            raise AuthError("No OpenAI API key is set: add it on the settings page or set OPENAI_API_KEY.")
        client = openai.AsyncOpenAI(api_key=self._api_key or "not-set", base_url=self.base_url, max_retries=0)
        manager = client.realtime.connect(model=self.model)
        conn = None
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                conn = await manager.enter()
                first = _as_dict(await conn.recv())
                if first.get("type") == "error":
                    raise error_from_event(first.get("error") or {})
                if first.get("type") != "session.created":
                    raise ProtocolError(f"The {SERVICE} did not start a session.", detail=str(first.get("type")))
                await conn.session.update(session={
                    "type": "realtime",
                    "output_modalities": ["audio"],
                    "instructions": READ_EXACTLY,
                    "audio": {"output": {"format": {"type": "audio/pcm", "rate": SAMPLE_RATE}, "voice": self.voice}},
                })
        except BaseException as exc:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_error(exc) from exc
        return _RealtimeSocket(manager, conn)

    async def warm(self) -> None:
        await self.pool.warm()

    async def open_reply(self, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> ReplyStream:
        sock = await self.pool.take()
        return _RealtimeReply(self, sock, voice)  # type: ignore[arg-type]

    async def synthesize_stream(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AsyncIterator[AudioClip]:
        """One chunk as a one-response reply (phrases, ``doctor``, the per-chunk fallback)."""
        async for clip in one_flush_reply(self, text, voice=voice, speed=speed, cancel=cancel, timeout_s=self.first_audio_timeout_s, service=SERVICE):
            yield clip

    async def synthesize(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        return await whole_clip(self, text, voice=voice, speed=speed, cancel=cancel, service=SERVICE)

    async def aclose(self) -> None:
        await self.pool.aclose()
