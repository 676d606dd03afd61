"""``/ws/voice``: a tab's live loop (contract in shared/docs/contracts.md).

hello (client token, mode, conversation id, mute) -> ready; ping -> pong (clock
offset); binary 16 kHz PCM16 frames and JSON control messages go to the tab's
:class:`~voiceclaw_app.session.VoiceSession` (held by the app's
:class:`~.hub.SessionHub`); the session's playback commands, errors and takeover
notices come back. Everything a turn needs travels here; Reflex state only shows it.

Bad input never drops the socket: oversized or deeply nested control messages,
text that is not JSON, frames that are not PCM16 or too large each get an error
message (at most one per kind every few seconds) and the socket stays.

``authenticate(headers, client_host) -> user | None`` and ``origin_allowed(headers)``
are injected by the app (``server/auth.py``: the login cookie and the app's own
origins); a socket without a logged-in user or from a foreign origin is refused before
anything else is read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Awaitable, Callable, Mapping

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..pipeline.timing import now_ms
from ..session.session import MAX_FRAME_BYTES, MAX_TYPED_CHARS
from .hub import Connection, SessionHub

log = logging.getLogger("voiceclaw.ws")

#: control messages above this size are refused (a typed message fits many times over)
MAX_CONTROL_BYTES = 64 * 1024
#: control messages nested deeper than this are refused (json would recurse 50,000 deep)
MAX_JSON_DEPTH = 16
HELLO_TIMEOUT_S = 10.0
#: the same kind of refusal is said at most once per this many ms
REFUSAL_EVERY_MS = 5000.0


Authenticate = Callable[[Mapping[str, str], "str | None"], Awaitable[Any]]


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Nesting of ``[``/``{`` outside strings stays within ``limit`` (checked before parsing)."""
    depth = 0
    in_str = esc = False
    for ch in text:
        if in_str:
            if esc:
                esc = False
            elif ch == "\\":
                esc = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def parse_control(text: str) -> tuple[dict | None, str, str]:
    """(message, "", "") or (None, error code, a message a person understands)."""
    size = len(text.encode("utf-8", "replace"))
    if size > MAX_CONTROL_BYTES:
        return None, "too_large", f"That message is too large ({size:,} bytes; at most {MAX_CONTROL_BYTES:,}): typed messages can be at most {MAX_TYPED_CHARS:,} characters."
    if not json_depth_ok(text):
        return None, "too_deep", f"A control message nested deeper than {MAX_JSON_DEPTH} levels was refused."
    try:
        msg = json.loads(text)
    except (ValueError, RecursionError):
        return None, "bad_json", "A control message that is not JSON was ignored."
    if not isinstance(msg, dict):
        return None, "bad_json", "A control message must be a JSON object; it was ignored."
    return msg, "", ""


def _valid_token(token: Any) -> bool:
    return isinstance(token, str) and 8 <= len(token) <= 128 and all(c.isalnum() or c in "-_" for c in token)


def _sample_rate_ok(value: Any) -> bool:
    """The hello's ``sample_rate``: absent means 16000; anything else must be the number 16000."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        rate = float(value)
    except (TypeError, ValueError):
        return False
    return math.isfinite(rate) and rate == 16000


class _Refusals:
    """At most one refusal of each kind every few seconds (a flood of bad frames stays quiet)."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def due(self, code: str) -> bool:
        t = now_ms()
        if t - self._last.get(code, -1e12) < REFUSAL_EVERY_MS:
            return False
        self._last[code] = t
        return True


def make_ws_voice(hub: SessionHub, *, authenticate: Authenticate, origin_allowed: Callable[[Mapping[str, str]], bool]) -> Callable[[WebSocket], Awaitable[None]]:
    """The ``/ws/voice`` endpoint over ``hub`` (the app builds it once)."""

    async def ws_voice(websocket: WebSocket) -> None:
        await websocket.accept()

        async def send(msg: dict) -> None:
            await websocket.send_text(json.dumps(msg))

        headers = dict(websocket.headers)
        if not origin_allowed(headers):
            await send({"type": "error", "code": "origin", "message": "This page's origin may not use the microphone socket."})
            await websocket.close(code=4003)
            return
        user = await authenticate(headers, websocket.client.host if websocket.client else None)
        if user is None:
            await send({"type": "error", "code": "login", "message": "Log in to use the microphone."})
            await websocket.close(code=4003)
            return
        try:
            raw = await asyncio.wait_for(websocket.receive_text(), timeout=HELLO_TIMEOUT_S)
        except Exception:
            await _close_quietly(websocket, send, "No hello came: the socket was closed.")
            return
        hello, _, problem = parse_control(raw)
        if hello is None or hello.get("type") != "hello" or not _valid_token(hello.get("client_token")):
            await _close_quietly(websocket, send, problem or "bad hello")
            return
        if not _sample_rate_ok(hello.get("sample_rate")):
            await _close_quietly(websocket, send, "send 16 kHz PCM")
            return
        conv = hello.get("conversation_id")
        conn = Connection(send, lambda code: websocket.close(code=code))
        session = await hub.connect(
            user.id,
            hello["client_token"],
            conn,
            mode=hello.get("mode") if hello.get("mode") in ("push_to_talk", "hands_free") else "hands_free",
            conversation_id=conv if isinstance(conv, str) else "",
            muted=hello.get("muted") is True,
        )
        refusals = _Refusals()
        await send({"type": "ready", "server_time_ms": now_ms()})
        try:
            while True:
                msg = await websocket.receive()
                if msg.get("type") == "websocket.disconnect":
                    break
                data = msg.get("bytes")
                if data is not None:
                    if (not data or len(data) > MAX_FRAME_BYTES or len(data) % 2) and refusals.due("bad_frame"):
                        await session.refuse(f"An audio frame of {len(data):,} bytes was dropped: send 16 kHz mono PCM16 frames of at most {MAX_FRAME_BYTES:,} bytes.", "bad_frame")
                    await session.push_audio(data)
                    continue
                text = msg.get("text")
                if text is None:
                    continue
                ctl, code, problem = parse_control(text)
                if ctl is None:
                    if refusals.due(code):
                        await session.refuse(problem, code)
                    continue
                if ctl.get("type") == "ping":
                    await send({"type": "pong", "client_time_ms": ctl.get("client_time_ms"), "server_time_ms": now_ms()})
                else:
                    await session.on_control(ctl)
        except (WebSocketDisconnect, RuntimeError):
            pass
        finally:
            conn.closed = True
            await hub.disconnect(session, conn)

    return ws_voice


async def _close_quietly(websocket: WebSocket, send: Callable[[dict], Awaitable[None]], message: str) -> None:
    try:
        await send({"type": "error", "message": message})
        await websocket.close(code=4000)
    except Exception:
        pass
