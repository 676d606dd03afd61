"""Incremental Server-Sent Events parser (the WHATWG event-stream rules).

Fed raw bytes as they come off the socket, it survives what real servers send:
comment/keep-alive lines, CRLF/CR/LF line ends (even a CRLF split across reads),
a UTF-8 character split across reads, multi-line ``data:`` fields and ``event:``
lines. Invalid UTF-8 is replaced (U+FFFD) rather than killing the turn.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass


@dataclass(frozen=True)
class SSEEvent:
    event: str  # "message" unless an ``event:`` line said otherwise
    data: str
    id: str | None = None


class SSEParser:
    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buf = ""
        self._pending_cr = False
        self._event = ""
        self._data: list[str] = []
        self._id: str | None = None
        self._first = True

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        text = self._decoder.decode(chunk)
        if self._first and text:
            text = text.removeprefix("\ufeff")
            self._first = False
        return self._consume(text)

    def close(self) -> list[SSEEvent]:
        """End of stream: a final event without its blank line is dropped, per the spec."""
        self._consume(self._decoder.decode(b"", final=True))
        return []

    def _consume(self, text: str) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        if self._pending_cr and text.startswith("\n"):
            text = text[1:]
        self._pending_cr = False
        self._buf += text
        while True:
            idx = -1
            for k, ch in enumerate(self._buf):
                if ch in "\r\n":
                    idx = k
                    break
            if idx < 0:
                break
            line = self._buf[:idx]
            sep = self._buf[idx]
            rest = self._buf[idx + 1 :]
            if sep == "\r":
                if rest.startswith("\n"):
                    rest = rest[1:]
                elif not rest:
                    self._pending_cr = True  # the \n may come in the next read
            self._buf = rest
            event = self._line(line)
            if event is not None:
                out.append(event)
        return out

    def _line(self, line: str) -> SSEEvent | None:
        if line == "":
            if not self._data and not self._event:
                return None
            event = SSEEvent(self._event or "message", "\n".join(self._data), self._id)
            self._event, self._data = "", []
            return event
        if line.startswith(":"):
            return None  # comment / keep-alive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            self._id = value
        return None
