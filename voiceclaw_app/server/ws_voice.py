"""``/ws/voice``: the browser's microphone stream (contract in shared/docs/contracts.md).

hello -> ready (server_time_ms), ping -> pong (clock offset), binary 16 kHz PCM16
frames -> ``Listener.push``, control messages ``ptt_start`` / ``ptt_end`` / ``stop``.
Listener events drive the dashboard through Reflex state (``app.modify_state``);
``{"type": "barge_in"}`` goes straight back on this socket so playback stops without
waiting for a state update. One active voice session per user: a new socket takes
the mic over and the previous tab is told (``{"type": "taken_over"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..db.models import new_id
from ..pipeline.preemptive import TurnStarter
from ..pipeline.timing import now_ms
from ..providers.base import EndOfTurn, InterimTranscript, ListenNotice, SpeechStarted
from ..states import services, turns

log = logging.getLogger("voiceclaw.ws")

MAX_FRAME_BYTES = 16000 * 2  # 1 s of audio: far above a 20-40 ms frame
_current: "VoiceSession | None" = None


class VoiceSession:
    def __init__(self, ws: WebSocket, token: str, mode: str):
        self.ws = ws
        self.token = token
        self.mode = mode
        self.listener: Any = None
        self._starting: asyncio.Task | None = None
        self._buffer: list[tuple[bytes, float]] = []
        self._events_task: asyncio.Task | None = None
        self.starter: TurnStarter | None = None
        self._fresh_conversation = ""
        self._send_lock = asyncio.Lock()
        self.closed = False
        self.samples = 0
        self.conversation_id = ""

    async def send(self, msg: dict) -> None:
        if self.closed:
            return
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.ws.send_text(json.dumps(msg))

    # ---- listener lifecycle ------------------------------------------
    async def _start_listener(self) -> None:
        settings = await services.load_settings()
        try:
            listener = await services.build_listener(settings)
        except Exception as exc:
            log.exception("could not start listening")
            msg = getattr(exc, "user_message", None) or f"Could not start listening: {exc}"
            await turns.notify(self.token, lambda s, c: _set_error(c, msg))
            await self.send({"type": "error", "message": msg})
            return
        self.listener = listener
        self.starter = TurnStarter(self._prepare, speculative=settings.speculative)
        self._events_task = asyncio.get_running_loop().create_task(self._consume(listener))
        buffered, self._buffer = self._buffer, []
        for pcm, t in buffered:
            await listener.push(pcm, t)

    async def ensure_listener(self) -> None:
        if self.listener is None and self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start_listener())
        if self._starting is not None and not self._starting.done():
            await asyncio.shield(self._starting)

    async def on_audio(self, pcm: bytes) -> None:
        t = now_ms()
        if len(pcm) > MAX_FRAME_BYTES or len(pcm) % 2:
            return
        self.samples += len(pcm) // 2
        if self.listener is None:
            self._buffer.append((pcm, t))
            if self._starting is None:
                self._starting = asyncio.get_running_loop().create_task(self._start_listener())
            return
        await self.listener.push(pcm, t)

    async def stop_listening(self) -> None:
        listener, self.listener = self.listener, None
        self._starting = None
        self._buffer = []
        if self._events_task is not None:
            self._events_task.cancel()
            self._events_task = None
        starter, self.starter = self.starter, None
        if starter is not None:
            with contextlib.suppress(Exception):
                await starter.aclose()
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.aclose()

    # ---- listener events -----------------------------------------------
    async def _consume(self, listener: Any) -> None:
        try:
            async for ev in listener.events():
                await self._on_listen_event(ev)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("listener failed")
            msg = getattr(exc, "user_message", None) or f"Listening failed: {exc}"
            await turns.notify(self.token, lambda s, c: _set_error(c, msg))

    async def _prepare(self) -> tuple[Any, Any]:
        """At speech start (TurnStarter): runner + request for this tab's conversation.

        A tab with no conversation yet gets its id now, so the gateway session key
        (history mode "server") is fixed before the first word is stored."""
        conv, muted = await _conversation_and_mute(self.token)
        if not conv:
            self._fresh_conversation = self._fresh_conversation or new_id()
            conv = self._fresh_conversation
        self.conversation_id = conv
        if self.starter is not None:
            self.starter.speak = not muted
        return await turns.prepare_runner(conv)

    async def _on_listen_event(self, ev: Any) -> None:
        token = self.token
        if isinstance(ev, SpeechStarted):
            if turns.speaking(token) and not turns.in_echo_guard(token):
                await self.barge_in()
        elif isinstance(ev, InterimTranscript):
            text = ev.text

            def apply(stream, chat) -> None:
                stream.user_interim = text
                if chat.status in ("idle", "listening"):
                    chat.status = "listening"

            await turns.notify(token, apply)
        elif isinstance(ev, ListenNotice):
            msg = ev.message
            await turns.notify(token, lambda s, c: setattr(c, "notice", msg))
        elif isinstance(ev, EndOfTurn) and not (ev.text or "").strip():
            await turns.notify(token, lambda s, c: setattr(s, "user_interim", ""))
        if self.starter is None:
            return
        try:
            committed = await self.starter.handle(ev)
        except Exception as exc:  # settings or provider set-up failed: say so, keep listening
            log.exception("could not start the turn")
            msg = getattr(exc, "user_message", None) or f"Could not start the turn: {exc}"
            await turns.notify(token, lambda s, c: _set_error(c, msg))
            return
        if committed is not None:
            self._fresh_conversation = ""
            turns.start_turn(token, committed.text, speak=self.starter.speak, spoken_input=True, conversation_id=self.conversation_id, early=committed.turn)

    async def barge_in(self) -> None:
        await self.send({"type": "barge_in", "server_time_ms": now_ms()})
        turns.interrupt(self.token, reason="barge_in")

    # ---- control messages --------------------------------------------
    async def on_control(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ping":
            await self.send({"type": "pong", "client_time_ms": msg.get("client_time_ms"), "server_time_ms": now_ms()})
        elif kind == "ptt_start":
            self.mode = "push_to_talk"
            if turns.active(self.token) is not None:
                await self.barge_in()
            await self.ensure_listener()
        elif kind == "ptt_end":
            if self.listener is not None:
                await self.listener.finish_utterance()
        elif kind == "stop":
            await self.stop_listening()
            turns.interrupt(self.token, reason="stop")
        elif kind == "mode" and msg.get("mode") in ("push_to_talk", "hands_free"):
            self.mode = msg["mode"]

    async def take_over(self) -> None:
        await self.send({"type": "taken_over"})
        await self.close()
        with contextlib.suppress(Exception):
            await self.ws.close(code=4001)
        await turns.notify(self.token, _mark_taken_over)

    async def close(self) -> None:
        if self.closed:
            return
        await self.stop_listening()
        self.closed = True
        if turns.VOICE_SENDERS.get(self.token) == self.send:
            turns.VOICE_SENDERS.pop(self.token, None)


def _set_error(chat, msg: str) -> None:
    chat.error = msg
    chat.status = "error"


def _mark_taken_over(stream, chat) -> None:
    chat.mic_on = False
    chat.taken_over = True
    chat.notice = "The microphone was taken over by another tab."
    if chat.status == "listening":
        chat.status = "idle"


async def _conversation_and_mute(token: str) -> tuple[str, bool]:
    try:
        async with turns._sink.states(token) as (stream, chat):
            return chat.conversation_id, bool(chat.muted)
    except Exception:
        log.exception("could not read the tab's state")
        return "", False


def _valid_token(token: Any) -> bool:
    return isinstance(token, str) and 8 <= len(token) <= 128 and all(c.isalnum() or c in "-_" for c in token)


async def ws_voice(websocket: WebSocket) -> None:
    global _current
    await websocket.accept()
    try:
        hello = json.loads(await asyncio.wait_for(websocket.receive_text(), timeout=10))
    except Exception:
        await websocket.close(code=4000)
        return
    if not isinstance(hello, dict) or hello.get("type") != "hello" or not _valid_token(hello.get("client_token")):
        await websocket.send_text(json.dumps({"type": "error", "message": "bad hello"}))
        await websocket.close(code=4000)
        return
    access = os.environ.get("VOICECLAW_ACCESS_TOKEN", "")
    if access and hello.get("access_token") != access:
        await websocket.send_text(json.dumps({"type": "error", "message": "not logged in"}))
        await websocket.close(code=4003)
        return
    if int(hello.get("sample_rate") or 16000) != 16000:
        await websocket.send_text(json.dumps({"type": "error", "message": "send 16 kHz PCM"}))
        await websocket.close(code=4000)
        return
    session = VoiceSession(websocket, hello["client_token"], hello.get("mode") or "hands_free")
    previous, _current = _current, session
    if previous is not None and not previous.closed:
        await previous.take_over()
    turns.VOICE_SENDERS[session.token] = session.send
    await session.send({"type": "ready", "server_time_ms": now_ms()})
    try:
        while True:
            msg = await websocket.receive()
            if msg.get("type") == "websocket.disconnect":
                break
            data = msg.get("bytes")
            if data is not None:
                await session.on_audio(data)
                continue
            text = msg.get("text")
            if text:
                try:
                    ctl = json.loads(text)
                except ValueError:
                    continue
                if isinstance(ctl, dict):
                    await session.on_control(ctl)
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        await session.close()
        if _current is session:
            _current = None
