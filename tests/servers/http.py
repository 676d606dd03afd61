"""A tiny raw-asyncio HTTP/1.1 server for protocol test servers.

Raw sockets rather than a framework so tests control every byte: chunk boundaries,
split UTF-8, CRLF, a connection dropped mid-body, a server that never answers.
Keep-alive is supported so clients' connection reuse can be observed.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field, replace
from typing import Awaitable, Callable


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection_id: int

    def json(self):
        return json.loads(self.body or b"null")


class Responder:
    """What a handler writes with: a whole response, or a chunked stream."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.started = False

    async def send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + body)
        await self.writer.drain()

    async def start_chunked(self, status: int = 200, content_type: str = "text/event-stream", headers: dict[str, str] | None = None) -> None:
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Type: {content_type}", "Transfer-Encoding: chunked", "Cache-Control: no-cache"]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        await self.writer.drain()
        self.started = True

    async def chunk(self, data: bytes) -> None:
        if data:
            self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
            await self.writer.drain()

    async def end(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()

    def drop(self) -> None:
        """Close the socket abruptly, mid-response."""
        transport = self.writer.transport
        transport.abort()


Handler = Callable[[Request, Responder], Awaitable[bool]]  # returns False to close the connection

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass
class RawHTTPServer:
    handler: Handler
    host: str = "127.0.0.1"
    port: int = 0
    connections: int = 0
    requests: list[Request] = field(default_factory=list)
    _server: asyncio.AbstractServer | None = None
    _tasks: set = field(default_factory=set)

    async def start(self) -> "RawHTTPServer":
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> "RawHTTPServer":
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._tasks.add(task)
        self.connections += 1
        conn_id = self.connections
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
                req = Request(method, path, headers, body, conn_id)
                self.requests.append(req)
                keep = await self.handler(req, Responder(writer))
                if not keep or headers.get("connection", "").lower() == "close":
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


class FakeServer:
    """What the fake OpenAI-style servers share: lifecycle, URLs, per-request behaviours.

    Subclasses (dataclasses) have ``behavior`` (the default), ``queue`` (behaviours for
    the next requests, consumed first), ``_http`` and an ``async _handle(req, out)``.
    """

    async def start(self):
        self._http = await RawHTTPServer(self._handle).start()
        return self

    async def stop(self) -> None:
        if self._http:
            await self._http.stop()

    async def __aenter__(self):
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    async def refuse(self) -> None:
        """Stop listening, as a service that is down: connections are refused (and
        open ones closed) until :meth:`resume` listens on the same port again."""
        if self._http:
            await self._http.stop()

    async def resume(self) -> None:
        if self._http and self._http._server is None:
            await self._http.start()

    @property
    def base_url(self) -> str:
        assert self._http is not None
        return f"{self._http.url}/v1"

    @property
    def connections(self) -> int:
        """TCP connections accepted so far (to observe keep-alive reuse)."""
        return self._http.connections if self._http else 0

    @property
    def requests(self) -> list[Request]:
        return self._http.requests if self._http else []

    def then(self, **changes):
        """Queue a behaviour (the default one with ``changes``) for the next request."""
        self.queue.append(replace(self.behavior, **changes))
        return self

    def next_behavior(self):
        return self.queue.popleft() if self.queue else self.behavior
