"""OpenAI-compatible text-to-speech (``POST /v1/audio/speech``) on the ``openai`` SDK.

Works with OpenAI itself and any server speaking the same endpoint (Kokoro-FastAPI,
openedai-speech, LocalAI...) by base URL. Choices made for latency:

* ``response_format="pcm"`` (24 kHz, 16-bit, mono, no container): the fastest
  format the API offers (no encoder, nothing to parse), wrapped as WAV here for the
  browser. ``wav`` also works (its streamed header has unknown sizes; we parse it).
* The streaming response (``with_streaming_response``): bytes are read as they
  arrive, so a chunk is ready the moment its last byte lands, and :meth:`stream_pcm`
  exposes them progressively for callers that can play partial audio.
* One pooled HTTP client per event loop (keep-alive), and :meth:`warm` to open the
  connection when the user starts speaking, so the turn does not pay TCP + TLS.

The base URL and key are always passed explicitly: ``OPENAI_BASE_URL`` /
``OPENAI_API_KEY`` in the environment never redirect this client by accident (the
SDK would read them if we let it). The SDK's own retries are off; ours retry only
on 429/5xx/connection failures/drops, and only before the chunk's audio was handed
over (a chunk is handed over whole, so any failure inside it is still retryable).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import struct
import time
import weakref
from typing import AsyncIterator
from urllib.parse import urlparse

import openai

try:  # openai >= 3 runs on httpx2; older releases on httpx (same API for what we use)
    import httpx2
except ImportError:  # pragma: no cover - depends on the installed SDK generation
    import httpx as httpx2  # type: ignore[no-redef]

from .base import (
    AudioClip,
    AuthError,
    CancelToken,
    ConnectError,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    StreamDropped,
    TTS,
    TTSCapabilities,
    error_for_status,
)

log = logging.getLogger("voiceclaw.tts.openai")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
PCM_SAMPLE_RATE = 24000  # OpenAI's `pcm` format: 24 kHz, signed 16-bit little-endian, mono
DEFAULT_VOICE = "alloy"
MODELS = ("gpt-4o-mini-tts", "tts-1", "tts-1-hd")

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0  # time to first byte and between bytes
TOTAL_TIMEOUT_S = 30.0  # a whole chunk (chunks are a sentence or two), retries included
# the deadline for one attempt at one chunk, scaled to its length: a base plus ~1.2x the
# chunk's spoken duration (~65 ms per character at speed 1). A server trickling audio
# slower than ~0.8x real time never trips the per-read timeout but would stall the turn.
CHUNK_BASE_S = 4.0
CHUNK_S_PER_CHAR = 0.08
MAX_RETRIES = 2
BACKOFF_S = (0.2, 0.6)
#: a chunk's first piece is handed to the player once this much audio is here
FIRST_PIECE_MS = 300
MAX_RETRY_AFTER_S = 3.0  # honour Retry-After, but a voice reply cannot wait minutes

_pool: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple, tuple[openai.AsyncOpenAI, httpx2.AsyncClient]]]" = weakref.WeakKeyDictionary()


def tts_base_url_from_env() -> str:
    """``VOICECLAW_TTS_BASE_URL``, else OpenAI. ``OPENAI_BASE_URL`` is deliberately ignored
    (it usually points at an LLM proxy that has no speech endpoint)."""
    value = os.environ.get("VOICECLAW_TTS_BASE_URL", "").strip()
    return value or DEFAULT_BASE_URL


def _service_label(base_url: str) -> str:
    host = urlparse(base_url).netloc or base_url
    if host.endswith("openai.com"):
        return "OpenAI text-to-speech service"
    return f"text-to-speech service at {host}"


def _client_for(base_url: str, api_key: str, connect_s: float, read_s: float) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
    """The pooled SDK client for this loop and endpoint (httpx clients are loop-bound)."""
    loop = asyncio.get_running_loop()
    per_loop = _pool.setdefault(loop, {})
    key = (base_url, api_key, connect_s, read_s)
    entry = per_loop.get(key)
    if entry is None or entry[0].is_closed():
        http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=16, max_keepalive_connections=8, keepalive_expiry=60.0),
            timeout=httpx2.Timeout(read_s, connect=connect_s, write=read_s, pool=connect_s),
            trust_env=False,  # no proxy or base URL from the environment
        )
        client = openai.AsyncOpenAI(
            api_key=api_key or "not-set",
            base_url=base_url,
            max_retries=0,  # we retry ourselves, knowing what was already delivered
            timeout=httpx2.Timeout(read_s, connect=connect_s, write=read_s, pool=connect_s),
            http_client=http,
        )
        entry = per_loop[key] = (client, http)
    return entry


def _pcm_from_wav_stream(buf: bytes) -> tuple[int, int] | None:
    """(data offset, sample rate) of a WAV header, or None if more bytes are needed.

    Streamed WAVs carry 0xFFFFFFFF sizes, so :mod:`wave` cannot read them.
    """
    if len(buf) < 12:
        return None
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        raise ProtocolError("The text-to-speech service sent audio that is not WAV.")
    pos, rate = 12, PCM_SAMPLE_RATE
    while True:
        if len(buf) < pos + 8:
            return None
        cid, size = buf[pos : pos + 4], struct.unpack_from("<I", buf, pos + 4)[0]
        if cid == b"data":
            return pos + 8, rate
        if len(buf) < pos + 8 + size:
            return None
        if cid == b"fmt ":
            channels, rate, bits = struct.unpack_from("<H", buf, pos + 10)[0], struct.unpack_from("<I", buf, pos + 12)[0], struct.unpack_from("<H", buf, pos + 22)[0]
            if channels != 1 or bits != 16:
                raise ProtocolError("The text-to-speech service sent WAV audio that is not 16-bit mono.")
        pos += 8 + size + (size & 1)


class OpenAITTS(TTS):
    """``/v1/audio/speech`` client: one chunk of text in, one WAV clip out."""

    name = "openai"
    capabilities = TTSCapabilities(streaming=True, sample_rate=PCM_SAMPLE_RATE)

    def __init__(
        self,
        *,
        base_url: str | None = None,
        api_key: str = "",
        model: str = "gpt-4o-mini-tts",
        default_voice: str = DEFAULT_VOICE,
        response_format: str = "pcm",
        instructions: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        read_timeout_s: float = READ_TIMEOUT_S,
        total_timeout_s: float = TOTAL_TIMEOUT_S,
        max_retries: int = MAX_RETRIES,
        backoff_s: tuple[float, ...] = BACKOFF_S,
        chunk_base_s: float = CHUNK_BASE_S,
        chunk_s_per_char: float = CHUNK_S_PER_CHAR,
    ):
        if response_format not in ("pcm", "wav"):
            raise ValueError("response_format must be 'pcm' or 'wav' (the low-latency formats)")
        self.base_url = (base_url or tts_base_url_from_env()).rstrip("/")
        self._api_key = str(api_key or "")
        self.model = model or "gpt-4o-mini-tts"
        self.default_voice = default_voice or DEFAULT_VOICE
        self.response_format = response_format
        self.instructions = instructions
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.total_timeout_s = total_timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.chunk_base_s = chunk_base_s
        self.chunk_s_per_char = chunk_s_per_char
        self.service = _service_label(self.base_url)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAITTS(base_url={self.base_url!r}, model={self.model!r})"

    @classmethod
    def from_settings(cls, settings, keys, **overrides) -> "OpenAITTS":
        """Build from :class:`VoiceSettings` + :class:`ProviderKeys` (base URL from the env)."""
        return cls(base_url=overrides.pop("base_url", None), api_key=keys.openai_api_key, model=settings.tts_model, default_voice=settings.tts_voice or DEFAULT_VOICE, **overrides)

    def cache_identity(self, voice: str, speed: float) -> tuple[str, str, float]:
        # The model and endpoint change the sound as much as the voice does.
        return (f"openai:{self.base_url}:{self.model}", voice or self.default_voice, round(speed, 3))

    # ------------------------------------------------------------------ helpers
    def chunk_deadline_s(self, text: str, speed: float = 1.0) -> float:
        """The most one attempt at this chunk may take, all reads together."""
        return min(self.total_timeout_s, self.chunk_base_s + len(text) * self.chunk_s_per_char / max(0.25, speed or 1.0))

    def _retry_delay(self, exc: ProviderError, attempt: int, started: float, cancel: CancelToken) -> float | None:
        """How long to wait before trying the chunk again (bounded, with backoff,
        honouring a short ``Retry-After``); None when the error stands: not
        retryable, out of attempts or of the chunk's total time, or cancelled."""
        if not exc.retryable or attempt >= self.max_retries or cancel.cancelled:
            return None
        delay = self.backoff_s[min(attempt, len(self.backoff_s) - 1)] * (1 + 0.2 * random.random())
        if exc.retry_after_s is not None:
            delay = max(delay, min(exc.retry_after_s, MAX_RETRY_AFTER_S))
        if time.monotonic() - started + delay > self.total_timeout_s:
            return None
        log.info("TTS attempt %d failed (%s); retrying in %.2fs", attempt + 1, exc.kind, delay)
        return delay

    def _too_slow(self, deadline_s: float) -> ProviderTimeout:
        return ProviderTimeout(f"The {self.service} took longer than {deadline_s:.0f} s for one sentence.", retryable=True, detail="chunk deadline")

    def _client(self) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
        return _client_for(self.base_url, self._api_key, self.connect_timeout_s, self.read_timeout_s)

    def _check_key(self) -> None:
        if not self._api_key and urlparse(self.base_url).netloc.endswith("openai.com"):
            raise AuthError("No OpenAI API key is set: add it on the settings page or set OPENAI_API_KEY.")

    def _map_error(self, exc: BaseException) -> ProviderError:
        """SDK / transport exceptions -> our typed errors with plain messages."""
        if isinstance(exc, ProviderError):
            return exc
        if isinstance(exc, openai.APIStatusError):
            retry_after = None
            raw = exc.response.headers.get("retry-after") if exc.response is not None else None
            if raw:
                try:
                    retry_after = float(raw)
                except ValueError:
                    retry_after = None
            detail = ""
            body = exc.body
            if isinstance(body, dict):
                detail = str(body.get("message") or "")
            return error_for_status(self.service, exc.status_code, detail=detail, retry_after_s=retry_after)
        if isinstance(exc, (openai.APITimeoutError, httpx2.TimeoutException, TimeoutError)):
            return ProviderTimeout(f"The {self.service} did not answer in time.", detail=type(exc).__name__)
        if isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__
            if isinstance(cause, httpx2.TimeoutException):
                return ProviderTimeout(f"The {self.service} did not answer in time.", detail=type(cause).__name__)
            if isinstance(cause, httpx2.RemoteProtocolError):
                return StreamDropped(f"The connection to the {self.service} dropped.", retryable=True, detail=str(cause)[:200])
            return ConnectError(f"Could not connect to the {self.service}: check the base URL and that it is running.", retryable=True, detail=str(exc)[:200])
        if isinstance(exc, (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)):
            return StreamDropped(f"The connection to the {self.service} dropped while it was sending audio.", retryable=True, detail=type(exc).__name__)
        if isinstance(exc, httpx2.ConnectError):
            return ConnectError(f"Could not connect to the {self.service}: check the base URL and that it is running.", retryable=True, detail=str(exc)[:200])
        if isinstance(exc, httpx2.HTTPError):
            return StreamDropped(f"The {self.service} failed while sending audio.", retryable=True, detail=type(exc).__name__)
        return ProtocolError(f"The {self.service} sent something unexpected.", detail=f"{type(exc).__name__}: {exc}"[:200])

    # ------------------------------------------------------------------ API
    async def warm(self) -> None:
        """Open (or refresh) a pooled keep-alive connection: any answer leaves it warm."""
        try:
            _, http = self._client()
            resp = await http.get(f"{self.base_url}/models", headers={"Authorization": f"Bearer {self._api_key or 'not-set'}"}, timeout=httpx2.Timeout(3.0, connect=self.connect_timeout_s))
            await resp.aread()
        except Exception as exc:  # warming is best effort; the real call reports errors
            log.debug("TTS warm-up of %s failed: %s", self.base_url, type(exc).__name__)

    async def aclose(self) -> None:
        """Nothing to do: the pooled client outlives a provider instance (settings changes)."""
        return None

    async def stream_pcm(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None, meta: dict | None = None) -> AsyncIterator[bytes]:
        """Yield 16-bit mono PCM as it arrives (one attempt, no retry); raises :class:`ProviderError`.

        The sample rate is :data:`PCM_SAMPLE_RATE` for ``pcm``; for ``wav`` the header is
        stripped and its rate stored in ``meta["sample_rate"]`` (pass a dict to read it).
        """
        self._check_key()
        meta = meta if meta is not None else {}
        meta["sample_rate"] = PCM_SAMPLE_RATE
        client, _ = self._client()
        kwargs: dict = {"model": self.model, "voice": voice or self.default_voice, "input": text, "response_format": self.response_format, "speed": speed}
        if self.instructions and self.model.startswith("gpt-4o"):
            kwargs["instructions"] = self.instructions
        try:
            async with client.audio.speech.with_streaming_response.create(**kwargs) as resp:
                header_done = self.response_format == "pcm"
                buf = b""
                odd = b""
                async for piece in resp.iter_bytes():
                    if cancel is not None and cancel.cancelled:
                        return
                    if not header_done:
                        buf += piece
                        found = _pcm_from_wav_stream(buf)
                        if found is None:
                            continue
                        offset, meta["sample_rate"] = found
                        piece, header_done = buf[offset:], True
                    piece = odd + piece
                    cut = len(piece) & ~1  # keep samples whole across network reads
                    odd = piece[cut:]
                    if cut:
                        yield piece[:cut]
                if not header_done:
                    raise ProtocolError(f"The {self.service} ended the audio before its WAV header was complete.")
        except (openai.OpenAIError, httpx2.HTTPError, TimeoutError, OSError) as exc:
            raise self._map_error(exc) from exc

    async def synthesize_stream(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AsyncIterator[AudioClip]:
        """The chunk's audio as it arrives: its first :data:`FIRST_PIECE_MS` as soon as
        they are here (playback starts on them), then pieces twice as long as the one
        before, then the rest. Doubling keeps each piece ahead of playback whenever the
        service is at least ~1.5x real time, with few files per chunk.

        Transient failures are retried only until the first piece was handed over;
        after that, repeating the chunk's start would be heard, so the error stands.
        """
        cancel = cancel or CancelToken()
        attempt = 0
        started = time.monotonic()
        deadline_s = self.chunk_deadline_s(text, speed)
        while True:
            meta: dict = {}
            buf = bytearray()
            handed = False
            piece_ms = FIRST_PIECE_MS
            waited = 0.0  # time spent waiting on the server in this attempt (not on our consumer)
            source = self.stream_pcm(text, voice=voice, speed=speed, cancel=cancel, meta=meta)
            try:
                while True:
                    t0 = time.monotonic()
                    try:
                        # the timeout covers only this wait, in this task (never across the yield)
                        async with asyncio.timeout(max(0.0, deadline_s - waited)):
                            pcm = await source.__anext__()
                    except StopAsyncIteration:
                        break
                    except TimeoutError:
                        raise self._too_slow(deadline_s) from None
                    finally:
                        waited += time.monotonic() - t0
                    buf += pcm
                    rate = meta.get("sample_rate", PCM_SAMPLE_RATE)
                    if len(buf) >= 2 * rate * piece_ms // 1000:
                        piece, buf = bytes(buf), bytearray()
                        handed = True
                        piece_ms *= 2
                        yield AudioClip.from_pcm16(piece, rate)
                if cancel.cancelled:
                    return
                if not handed and not buf:
                    raise ProtocolError(f"The {self.service} returned no audio.", retryable=True)
                if buf:
                    yield AudioClip.from_pcm16(bytes(buf), meta.get("sample_rate", PCM_SAMPLE_RATE))
                return
            except ProviderError as exc:
                delay = None if handed else self._retry_delay(exc, attempt, started, cancel)
                if delay is None:
                    raise
                attempt += 1
                await asyncio.sleep(delay)
            finally:
                with contextlib.suppress(Exception):
                    await source.aclose()

    async def synthesize(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        """The chunk's whole audio as a WAV clip, retrying transient failures.

        Retries (bounded, with backoff, honouring a short ``Retry-After``) are safe here
        because nothing of this chunk has been handed to the player yet.
        """
        cancel = cancel or CancelToken()
        attempt = 0
        started = time.monotonic()
        deadline_s = self.chunk_deadline_s(text, speed)
        while True:
            meta: dict = {}
            parts: list[bytes] = []
            try:
                async with asyncio.timeout(min(deadline_s, max(0.1, self.total_timeout_s - (time.monotonic() - started)))):
                    async for pcm in self.stream_pcm(text, voice=voice, speed=speed, cancel=cancel, meta=meta):
                        parts.append(pcm)
                if cancel.cancelled:
                    raise asyncio.CancelledError("TTS chunk cancelled")
                pcm_all = b"".join(parts)
                if not pcm_all:
                    raise ProtocolError(f"The {self.service} returned no audio.", retryable=True)
                return AudioClip.from_pcm16(pcm_all, meta.get("sample_rate", PCM_SAMPLE_RATE))
            except (TimeoutError, ProviderError) as raw:
                # a too-slow attempt is retried like a 5xx (nothing of it was played)
                exc = raw if isinstance(raw, ProviderError) else self._too_slow(deadline_s)
                delay = self._retry_delay(exc, attempt, started, cancel)
                if delay is None:
                    if exc is raw:
                        raise
                    raise exc from raw
                attempt += 1
                await asyncio.sleep(delay)
