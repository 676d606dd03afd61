"""Deepgram Aura text-to-speech over the speak WebSocket (``deepgram-sdk`` v7, ``speak.v1``).

Why a socket and not a request per chunk: the reply's text goes in as the LLM
writes it (``Speak``), each ``Flush`` turns what was sent into audio at once (no
TLS + HTTP setup per chunk), and ``Clear`` drops it on barge-in. Protocol facts
this module relies on (Deepgram's docs and the SDK's code):

* ``Speak`` texts are joined exactly as sent (the scheduler keeps the spaces); no
  audio comes before a ``Flush``; each flush ends with ``Flushed``.
* At most 20 flushes per 60 s per connection (a Warning after that): the socket's
  :class:`FlushWindow` counts them, the scheduler's ``FlushPolicy`` spends about two
  per reply (the first chunk at once, the rest grouped), and a socket with fewer
  than :data:`REPLY_FLUSHES` left rests while a second one serves (quick
  back-and-forth can ask for more than 20 a minute).
* After ``Clear`` audio may still arrive until ``Cleared``; the SDK parses
  ``Cleared`` as its ``Flushed`` class, so messages are told apart by ``type``.
* ``Close`` drops pending audio; the service closes an idle socket after a while,
  which is why the pool reopens one on the next :meth:`DeepgramTTS.warm`.

Audio is ``linear16`` at :data:`SAMPLE_RATE` (the rate the player gets from the
other cloud voice, so switching voices changes nothing downstream). One socket is
kept warm per voice session: :meth:`warm` runs when the user starts speaking.
``VOICECLAW_DEEPGRAM_URL`` points it (and the listener) at another host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

from .base import (
    TTS,
    AudioClip,
    AuthError,
    CancelToken,
    FlushWindow,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    RateLimitError,
    ReplyAudio,
    ReplyEvent,
    ReplyFlushed,
    QueuedReplyStream,
    ReplyStream,
    StreamDropped,
    TTSCapabilities,
    WarmSocket,
    WarmSockets,
    error_for_status,
    one_flush_reply,
    whole_clip,
)
from .deepgram_stt import _as_dict, _client, _status_of, deepgram_url_from_env

log = logging.getLogger("voiceclaw.tts.deepgram")

SERVICE = "Deepgram speech service"
SAMPLE_RATE = 24000
DEFAULT_MODEL = "aura-2-thalia-en"
FLUSH_LIMIT = 20  # per FLUSH_WINDOW_S, per connection
FLUSH_WINDOW_S = 60.0
#: flushes a socket must have left to take a reply (the scheduler spends ~2 per reply)
REPLY_FLUSHES = 4


def map_error(exc: BaseException) -> ProviderError:
    if isinstance(exc, ProviderError):
        return exc
    status = _status_of(exc)
    if status is not None:
        return error_for_status(SERVICE, status, detail=str(getattr(exc, "body", ""))[:200])
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ProviderTimeout(f"The {SERVICE} did not answer in time.", retryable=True)
    if isinstance(exc, OSError):
        return StreamDropped(f"Could not reach the {SERVICE}: check VOICECLAW_DEEPGRAM_URL and the network.", retryable=True, detail=type(exc).__name__)
    if "ConnectionClosed" in type(exc).__name__:
        return StreamDropped(f"The connection to the {SERVICE} dropped.", retryable=True, detail=str(exc)[:200])
    return ProtocolError(f"The {SERVICE} sent something unexpected.", detail=f"{type(exc).__name__}: {exc}"[:200])


class _AuraSocket(WarmSocket):
    """One ``/v1/speak`` connection and its reader; carries one reply at a time."""

    label = "Deepgram speak socket"
    log = log  # the provider's logger (WarmSocket logs the socket's end with it)

    def __init__(self, stack: contextlib.AsyncExitStack, sock: Any):
        self._stack = stack
        self.sock = sock
        self.flushes = FlushWindow(FLUSH_LIMIT, FLUSH_WINDOW_S)
        self.reply: _AuraReply | None = None
        self.clearing = 0  # Clear sent, Cleared not yet received: audio meanwhile is stale
        self.error: ProviderError | None = None
        self._start_reader("aura-reader")

    async def _read(self) -> None:
        while True:
            msg = await self.sock.recv()
            if isinstance(msg, (bytes, bytearray)):
                if not self.clearing and self.reply is not None:
                    self.reply.audio(bytes(msg))
                continue
            m = _as_dict(msg)
            kind = m.get("type")
            if kind == "Cleared":  # parsed by the SDK as its Flushed class
                self.clearing = max(0, self.clearing - 1)
            elif kind == "Flushed":
                if not self.clearing and self.reply is not None:
                    self.reply.flushed()
            elif kind == "Warning":
                log.warning("Deepgram speak warning %s: %s", m.get("code"), str(m.get("description", ""))[:200])
                if self.reply is not None and self.reply.waiting():
                    # e.g. over the flush limit: the flush was dropped and its audio will not come
                    self.reply.fail(RateLimitError(f"The {SERVICE} refused a request: {str(m.get('description', ''))[:120]}", retryable=True))
            elif kind == "Error":
                self.error = ProtocolError(f"The {SERVICE} reported an error: {str(m.get('description', ''))[:160]}")

    def _ended_error(self, exc: Exception) -> ProviderError:
        return self.error or map_error(exc)

    async def _say_goodbye(self) -> None:
        await self.sock.send_close()

    async def _close_transport(self) -> None:
        await self._stack.aclose()


class _AuraReply(QueuedReplyStream):
    """A reply on an :class:`_AuraSocket` (see :class:`ReplyStream`)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, owner: "DeepgramTTS", socket: _AuraSocket):
        self._owner = owner
        self._socket = socket
        self.flushes = socket.flushes
        self.stall_timeout_s = owner.first_audio_timeout_s
        self._queue: asyncio.Queue = asyncio.Queue()
        self._fifo: deque[int] = deque()  # flushes sent, Flushed not yet received
        self._next = 0
        self._unflushed = False  # text sent since the last flush
        self._closed = False
        socket.reply = self

    # called by the socket's reader
    def audio(self, pcm: bytes) -> None:
        if self._fifo:
            self._queue.put_nowait(ReplyAudio(self._fifo[0], pcm))

    def flushed(self) -> None:
        if self._fifo:
            self._queue.put_nowait(ReplyFlushed(self._fifo.popleft()))

    def waiting(self) -> bool:
        return bool(self._fifo)

    def fail(self, exc: ProviderError) -> None:
        self._queue.put_nowait(exc)

    # the ReplyStream API
    async def push(self, text: str) -> None:
        from deepgram.speak.v1.types.speak_v1text import SpeakV1Text

        if not text:
            return
        try:
            await self._socket.sock.send_text(SpeakV1Text(type="Speak", text=text))
        except Exception as exc:
            raise map_error(exc) from exc
        self._unflushed = True

    async def flush(self) -> int:
        fid = self._next
        self._next += 1
        self._fifo.append(fid)
        self.flushes.used()
        try:
            await self._socket.sock.send_flush()
        except Exception as exc:
            raise map_error(exc) from exc
        self._unflushed = False
        return fid

    async def clear(self) -> None:
        if not (self._fifo or self._unflushed) or not self._socket.alive:
            return
        self._fifo.clear()
        self._unflushed = False
        self._socket.clearing += 1
        with contextlib.suppress(Exception):
            await self._socket.sock.send_clear()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._socket.reply is self:
            self._socket.reply = None
        if self._unflushed:
            await self.clear()  # text sent and never flushed would join the next reply's
        self._owner.pool.give_back(self._socket)


class DeepgramTTS(TTS):
    """Aura voices (``aura-2-thalia-en``...) through one warm speak socket per voice session."""

    name = "deepgram"
    capabilities = TTSCapabilities(streaming=True, sample_rate=SAMPLE_RATE, text_stream=True)

    def __init__(self, *, api_key: str, model: str = DEFAULT_MODEL, url: str | None = None, connect_timeout_s: float = 5.0, first_audio_timeout_s: float = 10.0):
        self._api_key = str(api_key or "")
        self.model = model or DEFAULT_MODEL
        self.url = url or deepgram_url_from_env()
        self.connect_timeout_s = connect_timeout_s
        self.first_audio_timeout_s = first_audio_timeout_s
        # a second socket serves while one whose flush window is spent rests (the limit is per connection)
        self.pool = WarmSockets(self._open_socket, max_idle=2)

    @classmethod
    def from_settings(cls, settings, keys, **kw) -> "DeepgramTTS":
        model = (settings.tts_model or "").strip()
        if not model.startswith("aura"):
            model = DEFAULT_MODEL  # e.g. the OpenAI model name left in the settings
        return cls(api_key=keys.deepgram_api_key, model=model, **kw)

    def __repr__(self) -> str:  # never show the key
        return f"DeepgramTTS(url={self.url!r}, model={self.model!r})"

    def cache_identity(self, voice: str, speed: float) -> tuple[str, str, float]:
        # the Aura model *is* the voice
        return (self.name, self.model, round(speed, 3))

    def _check_key(self) -> None:
        if not self._api_key and urlsplit(self.url if "://" in self.url else f"https://{self.url}").netloc.endswith("deepgram.com"):
            raise AuthError("No Deepgram API key is set: add it on the settings page or set DEEPGRAM_API_KEY.")

    async def _open_socket(self) -> _AuraSocket:
        self._check_key()
        stack = contextlib.AsyncExitStack()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                sock = await stack.enter_async_context(
                    _client(self._api_key, self.url).speak.v1.connect(model=self.model, encoding="linear16", sample_rate=str(SAMPLE_RATE))
                )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await stack.aclose()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_error(exc) from exc
        return _AuraSocket(stack, sock)

    @staticmethod
    def _has_flushes(sock: _AuraSocket) -> bool:
        """Enough of the flush window left for a reply (its first chunk, the rest, a margin)."""
        return sock.flushes.left() >= REPLY_FLUSHES

    async def warm(self) -> None:
        await self.pool.warm(self._has_flushes)

    async def open_reply(self, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> ReplyStream:
        sock = await self.pool.take(self._has_flushes)
        return _AuraReply(self, sock)  # type: ignore[arg-type]

    async def synthesize_stream(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AsyncIterator[AudioClip]:
        """One chunk as a one-flush reply (phrases, ``doctor``, the per-chunk fallback)."""
        async for clip in one_flush_reply(self, text, voice=voice, speed=speed, cancel=cancel, timeout_s=self.first_audio_timeout_s, service=SERVICE):
            yield clip

    async def synthesize(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        return await whole_clip(self, text, voice=voice, speed=speed, cancel=cancel, service=SERVICE)

    async def aclose(self) -> None:
        await self.pool.aclose()
