"""``/ws/voice``: the browser's microphone stream (contract in shared/docs/contracts.md).

hello -> ready (server_time_ms), ping -> pong (clock offset), binary 16 kHz PCM16
frames -> ``Listener.push``, control messages ``ptt_start`` / ``ptt_end`` / ``stop`` / ``mode`` / ``barge_in``
(the voice button pressed while the assistant speaks).
Listener events drive the dashboard through Reflex state (``app.modify_state``);
playback control goes straight back on this socket so it acts without waiting for a
state update: ``{"type": "pause"}`` on a tentative voice onset while the assistant
speaks (a cough may follow: the turn is not cancelled), ``{"type": "resume"}`` when
that onset is discarded, ``{"type": "barge_in"}`` when speech is confirmed (the turn
is cancelled). The upgrade needs a logged-in user (session cookie) and the app's own
Origin (``server/auth.py``). One active voice session per user: a new socket takes
the mic over and the previous tab is told (``{"type": "taken_over"}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect

from ..db.models import new_id
from ..pipeline.preemptive import TurnStarter
from ..pipeline.timing import now_ms
from ..providers.base import EndOfTurn, InterimTranscript, ListenNotice, ProviderError, SpeechDiscarded, SpeechStarted
from ..states import services, turns
from ..states.chat import apply_audio_report
from .auth import AuthUser, authenticate, origin_allowed

log = logging.getLogger("voiceclaw.ws")

MAX_FRAME_BYTES = 16000 * 2  # 1 s of audio: far above a 20-40 ms frame
MAX_BUFFERED_FRAMES = 250  # ~5-10 s of audio held while the listener starts
#: after a listener failure, frames are dropped this long before listening is retried
RETRY_AFTER_FAILURE_MS = 5000.0
#: a pause with neither a confirmation nor a discard after this long resumes playback
PAUSE_TIMEOUT_S = 2.0
LOGIN_REFUSED = "Not logged in (or the session ended): reload the page and log in."
_current: "VoiceSession | None" = None


class VoiceSession:
    def __init__(self, ws: WebSocket, token: str, mode: str, user: AuthUser):
        self.ws = ws
        self.token = token
        self.user = user
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
        #: a tentative onset paused playback; a confirmation barges in, a discard resumes
        self.paused = False
        self._pause_timer: asyncio.TimerHandle | None = None
        self._failed_at: float | None = None
        self._draining = False  # buffered frames are being replayed into a new listener

    async def send(self, msg: dict) -> None:
        if self.closed:
            return
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.ws.send_text(json.dumps(msg))

    # ---- listener lifecycle ------------------------------------------
    async def _start_listener(self) -> None:
        try:
            settings = await services.load_settings(self.user.id)
            listener = await services.build_listener(settings)
        except Exception as exc:
            log.exception("could not start listening")
            await self._listening_failed(exc, "Could not start listening")
            return
        if self.closed or self._starting is not asyncio.current_task():
            # the session closed, or listening was stopped, while this one was built
            with contextlib.suppress(Exception):
                await listener.aclose()
            return
        self.listener = listener
        self.apply_mode()
        self.starter = TurnStarter(self._prepare, speculative=settings.speculative)
        self._events_task = asyncio.get_running_loop().create_task(self._consume(listener))
        # Replay what was said while the listener started (the user's first words), in
        # order: each push may wait (the VAD runs off the loop), so live frames keep
        # going to the buffer until it is empty.
        self._draining = True
        try:
            while self._buffer and self.listener is listener:
                pcm, t = self._buffer.pop(0)
                if not await self._push(listener, pcm, t):
                    return
        finally:
            self._draining = False

    def apply_mode(self) -> None:
        """Tell the listener the input mode (hands-free ends turns itself; push-to-talk waits for ptt_end)."""
        if self.listener is None:
            return
        try:
            self.listener.set_hands_free(self.mode == "hands_free")
        except Exception:
            log.exception("the listener refused the input mode")

    def set_mode(self, mode: str) -> None:
        if mode in ("push_to_talk", "hands_free"):
            self.mode = mode
            self.apply_mode()

    async def _push(self, listener: Any, pcm: bytes, t: float) -> bool:
        """Feed a frame; a provider failure is reported once and listening stops (retried later)."""
        try:
            await listener.push(pcm, t)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("the listener failed on a frame")
            await self._listening_failed(exc, "Listening failed")
            return False

    async def _listening_failed(self, exc: BaseException, what: str) -> None:
        msg = exc.user_message if isinstance(exc, ProviderError) else (getattr(exc, "user_message", None) or f"{what}: {exc}")
        self._failed_at = now_ms()
        await self.stop_listening()
        await turns.notify(self.token, lambda s, c: _set_error(c, msg))
        await self.send({"type": "error", "message": msg})

    async def ensure_listener(self) -> None:
        if self.listener is None and self._starting is None:
            self._starting = asyncio.get_running_loop().create_task(self._start_listener())
        task = self._starting
        if task is not None and not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # this handler itself is being cancelled
                # else: listening was stopped (or the tab taken over) while it started

    async def on_audio(self, pcm: bytes) -> None:
        t = now_ms()
        if len(pcm) > MAX_FRAME_BYTES or len(pcm) % 2:
            return
        self.samples += len(pcm) // 2
        if self.listener is None or self._draining:
            if self._failed_at is not None and t - self._failed_at < RETRY_AFTER_FAILURE_MS:
                return  # the failure was reported; do not rebuild the listener 50 times a second
            if len(self._buffer) < MAX_BUFFERED_FRAMES:
                self._buffer.append((pcm, t))
            if self._starting is None and self.listener is None:
                self._failed_at = None
                self._starting = asyncio.get_running_loop().create_task(self._start_listener())
            return
        await self._push(self.listener, pcm, t)

    async def stop_listening(self) -> None:
        await self.clear_pause(resume=True)
        listener, self.listener = self.listener, None
        starting, self._starting = self._starting, None
        if starting is not None and starting is not asyncio.current_task() and not starting.done():
            starting.cancel()  # a listener still being built must not come back after Stop
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
            if self.listener is listener and not self.closed:
                # the listener ended by itself (e.g. a cloud session that failed with
                # fallback off): forget it, so the next voiced frame builds a new one
                self._events_task = None
                await self.stop_listening()
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
        await turns.settled(self.token)  # an interrupted reply is stored (cut) before history is read
        conv, muted = await _conversation_and_mute(self.token)
        if not conv:
            self._fresh_conversation = self._fresh_conversation or new_id()
            conv = self._fresh_conversation
        self.conversation_id = conv
        if self.starter is not None:
            self.starter.speak = not muted
        return await turns.prepare_runner(self.user.id, conv)

    async def _on_listen_event(self, ev: Any) -> None:
        token = self.token
        if isinstance(ev, SpeechStarted):
            if ev.tentative:
                # a voice onset that may still be a cough: pause playback at once, keep the turn
                # (the turn starter still sees it: it starts preparing the request now)
                if not self.paused and turns.speaking(token) and not turns.in_echo_guard(token):
                    await self.pause()
            elif self.paused or (turns.speaking(token) and not turns.in_echo_guard(token)):
                await self.barge_in()
        elif isinstance(ev, SpeechDiscarded):
            was_replying = self.paused or turns.speaking(token)
            if self.paused:
                await self.clear_pause(resume=True)
            if not was_replying:
                return  # a cough in silence: the request prepared at its onset is still right
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
            turns.start_turn(token, committed.text, speak=self.starter.speak, spoken_input=True, conversation_id=self.conversation_id, early=committed.turn, user_id=self.user.id)

    async def pause(self) -> None:
        self.paused = True
        await self.send({"type": "pause", "server_time_ms": now_ms()})
        if self._pause_timer is not None:
            self._pause_timer.cancel()
        loop = asyncio.get_running_loop()
        self._pause_timer = loop.call_later(PAUSE_TIMEOUT_S, lambda: loop.create_task(self.clear_pause(resume=True)))

    async def clear_pause(self, *, resume: bool) -> None:
        """End a pause: resume playback (discarded onset) or just forget it (barge-in)."""
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
        if not self.paused:
            return
        self.paused = False
        if resume:
            await self.send({"type": "resume", "server_time_ms": now_ms()})

    async def barge_in(self) -> None:
        await self.clear_pause(resume=False)
        await self.send({"type": "barge_in", "server_time_ms": now_ms()})
        if turns.interrupt(self.token, reason="barge_in") and self.starter is not None:
            # the request prepared at the onset lacks the interrupted reply: prepare
            # again (``_prepare`` waits until the cut reply is stored)
            self.starter.invalidate()

    # ---- control messages --------------------------------------------
    async def on_control(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ping":
            await self.send({"type": "pong", "client_time_ms": msg.get("client_time_ms"), "server_time_ms": now_ms()})
        elif kind == "ptt_start":
            self.set_mode("push_to_talk")
            self._failed_at = None
            if turns.speaking(self.token):
                await self.barge_in()
            await self.ensure_listener()
        elif kind == "ptt_end":
            if self.listener is not None:
                try:
                    await self.listener.finish_utterance()
                except Exception as exc:
                    log.exception("could not end the utterance")
                    await self._listening_failed(exc, "Listening failed")
        elif kind == "barge_in":  # the voice button pressed while the assistant speaks
            self._failed_at = None
            if turns.speaking(self.token) or self.paused:
                await self.barge_in()
        elif kind == "playback_stopped":
            # the page is going away mid-reply (pagehide): its Reflex socket is already
            # closed, so the audio queue says it here; the reply is cut where it stopped
            report = {"event": "stopped", "turn": str(msg.get("turn") or ""), "played": msg.get("played")}
            await turns.notify(self.token, lambda stream, chat: apply_audio_report(self.token, report, stream, chat))
        elif kind == "stop":
            self._failed_at = None
            await self.stop_listening()
            turns.interrupt(self.token, reason="stop")
        elif kind == "mode":
            self.set_mode(msg.get("mode"))

    async def replaced(self) -> None:
        """The same tab opened a new socket (reload, reconnect): close the old one quietly."""
        await self.close()
        with contextlib.suppress(Exception):
            await self.ws.close(code=4002)

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
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None
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


async def ws_voice(websocket: WebSocket) -> None:
    global _current
    if not origin_allowed(websocket.headers):
        await websocket.close(code=4003)  # before accept: the upgrade is refused (HTTP 403)
        return
    user = await authenticate(websocket.headers, websocket.client.host if websocket.client else None)
    await websocket.accept()
    if user is None:
        await websocket.send_text(json.dumps({"type": "error", "code": "login", "message": LOGIN_REFUSED}))
        await websocket.close(code=4003)
        return
    try:
        hello = json.loads(await asyncio.wait_for(websocket.receive_text(), timeout=10))
    except Exception:
        await websocket.close(code=4000)
        return
    if not isinstance(hello, dict) or hello.get("type") != "hello" or not _valid_token(hello.get("client_token")):
        await websocket.send_text(json.dumps({"type": "error", "message": "bad hello"}))
        await websocket.close(code=4000)
        return
    if not _sample_rate_ok(hello.get("sample_rate")):
        await websocket.send_text(json.dumps({"type": "error", "message": "send 16 kHz PCM"}))
        await websocket.close(code=4000)
        return
    mode = hello.get("mode") if hello.get("mode") in ("push_to_talk", "hands_free") else "hands_free"
    session = VoiceSession(websocket, hello["client_token"], mode, user)
    previous, _current = _current, session
    if previous is not None and not previous.closed:
        if previous.token == session.token:
            await previous.replaced()  # the same tab reconnected (reload): no takeover notice
        else:
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
