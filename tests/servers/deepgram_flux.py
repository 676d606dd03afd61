"""Deepgram Flux's ``/v2/listen`` WebSocket, served by :class:`~tests.servers.deepgram.FakeDeepgramServer`.

Written from Deepgram's published Flux protocol (Flux quickstart and the v2 message
reference; the SDK's ``ListenV2*`` types):

* Handshake ``GET /v2/listen?model=flux-general-en&encoding=linear16&sample_rate=16000
  &eot_threshold=0.7[&eager_eot_threshold=0.5]&eot_timeout_ms=5000`` with
  ``Authorization: Token <key>`` (401 before the upgrade for a bad key). On open:
  ``{"type": "Connected", "request_id", "sequence_id": 0}``.
* Binary frames are audio; text frames ``ForceEndTurn`` (end the turn now: an
  ``EndOfTurn`` with ``trigger: "manual"``), ``CloseStream`` (close; does **not**
  finalize a turn), ``Configure`` (answered ``ConfigureSuccess``).
* ``TurnInfo`` messages (``event``, ``turn_index``, ``audio_window_start``/``end``,
  ``transcript``, ``words`` with start/end, ``end_of_turn_confidence``):
  ``StartOfTurn`` once the voice lasts ``start_after_s``; ``Update`` every
  ``update_every_s`` of audio in a turn; ``EagerEndOfTurn`` after ``eager_after_s``
  of silence and ``TurnResumed`` if the voice comes back (both only when
  ``eager_eot_threshold`` was given); ``EndOfTurn`` (``trigger: "model"``) after
  ``eot_after_s`` of silence, or ``"timeout"`` at ``eot_timeout_ms``. Thresholds
  scale the silences (a higher ``eot_threshold`` waits longer).
* No audio for ``idle_timeout_s``: close 1011.

Transcripts come from the host's ``script`` (one entry per turn, consumed at its
``EndOfTurn``), on audio time like the v1 recognizer. Faults per connection
(:meth:`FluxService.then`): ``reject_status``, ``drop_after_audio_s`` (abort, no close
frame), ``handshake_delay_s``; ``profile.message_delay_s`` delays every message.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 0.01


@dataclass
class FluxProfile:
    start_after_s: float = 0.05
    update_every_s: float = 0.24
    eager_after_s: float = 0.15  # silence before EagerEndOfTurn at eager_eot_threshold 0.5
    eot_after_s: float = 0.26  # silence before EndOfTurn at eot_threshold 0.7 (vendor: ~260 ms)
    words_per_s: float = 3.0
    energy_threshold: float = 400.0
    message_delay_s: float = 0.0
    idle_timeout_s: float = 10.0
    default_text: str = "testing one two three"


@dataclass
class FluxFault:
    reject_status: int | None = None
    drop_after_audio_s: float | None = None
    handshake_delay_s: float = 0.0


@dataclass
class FluxSession:
    query: dict[str, str]
    audio_bytes: int = 0
    force_end_turns: int = 0
    close_stream: bool = False
    sent: list[dict] = field(default_factory=list)
    dropped: bool = False
    closed_code: int | None = None

    def events(self) -> list[str]:
        return [m.get("event") for m in self.sent if m.get("type") == "TurnInfo"]


class _FluxTurns:
    """Energy segmentation into Flux turns on audio time, for one connection."""

    def __init__(self, srv, query: dict, emit) -> None:
        self.srv = srv
        self.p: FluxProfile = srv.flux.profile
        self.emit = emit
        self.rate = int(query.get("sample_rate") or 16000)
        eot = float(query.get("eot_threshold") or 0.7)
        self.eot_s = self.p.eot_after_s * eot / 0.7
        eager = query.get("eager_eot_threshold")
        self.eager_s = self.p.eager_after_s * float(eager) / 0.5 if eager else None
        self.timeout_s = int(query.get("eot_timeout_ms") or 5000) / 1000.0
        self.window = int(self.rate * WINDOW_S) * 2
        self.buf = b""
        self.t = 0.0
        self.turn_index = 0
        self.in_turn = False
        self.started = False
        self.eager_sent = False
        self.turn_start = 0.0
        self.voice_start: float | None = None
        self.last_voiced = 0.0
        self.next_update = 0.0

    def _text(self) -> str:
        return self.srv.script[0] if self.srv.script else self.p.default_text

    def _words(self, text: str, reveal: int | None = None) -> list[dict]:
        toks = text.split()
        if not toks:
            return []
        end = max(self.last_voiced, self.turn_start + 0.05)
        step = (end - self.turn_start) / len(toks)
        return [{"word": tok, "confidence": 0.98, "start": round(self.turn_start + i * step, 3), "end": round(self.turn_start + (i + 1) * step, 3)} for i, tok in enumerate(toks[: reveal if reveal is not None else len(toks)])]

    def _info(self, event: str, words: list[dict], confidence: float, trigger: str | None = None) -> None:
        msg = {"type": "TurnInfo", "request_id": self.srv.request_id, "event": event, "turn_index": self.turn_index,
               "audio_window_start": round(self.turn_start, 3), "audio_window_end": round(self.t, 3),
               "transcript": " ".join(w["word"] for w in words), "words": words, "end_of_turn_confidence": confidence}
        if trigger is not None:
            msg["trigger"] = trigger
        self.emit(msg)

    def end_turn(self, trigger: str) -> None:
        text = self.srv.script.popleft() if self.srv.script else self.p.default_text
        self.srv.finalized.append(text)
        self._info("EndOfTurn", self._words(text), 0.9, trigger)
        self.in_turn = self.started = self.eager_sent = False
        self.voice_start = None
        self.turn_index += 1

    def feed(self, data: bytes) -> None:
        from .deepgram import rms16

        self.buf += data
        while len(self.buf) >= self.window:
            win, self.buf = self.buf[: self.window], self.buf[self.window :]
            start = self.t
            self.t += len(win) / 2 / self.rate
            voiced = rms16(win) > self.p.energy_threshold
            if voiced:
                if not self.in_turn:
                    self.in_turn, self.turn_start = True, start
                    self.next_update = start + self.p.update_every_s
                if self.voice_start is None:
                    self.voice_start = start
                if self.eager_sent:  # the user went on after an eager end of turn
                    self.eager_sent = False
                    self._info("TurnResumed", self._words(self._text()), 0.2)
                self.last_voiced = self.t
                if not self.started and self.t - self.turn_start >= self.p.start_after_s:
                    self.started = True
                    self._info("StartOfTurn", [], 0.01)
            elif self.voice_start is not None and self.t - self.last_voiced > 0.1:
                self.voice_start = None
            if not self.in_turn or not self.started:
                continue
            silence = self.t - self.last_voiced
            if voiced and self.t >= self.next_update:
                self.next_update += self.p.update_every_s
                text = self._text()
                reveal = min(max(1, len(text.split()) - 1), 1 + int((self.t - self.turn_start) * self.p.words_per_s))
                self._info("Update", self._words(text, reveal), 0.05)
            if self.eager_s is not None and not self.eager_sent and not voiced and silence >= self.eager_s and silence < self.eot_s:
                self.eager_sent = True
                self._info("EagerEndOfTurn", self._words(self._text()), 0.55)
            if not voiced and silence >= self.eot_s:
                self.end_turn("model")
            elif self.in_turn and self.t - self.turn_start >= self.timeout_s and silence > 0:
                self.end_turn("timeout")


class FluxService:
    """The Flux side of the fake Deepgram host."""

    fault_type = FluxFault

    def __init__(self, server) -> None:
        self.srv = server
        self.profile = FluxProfile()
        self.faults: deque[FluxFault] = deque()
        self.sessions: list[FluxSession] = []

    def then(self, **fault) -> "FluxService":
        self.faults.append(FluxFault(**fault))
        return self

    async def serve(self, reader, writer, query: dict, headers: dict, fault: FluxFault) -> None:
        from .deepgram import _flush_and_close, _frame, _read_frame, ws_accept

        writer.write(ws_accept(headers, self.srv.request_id))
        await writer.drain()
        sess = FluxSession(query=query)
        self.sessions.append(sess)
        outq: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seq = {"n": 0}

        def emit(msg: dict) -> None:
            msg = {**msg, "sequence_id": seq["n"]}
            seq["n"] += 1
            outq.put_nowait((loop.time() + self.profile.message_delay_s, msg))

        async def sender() -> None:
            while True:
                due, msg = await outq.get()
                if msg is None:
                    return
                delay = due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                sess.sent.append(msg)
                writer.write(_frame(1, json.dumps(msg).encode()))
                await writer.drain()

        emit({"type": "Connected", "request_id": self.srv.request_id})
        turns = _FluxTurns(self.srv, query, emit)
        send_task = asyncio.create_task(sender())
        try:
            while True:
                try:
                    op, payload = await asyncio.wait_for(_read_frame(reader), self.profile.idle_timeout_s)
                except asyncio.TimeoutError:
                    sess.closed_code = 1011
                    await _flush_and_close(outq, send_task, writer, 1011, "Deepgram did not receive audio data within the timeout window.")
                    return
                if op == 8:
                    sess.closed_code = struct.unpack(">H", payload[:2])[0] if len(payload) >= 2 else 1005
                    await _flush_and_close(outq, send_task, writer, 1000, "")
                    return
                if op == 9:
                    writer.write(_frame(10, payload))
                    continue
                if op == 2:
                    sess.audio_bytes += len(payload)
                    turns.feed(payload)
                    if fault.drop_after_audio_s is not None and sess.audio_bytes >= fault.drop_after_audio_s * turns.rate * 2:
                        sess.dropped = True
                        send_task.cancel()
                        writer.transport.abort()
                        return
                    continue
                if op != 1:
                    continue
                try:
                    msg = json.loads(payload)
                except ValueError:
                    msg = {}
                kind = msg.get("type") if isinstance(msg, dict) else None
                if kind == "ForceEndTurn":
                    sess.force_end_turns += 1
                    if turns.in_turn:
                        turns.end_turn("manual")
                elif kind == "CloseStream":
                    sess.close_stream = True
                    sess.closed_code = 1000
                    await _flush_and_close(outq, send_task, writer, 1000, "")
                    return
                elif kind == "Configure":
                    emit({"type": "ConfigureSuccess", "request_id": self.srv.request_id, "thresholds": msg.get("thresholds") or {}})
                else:
                    emit({"type": "Error", "code": "UNPARSABLE_CLIENT_MESSAGE", "description": f"Unknown message type {kind!r}"})
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            if not send_task.done():
                send_task.cancel()
