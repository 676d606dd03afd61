"""Deepgram Flux (``listen.v2``, ``flux-general-en``): the end of turn decided by the model.

Flux reports one ``TurnInfo`` stream per turn instead of v1's ``is_final`` /
``speech_final`` results, and decides the end of turn itself (~260 ms after the
last word, vendor figure), which is what the v1 listener approximates with
endpointing silence. Mapped onto the listener events the session already handles
(:mod:`voiceclaw_app.pipeline.preemptive`'s :class:`TurnStarter`):

* ``StartOfTurn`` -> :class:`SpeechStarted` (``source="stt"``): a barge-in when the
  assistant is speaking; the session's two-step policy decides.
* ``Update`` -> :class:`InterimTranscript` (the turn's words so far).
* ``EagerEndOfTurn`` -> :class:`PreliminaryTranscript`: the reply starts
  preemptively. Flux sends it (and ``TurnResumed``) only when
  ``eager_eot_threshold`` is set (<= ``eot_threshold``).
* ``TurnResumed`` -> :class:`SpeechStarted`: the user went on, the preemptive reply
  is dropped.
* ``EndOfTurn`` -> :class:`EndOfTurn` (commits the preemptive reply when the words
  match). In push-to-talk, a model end of turn while the button is held only
  collects the words; the release sends ``ForceEndTurn`` (``CloseStream`` alone
  does not finalize a turn) and its ``EndOfTurn`` ends it.

Everything else is the v1 listener's (:class:`DeepgramListener`): the socket opens at
session start, the server's Silero VAD gates barge-in and what is streamed, audio not
yet covered by an ``EndOfTurn`` is replayed on a reconnect (the new socket re-hears
the turn), and failures report a notice and recover; ``FallbackListener`` wraps it
the same way. Flux needs the silence after speech to decide, so audio keeps
streaming for ``eot_timeout_ms`` + 1 s after the voice stops; past that a 20 ms
silent frame every few seconds keeps the socket open (v2 has no ``KeepAlive``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .base import InterimTranscript, PreliminaryTranscript, SpeechStarted
from .deepgram_stt import SAMPLE_RATE, DeepgramListener, DeepgramOptions, _client, now_ms

log = logging.getLogger("voiceclaw.stt.flux")

FLUX_MODEL = "flux-general-en"
KEEPALIVE_FRAME = b"\x00\x00" * (SAMPLE_RATE // 50)  # 20 ms of silence


@dataclass(frozen=True)
class FluxOptions:
    """The ``/v2/listen`` query parameters (settings ``eot_threshold``,
    ``eager_eot_threshold`` (0: off), ``eot_timeout_ms``)."""

    model: str = FLUX_MODEL
    sample_rate: int = SAMPLE_RATE
    eot_threshold: float = 0.7
    eager_eot_threshold: float = 0.5
    eot_timeout_ms: int = 5000

    def query(self) -> dict[str, str]:
        q = {
            "model": self.model,
            "encoding": "linear16",
            "sample_rate": str(self.sample_rate),
            "eot_threshold": f"{self.eot_threshold:g}",
            "eot_timeout_ms": str(int(self.eot_timeout_ms)),
        }
        if self.eager_eot_threshold > 0:
            q["eager_eot_threshold"] = f"{min(self.eager_eot_threshold, self.eot_threshold):g}"
        return q


class FluxListener(DeepgramListener):
    """A live Flux session fed with the mic frames (see the module notes)."""

    name = "deepgram-flux"

    def __init__(self, *, api_key: str, url: str | None = None, flux: FluxOptions | None = None, **kw):
        self.flux = flux or FluxOptions()
        kw.setdefault("silence_stream_ms", float(self.flux.eot_timeout_ms) + 1000.0)
        # v1's endpointing fields drive its local fallbacks (a Finalize after a
        # reconnect, a last-resort end of turn): Flux's timeout is the equivalent
        options = DeepgramOptions(sample_rate=self.flux.sample_rate, endpointing_ms=min(2000, int(self.flux.eot_timeout_ms)), utterance_end_ms=int(self.flux.eot_timeout_ms))
        super().__init__(api_key=api_key, url=url, options=options, **kw)
        self._turn_words = ""  # the current Flux turn's transcript (cumulative within a turn)

    @classmethod
    def from_settings(cls, settings, keys, **kw) -> "FluxListener":
        flux = FluxOptions(eot_threshold=float(settings.eot_threshold), eager_eot_threshold=float(settings.eager_eot_threshold), eot_timeout_ms=int(settings.eot_timeout_ms))
        kw.setdefault("hands_free", settings.input_mode == "hands_free")
        kw.setdefault("vad_min_speech_ms", float(getattr(settings, "vad_min_speech_ms", 60.0)))
        return cls(api_key=keys.deepgram_api_key, flux=flux, **kw)

    def __repr__(self) -> str:
        return f"FluxListener(url={self.url!r}, model={self.flux.model!r})"

    # ------------------------------------------------------------ the v2 socket
    def _socket_cm(self):
        return _client(self._api_key, self.url).listen.v2.connect(**self.flux.query())

    async def _send_finalize(self) -> None:
        await self._sock.send_force_end_turn()

    async def _send_keepalive(self) -> None:
        # v2 has no KeepAlive message: a short silence keeps the socket (and its clock) going
        await self._sock.send_media(KEEPALIVE_FRAME)
        self._conn_audio_s += len(KEEPALIVE_FRAME) / 2 / self.flux.sample_rate

    # ------------------------------------------------------------ TurnInfo -> listener events
    def _handle(self, m: dict, conn_id: int) -> None:
        kind = m.get("type")
        if kind == "TurnInfo":
            self._on_turn_info(m, conn_id)
        elif kind == "Error":
            log.warning("Deepgram Flux error %s: %s", m.get("code"), str(m.get("description", ""))[:200])
        elif kind == "Warning":
            log.info("Deepgram Flux warning: %s", str(m.get("description", ""))[:200])

    def _last_word_t(self, m: dict, conn_id: int) -> float | None:
        words = m.get("words") or []
        end = words[-1].get("end") if words else None
        if end is None:
            end = m.get("audio_window_end")
        return self._t_of(float(end), conn_id) if end is not None else None

    def _on_turn_info(self, m: dict, conn_id: int) -> None:
        event = m.get("event")
        text = (m.get("transcript") or "").strip()
        if event == "StartOfTurn":
            words = m.get("words") or []
            start = words[0].get("start") if words and words[0].get("start") is not None else m.get("audio_window_start")
            t = self._t_of(float(start or 0.0), conn_id)
            t = t if t is not None else now_ms()
            if self._barge != "confirmed" and not (self._barge is None and t < self._barge_floor):
                self._barge = "confirmed"
                self._events.put_nowait(SpeechStarted(t_ms=t, source="stt"))
            if text:
                self._interim = text
                self._events.put_nowait(InterimTranscript(" ".join(self._finals + [text])))
        elif event == "Update":
            if text:
                self._interim = text
                self._events.put_nowait(InterimTranscript(" ".join(self._finals + [text])))
        elif event == "EagerEndOfTurn":
            if text:
                self._interim = text
                self._speech_end_ms = self._last_word_t(m, conn_id) or self._speech_end_ms
                self._events.put_nowait(PreliminaryTranscript(" ".join(self._finals + [text]), speech_end_ms=self._speech_end_ms))
        elif event == "TurnResumed":
            # the user went on after an eager end of turn: the preemptive reply is stale
            self._barge = "confirmed"
            self._events.put_nowait(SpeechStarted(t_ms=now_ms(), source="stt"))
        elif event == "EndOfTurn":
            end_s = float(m.get("audio_window_end") or 0.0)
            while self._unfinal and self._unfinal[0].conn == conn_id and self._unfinal[0].end_s <= end_s + 1e-6:
                self._unfinal.popleft()  # heard and decided: no replay after a reconnect
            self._interim = ""
            if text:
                self._finals.append(text)
                self._speech_end_ms = self._last_word_t(m, conn_id) or self._speech_end_ms
            if self.hands_free or self._finalizing:
                self._end_turn()
            elif text:
                # push-to-talk, button still held: a pause is not the end of the question
                self._events.put_nowait(PreliminaryTranscript(" ".join(self._finals), speech_end_ms=self._speech_end_ms))

    async def finish_utterance(self) -> None:
        """Push-to-talk released: ``ForceEndTurn``; if Flux already ended the turn
        (nothing said since), end it now rather than wait for a turn that is not open."""
        if self._started and not self._closing and self.failed is None and self._finals and not self._interim:
            self._end_turn()
            return
        await super().finish_utterance()
