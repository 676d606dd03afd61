"""The embedded live listener: silero VAD end of turn + Whisper, speculative at a short pause.

One :class:`LocalListener` per voice session. The mic WebSocket pushes 16 kHz PCM16
frames; :meth:`events` yields the :mod:`.base` listen events:

* :class:`SpeechStarted` with ``tentative=True`` at the voice onset (~64 ms of voice:
  pause playback; also the moment to prepare the request and prefill the LLM),
  then ``tentative=False`` when the VAD confirms speech (``vad_min_speech_ms``:
  barge-in cancels the reply), or :class:`SpeechDiscarded` when the onset was a
  cough or a click that never became speech (resume playback);
* :class:`PreliminaryTranscript` when the utterance so far was transcribed at a
  short pause (~200 ms; with ``smart_turn`` 96 ms, the transcription itself started
  after the pause's first 32 ms): the turn may start preemptively;
* :class:`EndOfTurn` after ``vad_silence_ms`` of silence (``turn_detection="silence"``),
  or, with ``turn_detection="smart_turn"`` (the default), at the short pause itself
  when the pause's words (:mod:`.text_turn`, on its transcript) and its sound
  (:mod:`.smart_turn`) say the sentence is finished, else after ``turn_max_wait_ms``
  of silence. If the audio is the
  same as at the short pause, the speculative transcription is reused (awaited if
  still running) instead of transcribed again;
* :class:`ListenNotice` for a max-length cut, an empty utterance (including a
  push-to-talk release with nothing heard) or an engine failure (the session goes on).

Input modes (:meth:`set_hands_free`): hands-free ends a turn after ``vad_silence_ms``
of silence; in push-to-talk a pause never ends it, :meth:`finish_utterance` (the
button released) does, with everything said while the button was held as one
utterance.

A speculative transcription that turns out wrong (the user spoke again) is
cancelled through its :class:`CancelToken`: Whisper skips the decoder if it has not
started, so it delays the real transcription by at most one encoder pass.
Finals are emitted in utterance order even if a later one finishes first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator, Callable

from ..config import VoiceSettings
from ..pipeline.timing import now_ms
from . import silero_vad as sv
from .base import STT, CancelToken, EndOfTurn, EngineUnavailable, Listener, ListenEvent, ListenNotice, PreliminaryTranscript, ProviderError, SpeechDiscarded, SpeechStarted, TextTurnAnalyzer, Transcript, TurnAnalyzer, queued_events, run_per_frame
from .smart_turn import PauseJudge

log = logging.getLogger("voiceclaw.listener")
_CLOSED = object()
#: what a push-to-talk release with nothing (or too little) heard tells the user
NOTHING_HEARD = "I didn't hear anything. Hold the button while you speak, then release it."
#: with smart_turn, the pause at which the utterance so far is transcribed and judged
#: (3 silero windows, after the VAD's own ~75 ms lag). Short, because the reply starts
#: from that transcript; a verdict still needs the transcript and the words' model
#: (~200 ms more), and one that comes after the user spoke again is dropped, so only
#: a pause that lasts that long can end a turn. 160 ms until 2026-12-06: 96 ms answers
#: ~40-60 ms sooner with the same cut-offs (README, "Benchmarks", third host)
SMART_TURN_PAUSE_MS = 96


#: with smart_turn, the silence after which the utterance so far starts being
#: transcribed (one silero window): the transcript is then nearly ready when the
#: :data:`SMART_TURN_PAUSE_MS` pause is judged; it is announced (the preemptive turn
#: starts) only at that pause, so a breath between words starts no reply
SMART_TURN_TRANSCRIBE_MS = 32


class _Speculation:
    """One pause's transcription, started at :class:`.silero_vad.PauseBegins` or
    :class:`.silero_vad.ShortPause`, announced once the pause is reached and it is done."""

    def __init__(self, pcm: bytes, speech_end_ms: float) -> None:
        self.pcm = pcm
        self.speech_end_ms = speech_end_ms
        self.cancel = CancelToken()
        self.task: asyncio.Task  # set by LocalListener._speculate, right after
        self.heard: Transcript | None = None
        self.paused = False  # the ShortPause came: its transcript may be announced
        self.announced = False


class LocalListener(Listener):
    """Silero VAD + the embedded (or given) STT over one mic stream."""

    def __init__(self, *, settings: VoiceSettings, stt: STT | None = None, turn_analyzer: TurnAnalyzer | None = None, text_analyzer: TextTurnAnalyzer | None = None, use_words: bool = True, on_decision: Callable[[float, float], None] | None = None) -> None:
        self.settings = settings
        #: called with (eot_decided, speech_end) the moment an end of turn is decided,
        #: before its transcription (``bench turns`` times decisions with it)
        self.on_decision = on_decision
        self._stt = stt
        self._analyzer = turn_analyzer
        self._text = text_analyzer
        self.smart_turn = settings.turn_detection == "smart_turn"
        # smart_turn: silence only ends the turn at the ceiling; the model ends it sooner
        self.detector = sv.SileroTurnDetector(
            silence_ms=settings.turn_max_wait_ms if self.smart_turn else settings.vad_silence_ms,
            min_speech_ms=settings.vad_min_speech_ms,
            max_utterance_s=settings.max_utterance_s,
            short_pause_ms=SMART_TURN_PAUSE_MS if self.smart_turn else 200,
            early_pause_ms=SMART_TURN_TRANSCRIBE_MS if self.smart_turn else None,
        )
        self.judge = PauseJudge(use_words=use_words)
        self._pause_gen = 0  # bumped whenever a pause's verdict would be stale
        self._judge_failed = False
        self._q: asyncio.Queue = asyncio.Queue()
        self._spec: _Speculation | None = None
        self._tasks: set[asyncio.Task] = set()
        self._last_final: asyncio.Task | None = None
        self._closed = False
        self._tentative = False  # a tentative SpeechStarted awaits its confirmation or discard
        self._ended_since_flush = False  # an end of turn was emitted since the last release
        self._vad_failed = False  # the VAD error notice was given (once, until it works again)
        self.set_hands_free(True)

    @classmethod
    def from_settings(cls, settings: VoiceSettings) -> "LocalListener":
        return cls(settings=settings)

    # ------------------------------------------------------------ input
    def set_hands_free(self, hands_free: bool) -> None:
        """Hands-free: silence ends the turn. Push-to-talk: only :meth:`finish_utterance` does."""
        self.hands_free = bool(hands_free)
        self.detector.end_on_silence = self.hands_free
        self._ended_since_flush = False

    async def push(self, pcm16: bytes, t_ms: float) -> None:
        if self._closed:
            return
        seen = self.detector.windows_seen
        try:
            events = await run_per_frame(self.detector.push, pcm16, t_ms)
        except ProviderError as exc:
            self._vad_error(exc)
            return
        if self.detector.windows_seen > seen:
            self._vad_failed = False  # the helper answers again
        self._dispatch(events)

    async def finish_utterance(self) -> None:
        """Push-to-talk released: close the utterance now, whatever the VAD says.

        Nothing heard (silence, or speech shorter than ``vad_min_speech_ms``) gives a
        ``ListenNotice(kind="empty")`` so the user knows the release was not lost.
        """
        if self._closed:
            return
        try:
            events = await run_per_frame(self.detector.flush)
        except ProviderError as exc:
            self._vad_error(exc)
            return
        ended = self._ended_since_flush or any(isinstance(ev, sv.EndOfTurn) for ev in events)
        self._dispatch(events)
        self._ended_since_flush = False
        if not ended:
            self._q.put_nowait(ListenNotice(NOTHING_HEARD, kind="empty"))

    # ------------------------------------------------------------ output
    def events(self) -> AsyncIterator[ListenEvent]:
        return queued_events(self._q, _CLOSED)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._drop_speculation()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await run_per_frame(self.detector.close)  # after any frame still in the VAD thread
        self._q.put_nowait(_CLOSED)

    # ------------------------------------------------------------ internals
    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _engine(self) -> STT:
        if self._stt is None:
            from . import engines

            self._stt = await engines.aget_engine("stt")  # type: ignore[assignment]
        return self._stt

    async def _turn_analyzer(self) -> TurnAnalyzer:
        if self._analyzer is None:
            from . import engines

            self._analyzer = await engines.aget_engine("turn")  # type: ignore[assignment]
        return self._analyzer

    async def _text_analyzer(self) -> TextTurnAnalyzer:
        if self._text is None:
            from . import engines

            self._text = await engines.aget_engine("text_turn")  # type: ignore[assignment]
        return self._text

    async def _transcribe(self, pcm: bytes, cancel: CancelToken | None = None, *, score_words: bool = False) -> Transcript:
        stt = await self._engine()
        return await stt.transcribe(pcm, sample_rate=sv.SAMPLE_RATE, language=self.settings.stt_language or "en", cancel=cancel, score_words=score_words)

    def _drop_speculation(self) -> None:
        if self._spec is not None:
            self._spec.cancel.cancel()
            self._spec = None

    def _vad_error(self, exc: ProviderError) -> None:
        """The VAD helper failed: tell the user once, keep the session (the next frame retries)."""
        if self._tentative:
            self._tentative = False
            self._q.put_nowait(SpeechDiscarded(t_ms=now_ms()))  # do not leave playback paused
        if not self._vad_failed:
            log.warning("voice detection failed: %s (%s)", exc.user_message, exc.detail)
            self._vad_failed = True
            self._q.put_nowait(ListenNotice(exc.user_message, kind="error"))

    def _dispatch(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, sv.VoiceOnset):
                # the earliest sign of the user talking: pause playback now, before
                # the segment counts as speech (vad_min_speech_ms); it may be a cough
                self._tentative = True
                self._q.put_nowait(SpeechStarted(t_ms=ev.start_ms, source="vad", tentative=True))
            elif isinstance(ev, sv.SpeechStart):
                self._tentative = False
                self._q.put_nowait(SpeechStarted(t_ms=ev.start_ms, source="vad", tentative=False))
            elif isinstance(ev, sv.OnsetDiscarded):
                self._tentative = False
                self._q.put_nowait(SpeechDiscarded(t_ms=ev.t_ms))
            elif isinstance(ev, sv.PauseBegins):
                self._speculate(ev.pcm, ev.speech_end_ms)
            elif isinstance(ev, sv.PauseAborted):
                self._drop_speculation()
            elif isinstance(ev, sv.ShortPause) and (self.settings.speculative or self.smart_turn):
                # the transcription PauseBegins started, if nobody spoke since
                spec = self._spec if self._spec is not None and self._spec.pcm == ev.pcm else self._speculate(ev.pcm, ev.speech_end_ms)
                spec.paused = True
                self._announce(spec)
                if self.smart_turn and self.hands_free:
                    self._pause_gen += 1
                    self._spawn(self._judge_pause(ev, self._pause_gen, spec))
            elif isinstance(ev, sv.SpeechResumed):
                self._pause_gen += 1
                self._drop_speculation()
                # speaking again after a pause: a turn started on that pause is stale
                self._q.put_nowait(SpeechStarted(t_ms=ev.t_ms, source="vad"))
            elif isinstance(ev, sv.MaxLengthCut):
                self._q.put_nowait(ListenNotice(ev.message, kind="max_length"))
            elif isinstance(ev, sv.EndOfTurn):
                self._pause_gen += 1
                if self.on_decision is not None:
                    self.on_decision(ev.t_ms, ev.speech_end_ms)
                self._ended_since_flush = True
                spec, self._spec = self._spec, None
                reuse = spec if spec is not None and spec.pcm == ev.pcm else None
                if spec is not None and reuse is None:
                    spec.cancel.cancel()
                self._last_final = self._spawn(self._final(ev, reuse, self._last_final))

    def _speculate(self, pcm: bytes, speech_end_ms: float) -> _Speculation:
        """Start transcribing the utterance so far (the pause may end the turn)."""
        self._drop_speculation()
        spec = _Speculation(pcm, speech_end_ms)
        spec.task = self._spawn(self._preliminary(spec))
        self._spec = spec
        return spec

    def _announce(self, spec: _Speculation) -> None:
        """The pause's transcript, once it is done and the pause reached: the preemptive turn may start."""
        if spec.announced or not spec.paused or spec.heard is None or spec is not self._spec or spec.cancel.cancelled:
            return
        spec.announced = True
        text = spec.heard.text.strip()
        if text and self.settings.speculative:
            self._q.put_nowait(PreliminaryTranscript(text, speech_end_ms=spec.speech_end_ms))

    async def _preliminary(self, spec: _Speculation) -> Transcript:
        judging = self.smart_turn and self.hands_free
        try:
            heard = await self._transcribe(spec.pcm, spec.cancel, score_words=judging)
        except ProviderError as exc:
            log.warning("speculative transcription failed: %s", exc.user_message)
            heard = Transcript("")
        # the reply starts from the text: announce it before its words are scored
        # (bench local, three alternating runs: first audio p50 955-1,024 vs 965-1,064 ms)
        spec.heard = heard
        self._announce(spec)
        if judging and heard.text.strip() and not spec.cancel.cancelled:
            # the pause's verdict will ask how sure Whisper is of its last words: ask
            # now, while the encoder output is fresh (~5-20 ms; asked at the verdict
            # it waited behind the reply's work: the verdict came ~150 ms later,
            # bench local). Not known (a failure): the words are judged as they are.
            stt = await self._engine()
            try:
                probabilities = await stt.word_probabilities(heard)
            except ProviderError as exc:
                log.warning("scoring the transcript's words failed: %s", exc.user_message)
                probabilities = None
            heard = dataclasses.replace(heard, word_probabilities=probabilities, scoring=None)
        return heard

    async def _judge_pause(self, ev: sv.ShortPause, gen: int, spec: _Speculation) -> None:
        """smart_turn: score the pause, its words (the pause's transcript, then the
        words' model) and, where they leave it open, its sound (Smart Turn); "complete"
        ends the turn now, "incomplete" leaves it to the user or the
        ``turn_max_wait_ms`` ceiling.

        The words are always waited for (up to the ceiling, where silence ends the turn
        anyway): without them the sound alone cuts off most hesitations (see
        :class:`.smart_turn.PauseJudge`). The sound is scored only when the verdict
        depends on it (:meth:`.PauseJudge.needs_sound`), after the words: scored at
        every pause beside Whisper, it slowed the transcription the reply starts from.
        A verdict that comes after the user spoke again (``gen`` moved on) is dropped."""
        try:
            text, words, doubted, sound, untrimmed = "", None, False, None, None
            if self.judge.use_words:
                heard = await asyncio.shield(spec.task)
                text = heard.text.strip()
                if text and gen == self._pause_gen:
                    words = await (await self._text_analyzer()).score(text)
                    if self.judge.words_may_end(text, words):
                        # last words Whisper itself doubts are most likely ones it made
                        # up to complete a fragment: judge the words without them
                        trusted = self.judge.trusted_words(text, heard.word_probabilities)  # asked in _preliminary
                        if trusted != text:
                            text, doubted, untrimmed = trusted, True, words
                            words = await (await self._text_analyzer()).score(text) if text else None
            if gen == self._pause_gen and self.judge.needs_sound(text, words, doubted=doubted):
                sound = await (await self._turn_analyzer()).score(ev.pcm)
        except ProviderError as exc:
            self._judge_error(exc)
            return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a runtime's own error: silence at the ceiling still ends turns
            self._judge_error(EngineUnavailable(f"The end-of-turn model failed: {exc}", detail=repr(exc)))
            return
        complete = self.judge.complete(sound, text, words, doubted=doubted, untrimmed=untrimmed)
        log.debug("pause verdict sound %s words=%r%s p=%s -> %s", "not needed" if sound is None else f"p={sound.probability:.2f} ({sound.ms:.0f} ms)", text[-40:], " (last word doubted)" if doubted else "", "-" if words is None else f"{words.probability:.3f}", "complete" if complete else "incomplete")
        if not complete or gen != self._pause_gen or self._closed:
            return
        try:
            events = await run_per_frame(self.detector.end_turn, now_ms())
        except ProviderError as exc:
            self._vad_error(exc)
            return
        self._dispatch(events)  # the detector checked it was still the same pause

    def _judge_error(self, exc: ProviderError) -> None:
        """No end-of-turn model: fall back to the silence wait, and say so once."""
        self.detector.silence_ms = max(self.settings.vad_silence_ms, int(sv.WINDOW_MS))
        if not self._judge_failed:
            self._judge_failed = True
            log.warning("end-of-turn model unavailable, using the silence wait: %s (%s)", exc.user_message, exc.detail)
            self._q.put_nowait(ListenNotice(exc.user_message + " Turns end after a silence instead.", kind="error"))

    async def _final(self, ev: sv.EndOfTurn, reuse: _Speculation | None, previous: asyncio.Task | None) -> None:
        try:
            text = (await reuse.task if reuse is not None else await self._transcribe(ev.pcm)).text.strip()
            error = None
        except ProviderError as exc:
            text, error = "", exc.user_message
        except Exception as exc:  # a runtime's own error: tell the user, keep the session
            text, error = "", f"Speech recognition failed: {exc}"
        stt_final = now_ms()
        if previous is not None and not previous.done():
            await asyncio.gather(previous, return_exceptions=True)  # keep utterance order
        if error is not None:
            self._q.put_nowait(ListenNotice(error, kind="error"))
        elif text:
            self._q.put_nowait(EndOfTurn(text=text, speech_end_ms=ev.speech_end_ms, eot_ms=ev.t_ms, stt_final_ms=stt_final))
        else:
            self._q.put_nowait(ListenNotice("No speech was recognized.", kind="empty"))
