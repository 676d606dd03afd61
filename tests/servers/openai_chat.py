"""A local server speaking OpenAI's chat-completions SSE protocol, with faults.

Latency profile (time to first token, tokens per second) and fault injection
(status codes, malformed lines, mid-stream drop, stall, the OpenClaw gateway's
trailing ``error`` event, keep-alive comments, CRLF, UTF-8 split across writes,
multi-line ``data:``...) are set per server, or per request with a queue of
:class:`ChatBehavior` so "fail twice, then answer" can be tested.

Used by the tests and by ``python -m voiceclaw_app.bench pipeline``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from .http import FakeServer, RawHTTPServer, Request, Responder

GATEWAY_MODEL_RE = re.compile(r"^(openclaw|openclaw[:/].+|agent:.+)$")


@dataclass
class ChatBehavior:
    reply: str | None = None  # None: the server's reply function decides
    ttft_s: float = 0.3
    tokens_per_s: float = 40.0
    status: int = 200
    error_body: str | None = None
    retry_after: str | None = None
    drop_after_tokens: int | None = None  # close the socket mid-stream
    stall_after_tokens: int | None = None  # stop sending, keep the socket open
    stall_before_headers: bool = False
    error_event_after_tokens: int | None = None  # gateway-style SSE `error` event
    error_object_after_tokens: int | None = None  # OpenAI-style {"error":...} data line
    malformed_line_after_tokens: int | None = None
    keepalive_every_s: float | None = None  # ": keep-alive" comments while waiting
    crlf: bool = False
    split_bytes: bool = False  # write each event in 1-3 byte pieces (splits UTF-8)
    multiline_data: bool = False  # pretty-printed JSON over several data: lines
    event_lines: bool = False  # "event: message" before each data line
    role_first: bool = True
    empty_deltas: bool = False
    usage_chunk: bool = True
    done: bool = True
    raw_bytes_after_tokens: tuple[int, bytes] | None = None  # inject raw bytes (e.g. invalid UTF-8)


def tokenize(text: str) -> list[str]:
    """Roughly one token per word, leading space attached, as LLMs stream."""
    return re.findall(r"\s*\S+|\s+$", text) or ([text] if text else [])


def default_reply(messages: list[dict]) -> str:
    last = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
    return f"You said: {last.strip()[:200]}. That is a fine question, and here is a short answer for you. Anything else?"


@dataclass
class FakeChatServer(FakeServer):
    """``/v1/chat/completions`` (SSE) and ``/v1/models``; ``await start()`` then ``base_url``."""

    behavior: ChatBehavior = field(default_factory=ChatBehavior)
    reply_fn: Callable[[list[dict]], str] = default_reply
    api_key: str | None = None
    gateway: bool = False  # enforce the OpenClaw gateway's model-name rule
    queue: deque = field(default_factory=deque)  # per-request behaviours, consumed first
    bodies: list[dict] = field(default_factory=list)
    first_token_at: list[float] = field(default_factory=list)  # monotonic s, per request
    _http: RawHTTPServer | None = None


    # ------------------------------------------------------------------
    async def _handle(self, req: Request, out: Responder) -> bool:
        if req.method == "GET" and req.path.rstrip("/").endswith("/models"):
            if not self._authorized(req):
                await out.send(401, b'{"error":{"message":"Unauthorized","type":"unauthorized"}}')
                return True
            await out.send(200, json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode())
            return True
        if req.method != "POST" or not req.path.rstrip("/").endswith("/chat/completions"):
            await out.send(404, b'{"error":{"message":"Not found"}}')
            return True
        b = self.next_behavior()
        if b.stall_before_headers:
            await asyncio.sleep(3600)
        if not self._authorized(req):
            await out.send(401, b'{"error":{"message":"Unauthorized","type":"unauthorized"}}')
            return True
        try:
            body = req.json()
        except ValueError:
            await out.send(400, b'{"error":{"message":"invalid JSON"}}')
            return True
        self.bodies.append(body)
        if self.gateway and not GATEWAY_MODEL_RE.match(str(body.get("model", ""))):
            await out.send(400, json.dumps({"error": {"message": f"Invalid model {body.get('model')!r}", "type": "invalid_request_error"}}).encode())
            return True
        if b.status != 200:
            extra = {"Retry-After": b.retry_after} if b.retry_after else None
            err = b.error_body if b.error_body is not None else json.dumps({"error": {"message": f"fault {b.status}", "type": "server_error"}})
            await out.send(b.status, err.encode(), headers=extra)
            return True
        reply = b.reply if b.reply is not None else self.reply_fn(body.get("messages") or [])
        return await self._stream(b, reply, out)

    def _authorized(self, req: Request) -> bool:
        return self.api_key is None or req.headers.get("authorization") == f"Bearer {self.api_key}"

    async def _stream(self, b: ChatBehavior, reply: str, out: Responder) -> bool:
        nl = "\r\n" if b.crlf else "\n"
        await out.start_chunked()

        async def write(text: str | bytes) -> None:
            data = text.encode() if isinstance(text, str) else text
            if b.split_bytes:
                for k in range(0, len(data), 2):
                    await out.chunk(data[k : k + 2])
            else:
                await out.chunk(data)

        def event(payload: dict) -> str:
            if b.multiline_data:
                lines = json.dumps(payload, indent=1, ensure_ascii=False).split("\n")
                data = nl.join(f"data: {ln}" for ln in lines)
            else:
                data = "data: " + json.dumps(payload, ensure_ascii=False)
            prefix = f"event: message{nl}" if b.event_lines else ""
            return f"{prefix}{data}{nl}{nl}"

        base = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": int(time.time()), "model": "fake"}
        if b.role_first:
            await write(event({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]}))
        # wait for the first token, with keep-alive comments if asked
        deadline = time.monotonic() + b.ttft_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            step = min(left, b.keepalive_every_s or left)
            await asyncio.sleep(step)
            if b.keepalive_every_s and deadline - time.monotonic() > 0:
                await write(f": keep-alive{nl}{nl}")
        tokens = tokenize(reply)
        interval = 1.0 / b.tokens_per_s if b.tokens_per_s > 0 else 0.0
        next_at = time.monotonic()
        for n, tok in enumerate(tokens):
            if b.drop_after_tokens is not None and n >= b.drop_after_tokens:
                out.drop()
                return False
            if b.stall_after_tokens is not None and n >= b.stall_after_tokens:
                await asyncio.sleep(3600)
            if b.error_event_after_tokens is not None and n >= b.error_event_after_tokens:
                msg = {"error": {"message": "Response cannot be represented as an append-only response stream", "type": "server_error"}}
                await write(f"event: error{nl}data: {json.dumps(msg)}{nl}{nl}")
                await out.end()
                return True
            if b.error_object_after_tokens is not None and n >= b.error_object_after_tokens:
                await write("data: " + json.dumps({"error": {"message": "upstream failed", "type": "server_error"}}) + nl + nl)
                await out.end()
                return True
            if b.malformed_line_after_tokens is not None and n == b.malformed_line_after_tokens:
                await write(f"data: {{not json{nl}{nl}")
            if b.raw_bytes_after_tokens is not None and n == b.raw_bytes_after_tokens[0]:
                await write(b"data: " + json.dumps({**base, "choices": [{"index": 0, "delta": {"content": "@@"}}]}).encode().replace(b"@@", b.raw_bytes_after_tokens[1]) + nl.encode() * 2)
            if n == 0:
                self.first_token_at.append(time.monotonic())
            if b.empty_deltas:
                await write(event({**base, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": None}]}))
            await write(event({**base, "choices": [{"index": 0, "delta": {"content": tok}, "finish_reason": None}]}))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0 and n + 1 < len(tokens):
                await asyncio.sleep(delay)
        await write(event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
        if b.usage_chunk:
            await write(event({**base, "choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens), "total_tokens": 10 + len(tokens)}}))
        if b.done:
            await write(f"data: [DONE]{nl}{nl}")
        await out.end()
        return True
