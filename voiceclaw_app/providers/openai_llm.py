"""Streaming client for any OpenAI-compatible ``POST /v1/chat/completions``.

Targets: the user's OpenClaw/Clawdbot gateway (``openclaw:<agentId>`` models, Bearer
token, ``x-openclaw-*`` headers, ``user`` for server-side sessions), OpenAI, Ollama,
llama.cpp's server, vLLM.

Why hand-rolled SSE over httpx instead of the SDK: the gateway ends some streams
with an SSE ``error`` event *after* text (which must keep the text, not raise), and
we need byte-level control over keep-alives, first-token deadlines and which
failures may be retried (only before the first token).

One pooled ``httpx.AsyncClient`` per event loop, with keep-alive; :meth:`warm`
re-opens the connection when the user starts speaking, since servers close idle
connections after a few seconds and a turn should not pay for TCP/TLS.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from typing import Any, AsyncIterator

import httpx

from .base import (
    LLM,
    CancelToken,
    ConnectError,
    LLMCapabilities,
    LLMRequest,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    StreamDropped,
    error_for_status,
)
from .sse import SSEParser

log = logging.getLogger("voiceclaw.llm")

CONNECT_TIMEOUT_S = 5.0
MAX_RETRIES = 2
BACKOFF_S = (0.25, 0.8)
MAX_ERROR_BODY = 4096

_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, httpx.AsyncClient]" = weakref.WeakKeyDictionary()


def shared_client() -> httpx.AsyncClient:
    """The process's pooled client for this event loop (httpx clients are loop-bound)."""
    loop = asyncio.get_running_loop()
    client = _clients.get(loop)
    if client is None or client.is_closed:
        client = httpx.AsyncClient(
            limits=httpx.Limits(max_connections=32, max_keepalive_connections=8, keepalive_expiry=60.0),
            timeout=httpx.Timeout(30.0, connect=CONNECT_TIMEOUT_S),
            trust_env=False,  # proxies/base URLs from the env must not redirect us by accident
        )
        _clients[loop] = client
    return client


def service_name(base_url: str, model: str) -> str:
    from ..config import is_gateway_model

    return "LLM gateway" if is_gateway_model(model) else "LLM server"


async def _sleep_unless_cancelled(delay: float, cancel: CancelToken) -> bool:
    """Sleep ``delay`` seconds, waking early when ``cancel`` is set (from any thread);
    True when cancelled."""
    try:
        await asyncio.wait_for(cancel.wait(), delay)
    except asyncio.TimeoutError:
        return False
    return True


class OpenAICompatLLM(LLM):
    """Streams chat completions as text deltas, with typed errors and bounded retries."""

    name = "openai-compatible"

    def __init__(self, base_url: str, api_key: str = "", headers: dict[str, str] | None = None, *, max_retries: int = MAX_RETRIES):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.headers = dict(headers or {})
        self.max_retries = max_retries
        self.capabilities = LLMCapabilities(streaming=True)

    # ------------------------------------------------------------- requests
    def _headers(self, request: LLMRequest) -> dict[str, str]:
        h = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        h.update(self.headers)
        h.update(request.headers)
        if self._api_key:
            h["Authorization"] = f"Bearer {self._api_key}"
        return h

    @staticmethod
    def body(request: LLMRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
        }
        if request.user:
            body["user"] = request.user
        if request.max_tokens is not None:
            body["max_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        return body

    async def warm(self) -> None:
        """Open (or refresh) a pooled connection: any answer, even 404, leaves it warm."""
        try:
            resp = await shared_client().get(f"{self.base_url}/models", headers=self._headers(LLMRequest(messages=[])), timeout=httpx.Timeout(3.0, connect=CONNECT_TIMEOUT_S))
            await resp.aclose()
        except httpx.HTTPError as exc:
            log.debug("warm-up of %s failed: %s", self.base_url, type(exc).__name__)

    async def aclose(self) -> None:
        return None  # the pooled client outlives a provider instance

    # ------------------------------------------------------------- streaming
    async def stream(self, request: LLMRequest, cancel: CancelToken) -> AsyncIterator[str]:
        service = service_name(self.base_url, request.model)
        attempt = 0
        while True:
            produced = False
            try:
                async for delta in self._stream_once(request, service):
                    if cancel.cancelled:
                        return
                    produced = True
                    yield delta
                return
            except ProviderError as exc:
                if produced or not exc.retryable or attempt >= self.max_retries or cancel.cancelled:
                    raise
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                if exc.retry_after_s is not None:
                    delay = min(max(delay, exc.retry_after_s), 5.0)
                log.info("LLM attempt %d failed (%s); retrying in %.2fs", attempt + 1, exc.kind, delay)
                attempt += 1
                if await _sleep_unless_cancelled(delay, cancel):
                    return

    async def _stream_once(self, request: LLMRequest, service: str) -> AsyncIterator[str]:
        url = f"{self.base_url}/chat/completions"
        timeout = httpx.Timeout(connect=CONNECT_TIMEOUT_S, read=request.read_timeout_s, write=10.0, pool=CONNECT_TIMEOUT_S)
        started = time.monotonic()
        produced = False
        try:
            async with shared_client().stream("POST", url, json=self.body(request), headers=self._headers(request), timeout=timeout) as resp:
                if resp.status_code != 200:
                    raise await self._status_error(resp, service)
                parser = SSEParser()
                done = False
                reader = self._read_with_deadline(resp, request.read_timeout_s, started, lambda: produced)
                async for raw in reader:
                    for event in parser.feed(raw):
                        for delta in self._handle_event(event, service, produced):
                            if delta is None:
                                done = True
                                break
                            produced = True
                            yield delta
                        if done:
                            break
                    if done:
                        break
                if done:
                    await self._drain(reader)
                else:
                    parser.close()
                    if not produced:
                        raise StreamDropped(f"The {service} closed the stream before answering.", retryable=True)
        except ProviderError:
            raise
        except httpx.ConnectTimeout:
            raise ConnectError(f"Could not connect to the {service} at {self.base_url} (timed out).", retryable=True) from None
        except httpx.ConnectError:
            raise ConnectError(f"Could not connect to the {service} at {self.base_url}: is it running?", retryable=True) from None
        except httpx.ReadTimeout:
            raise ProviderTimeout(f"The {service} stopped answering (no data for {request.read_timeout_s:.0f} s).") from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise StreamDropped(f"The connection to the {service} dropped mid-reply.", retryable=not produced, detail=type(exc).__name__) from None
        except httpx.HTTPError as exc:
            raise ProtocolError(f"The {service} request failed ({type(exc).__name__}).", retryable=not produced) from None

    @staticmethod
    async def _read_with_deadline(resp: httpx.Response, read_timeout_s: float, started: float, produced) -> AsyncIterator[bytes]:
        """Raw bytes, with an overall first-token deadline: keep-alive comments keep
        httpx's per-read timeout happy but must not let a turn wait forever."""
        it = resp.aiter_raw().__aiter__()
        while True:
            if produced():
                remaining = read_timeout_s
            else:
                remaining = read_timeout_s - (time.monotonic() - started)
                if remaining <= 0:
                    raise httpx.ReadTimeout("no token before the deadline")
            try:
                chunk = await asyncio.wait_for(it.__anext__(), timeout=remaining)
            except StopAsyncIteration:
                return
            except asyncio.TimeoutError:
                raise httpx.ReadTimeout("no data") from None
            yield chunk

    @staticmethod
    async def _drain(reader: AsyncIterator[bytes], limit_s: float = 0.5) -> None:
        """Read the response's end after ``[DONE]`` so the connection goes back to the
        pool (an unfinished response is closed, and the next turn pays for a new one)."""
        async def rest() -> None:
            async for _ in reader:
                pass

        try:
            await asyncio.wait_for(rest(), timeout=limit_s)
        except (asyncio.TimeoutError, httpx.HTTPError):
            pass

    @staticmethod
    async def _status_error(resp: httpx.Response, service: str) -> ProviderError:
        detail = ""
        try:
            body = (await resp.aread())[:MAX_ERROR_BODY].decode("utf-8", "replace")
            try:
                err = json.loads(body).get("error")
                detail = err.get("message", "") if isinstance(err, dict) else str(err or "")
            except (ValueError, AttributeError):
                detail = body.strip()[:200]
        except httpx.HTTPError:
            pass
        retry_after = None
        ra = resp.headers.get("retry-after")
        if ra:
            try:
                retry_after = float(ra)
            except ValueError:
                retry_after = None
        return error_for_status(service, resp.status_code, detail, retry_after)

    @staticmethod
    def _handle_event(event, service: str, produced: bool):
        """Yield text deltas; ``None`` means the stream is complete."""
        data = event.data.strip()
        if event.event == "error" or (data.startswith("{") and '"error"' in data and '"choices"' not in data):
            message = data
            try:
                err = json.loads(data).get("error", data)
                message = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            except (ValueError, AttributeError):
                pass
            if produced and event.event == "error":
                # the OpenClaw gateway's trailing SSE `error` event ("cannot be
                # represented as an append-only response stream"): what was streamed
                # stands; end normally, speak no error.
                log.warning("%s ended the stream with an error event after text: %s", service, message[:300])
                yield None
                return
            if produced:
                # an {"error": ...} object mid-reply (OpenAI, vLLM, Ollama): the reply is
                # cut short; the turn ends with an error and keeps what was said
                raise ProtocolError(f"The {service} failed mid-reply: {message[:200]}", detail=message)
            raise ProtocolError(f"The {service} reported an error: {message[:200]}", detail=message)
        if event.event not in ("message", "") and event.event != "error":
            return  # other named events carry nothing we speak
        if not data:
            return
        if data == "[DONE]":
            yield None
            return
        try:
            payload = json.loads(data)
        except ValueError:
            log.warning("%s sent a malformed SSE data line (ignored): %r", service, data[:120])
            return
        if not isinstance(payload, dict):
            return
        for choice in payload.get("choices") or []:
            if not isinstance(choice, dict):
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str) and content:
                yield content
