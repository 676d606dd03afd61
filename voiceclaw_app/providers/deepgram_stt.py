"""Deepgram speech-to-text: a live streaming :class:`Listener` and a pre-recorded fallback.

Built on ``deepgram-sdk`` (v4+ API: ``AsyncDeepgramClient.listen.v1.connect`` and
``listen.v1.media.transcribe_file``). The SDK takes a custom
:class:`DeepgramClientEnvironment`, so ``VOICECLAW_DEEPGRAM_URL`` points both the
WebSocket and the HTTP calls anywhere (the tests' local server speaks the protocol).
The SDK has no reconnect layer, so reconnection is done here.

How a voice session uses Deepgram, and why:

* **The socket opens when the session starts** (:meth:`DeepgramListener.start`), not
  at first speech: the TLS + WebSocket handshake would otherwise land in the turn.
* **Hands-free silence is not streamed** (Deepgram bills streamed audio). Frames are
  sent while voiced and for ``silence_stream_ms`` after (enough for endpointing and
  ``UtteranceEnd`` to fire); then ``KeepAlive`` every few seconds holds the socket
  open (Deepgram closes it after ~10 s without data). A short pre-roll buffer is sent
  when speech resumes so word onsets are not clipped.
* **Preemptive generation**: every ``is_final`` segment produces a
  :class:`PreliminaryTranscript` (all final segments so far); the session may start
  the LLM on it and must drop that work if the user keeps talking.
  ``speech_final`` (endpointing) or ``UtteranceEnd`` produces the :class:`EndOfTurn`.
  Deepgram's ``speech_final`` result carries only the last segment, so final segments
  are concatenated here.
* ``speech_end_ms`` is the end of the last word, mapped from Deepgram's audio
  seconds to the monotonic clock of the frames that carried it.
* **Push-to-talk release** sends ``Finalize``; the result marked ``from_finalize``
  ends the turn at once (no endpointing wait).
* **Reconnect**: audio not yet covered by an ``is_final`` result is kept and replayed
  on a new socket if the connection drops, so words already spoken are not lost
  (and words already final are kept, not re-sent). The new socket never heard the
  words already final, so it would never end that turn: after a reconnect with final
  words pending, a local endpoint timer (``endpointing`` ms of silence on our own gate)
  sends ``Finalize`` and the ``from_finalize`` result ends the turn. A watchdog
  reconnects when voiced audio was sent and the server said nothing for
  ``watchdog_s`` (a socket that is open but dead); when the fresh socket is as
  silent (``max_silent_reconnects``), the service is down: a failure, as below.
* **Push-to-talk** (:meth:`set_hands_free` ``False``, may change mid-session):
  ``speech_final`` / ``UtteranceEnd`` do not end the turn (a pause while the button
  is held is not the end of the question); only the ``from_finalize`` result after
  :meth:`finish_utterance` does.
* **Barge-in**: Deepgram's ``SpeechStarted`` counts as confirmed speech. With a local
  gate (the server's Silero VAD), its onset (``vad_onset_ms`` of voice) is reported
  as a *tentative* ``SpeechStarted`` (pause playback), confirmed after
  ``vad_min_speech_ms`` of voice or by Deepgram's ``SpeechStarted``, or withdrawn with
  :class:`SpeechDiscarded`. A new speech start may be reported after 300 ms of
  silence with no words pending (the session's echo guard may have ignored the last).
* **Failures**: a session that cannot be (re)opened reports a
  ``ListenNotice(kind="error")`` and keeps listening: the next voiced frame after a
  backoff tries again (frames meanwhile are kept and replayed), and a notice says
  when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlsplit

from .base import (
    AudioClip,
    AuthError,
    CancelToken,
    ConnectError,
    EndOfTurn,
    InterimTranscript,
    Listener,
    ListenEvent,
    ListenNotice,
    PreliminaryTranscript,
    ProtocolError,
    ProviderError,
    ProviderTimeout,
    SpeechDiscarded,
    SpeechStarted,
    StreamDropped,
    STT,
    STTCapabilities,
    Transcript,
    error_for_status,
    run_per_frame,
    queued_events,
)

try:
    import numpy as _np
except ImportError:  # pragma: no cover
    _np = None

log = logging.getLogger("voiceclaw.stt.deepgram")

DEFAULT_URL = "https://api.deepgram.com"
SERVICE = "Deepgram speech-to-text service"
SAMPLE_RATE = 16000


def deepgram_url_from_env() -> str:
    """``VOICECLAW_DEEPGRAM_URL`` (http(s) or ws(s), with or without ``/v1``), else the real service."""
    return os.environ.get("VOICECLAW_DEEPGRAM_URL", "").strip() or DEFAULT_URL


def deepgram_environment(url: str):
    """The SDK environment for a base URL: both the REST (http) and the live (ws) hosts."""
    from deepgram.environment import DeepgramClientEnvironment

    parts = urlsplit(url if "://" in url else f"https://{url}")
    secure = parts.scheme in ("https", "wss")
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[:-3]
    http = f"{'https' if secure else 'http'}://{parts.netloc}{path}"
    ws = f"{'wss' if secure else 'ws'}://{parts.netloc}{path}"
    try:
        return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)
    except TypeError:  # SDK generations before the agent REST host
        return DeepgramClientEnvironment(base=http, production=ws, agent=ws)


def now_ms() -> float:
    return time.monotonic() * 1000.0


def rms16(pcm: bytes) -> float:
    """RMS level of 16-bit mono PCM (cheap: ~10 µs per 20 ms frame with numpy)."""
    n = len(pcm) // 2
    if n == 0:
        return 0.0
    if _np is not None:
        a = _np.frombuffer(pcm[: 2 * n], dtype="<i2").astype(_np.float32)
        return float(_np.sqrt(_np.mean(a * a)))
    import array

    a = array.array("h", pcm[: 2 * n])
    return math.sqrt(sum(v * v for v in a) / n)


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status_code", "status"):
        v = getattr(exc, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(exc, "response", None)
    v = getattr(resp, "status_code", None) or getattr(resp, "status", None)
    return v if isinstance(v, int) else None


def map_error(exc: BaseException) -> ProviderError:
    """SDK / websockets / socket exceptions -> typed errors with plain messages."""
    if isinstance(exc, ProviderError):
        return exc
    status = _status_of(exc)
    if status is not None:
        return error_for_status(SERVICE, status, detail=str(getattr(exc, "body", ""))[:200])
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return ProviderTimeout(f"The {SERVICE} did not answer in time.", retryable=True)
    if isinstance(exc, (ConnectionRefusedError, OSError)):
        return ConnectError(f"Could not connect to the {SERVICE}: check VOICECLAW_DEEPGRAM_URL and the network.", retryable=True, detail=type(exc).__name__)
    name = type(exc).__name__
    if "ConnectionClosed" in name:
        return StreamDropped(f"The connection to the {SERVICE} dropped.", retryable=True, detail=str(exc)[:200])
    return ProtocolError(f"The {SERVICE} sent something unexpected.", detail=f"{name}: {exc}"[:200])


@dataclass(frozen=True)
class DeepgramOptions:
    """The ``/v1/listen`` query parameters a voice session uses."""

    model: str = "nova-3"
    language: str = "en"
    sample_rate: int = SAMPLE_RATE
    endpointing_ms: int = 300  # silence before speech_final (Deepgram recommends 300-500 for dialogue)
    utterance_end_ms: int = 1000  # Deepgram's minimum; the fallback end of turn when noise defeats endpointing
    interim_results: bool = True
    smart_format: bool = True
    vad_events: bool = True

    def query(self) -> dict[str, str]:
        """As the SDK's ``connect()`` keyword arguments (strings: the SDK does not lower-case bools)."""
        b = lambda v: "true" if v else "false"  # noqa: E731
        return {
            "model": self.model,
            "language": self.language,
            "encoding": "linear16",
            "sample_rate": str(self.sample_rate),
            "channels": "1",
            "interim_results": b(self.interim_results),
            "endpointing": str(self.endpointing_ms) if self.endpointing_ms > 0 else "false",
            "utterance_end_ms": str(self.utterance_end_ms),
            "vad_events": b(self.vad_events),
            "smart_format": b(self.smart_format),
        }


#: one SDK client per event loop and (key, URL), kept: building one builds an httpx
#: client, whose SSL context loads the CA bundle, on the event loop; at every listener
#: start that held a loaded worker's loop ~200 ms (``VOICECLAW_LOOP_WATCH_MS`` caught it)
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], Any]]" = weakref.WeakKeyDictionary()


def _client(api_key: str, url: str):
    """The Deepgram SDK client for this loop, key and URL (its httpx client is loop-bound)."""
    from deepgram import AsyncDeepgramClient

    loop = asyncio.get_running_loop()
    per_loop = _clients.setdefault(loop, {})
    client = per_loop.get((api_key, url))
    if client is None:
        client = per_loop[(api_key, url)] = AsyncDeepgramClient(api_key=api_key or "not-set", environment=deepgram_environment(url))
    return client


def _as_dict(msg: Any) -> dict:
    if isinstance(msg, dict):
        return msg
    dump = getattr(msg, "model_dump", None) or getattr(msg, "dict", None)
    return dump() if dump else {}


class _Frame:
    """One pushed frame, and where it sits in the current connection's audio clock."""

    __slots__ = ("pcm", "t_ms", "conn", "start_s", "end_s", "voiced")

    def __init__(self, pcm: bytes, t_ms: float, voiced: bool = False) -> None:
        self.pcm, self.t_ms, self.voiced = pcm, t_ms, voiced
        self.conn, self.start_s, self.end_s = -1, 0.0, 0.0


_FINALIZE, _CLOSE, _RECONNECT = object(), object(), object()
#: at most this many queued frames (20 ms each) go out as one message
MAX_FRAMES_PER_SEND = 50
_END = object()

#: silence (on our own gate) after which a new speech start may be reported
REANNOUNCE_SILENCE_MS = 300.0
#: silence that withdraws a tentative onset (a click, a cough)
DISCARD_SILENCE_MS = 100.0


class DeepgramListener(Listener):
    """A live ``/v1/listen`` session fed with the mic frames.

    ``push(pcm, t_ms)``: ``t_ms`` is the monotonic ms at which the frame's last sample
    was captured/received (the clock of :mod:`voiceclaw_app.pipeline.timing`).
    ``vad``: an optional ``pcm16 -> bool`` speech detector (e.g. the server's Silero
    VAD); it gates what is streamed and, being local, reports a tentative barge-in
    after ``vad_onset_ms`` of voice and a confirmed one after ``vad_min_speech_ms``
    (or Deepgram's ``SpeechStarted``, whichever is first). Without it a cheap energy
    gate is used for streaming decisions only. If the VAD fails (its helper process
    died), the energy gate takes over for the rest of the session.
    """

    name = "deepgram"

    def __init__(
        self,
        *,
        api_key: str,
        url: str | None = None,
        options: DeepgramOptions | None = None,
        hands_free: bool = True,
        vad: Callable[[bytes], bool] | None = None,
        energy_threshold: float = 100.0,
        silence_stream_ms: float | None = None,
        preroll_ms: float = 300.0,
        keepalive_s: float = 4.0,
        max_reconnects: int = 3,
        connect_timeout_s: float = 5.0,
        finalize_timeout_s: float = 2.0,
        replay_limit_s: float = 30.0,
        vad_min_speech_ms: float = 60.0,
        vad_onset_ms: float = 64.0,
        start_retries: int = 2,
        start_backoff_s: tuple[float, ...] = (0.25, 0.75),
        watchdog_s: float = 6.0,
        recover_backoff_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0),
        max_silent_reconnects: int = 1,
    ):
        self._api_key = str(api_key or "")
        self.url = url or deepgram_url_from_env()
        self.options = options or DeepgramOptions()
        self.hands_free = hands_free
        self.vad = vad
        self.energy_threshold = energy_threshold
        # keep streaming long enough after speech for speech_final and UtteranceEnd to arrive
        self.silence_stream_ms = silence_stream_ms if silence_stream_ms is not None else max(self.options.endpointing_ms, self.options.utterance_end_ms) + 500.0
        self.preroll_frames = max(1, int(preroll_ms / 20))
        self.keepalive_s = keepalive_s
        self.max_reconnects = max_reconnects
        self.connect_timeout_s = connect_timeout_s
        self.finalize_timeout_s = finalize_timeout_s
        self.replay_limit_s = replay_limit_s
        self.vad_min_ms = max(20.0, float(vad_min_speech_ms))
        self.vad_onset_ms = max(20.0, min(float(vad_onset_ms), self.vad_min_ms))
        self.start_retries = start_retries
        self.start_backoff_s = start_backoff_s
        self.watchdog_s = watchdog_s
        #: watchdog reconnects in a row with no word from the service before it counts as down
        self.max_silent_reconnects = max_silent_reconnects
        self._silent_reconnects = 0
        self.recover_backoff_s = recover_backoff_s
        # local end of turn after a reconnect with final words pending (the new socket never heard them)
        self.local_endpoint_ms = float(self.options.endpointing_ms if self.options.endpointing_ms > 0 else self.options.utterance_end_ms)
        # ... and a last-resort one if neither speech_final nor UtteranceEnd ever comes
        self.safety_endpoint_ms = float(self.options.utterance_end_ms) + 1500.0

        self._events: asyncio.Queue = asyncio.Queue()
        self._q: asyncio.Queue = asyncio.Queue()  # frames and control items for the writer
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()
        self.failed: ProviderError | None = None
        self._sock: Any = None
        self._stack: contextlib.AsyncExitStack | None = None
        self._conn_id = 0
        self._conn_audio_s = 0.0
        self._reader_task: asyncio.Task | None = None
        self._writer_task: asyncio.Task | None = None
        self._finalize_timer: asyncio.Task | None = None
        self._recover_task: asyncio.Task | None = None
        self._last_send = 0.0
        self._awaiting_since: float | None = None  # first voiced frame sent since the server's last message
        # audio bookkeeping
        self._unfinal: deque[_Frame] = deque()  # sent, not yet covered by an is_final result
        self._recent: deque[_Frame] = deque(maxlen=3000)  # for mapping audio seconds -> t_ms
        self._preroll: deque[tuple[bytes, float]] = deque(maxlen=self.preroll_frames)
        self._held: deque[tuple[bytes, float]] = deque(maxlen=max(1, int(replay_limit_s / 0.02)))  # frames while failed
        self._last_voiced_t = -math.inf
        self._voiced_ms = 0.0  # voice since the current onset
        self._unvoiced_ms = 0.0  # silence since the last voiced frame
        # barge-in state: None (may report a start), "tentative", "confirmed"
        self._barge: str | None = None
        self._barge_floor = -math.inf  # Deepgram SpeechStarted before this (stale) is ignored
        #: (kind, monotonic ms) when the local gate's voice reached the onset / the minimum
        #: speech length, whether or not it was reported (Deepgram may have been first): the benchmark
        self.vad_marks: deque[tuple[str, float]] = deque(maxlen=64)
        # transcript state of the current turn
        self._finals: list[str] = []
        self._interim = ""
        self._speech_end_ms: float | None = None
        self._finalizing = False
        self._finalize_sent = False  # the Finalize of this release reached a socket
        self._endpoint_armed = False  # local endpoint timer after a reconnect
        self._recover_attempt = 0
        self._recover_at = 0.0
        # counters for tests and the benchmark
        self.stats = {"frames_pushed": 0, "frames_sent": 0, "keepalives": 0, "reconnects": 0, "replayed_frames": 0,
                      "watchdog_reconnects": 0, "local_endpoints": 0, "start_attempts": 0, "recoveries": 0,
                      "vad_calls": 0, "vad_ms": 0.0, "vad_max_ms": 0.0, "sends": 0}

    @classmethod
    def from_settings(cls, settings, keys, **kw) -> "DeepgramListener":
        opts = DeepgramOptions(language=(settings.stt_language or "en"), endpointing_ms=int(settings.vad_silence_ms), utterance_end_ms=max(1000, int(settings.vad_silence_ms) + 500))
        # the initial mode; the mic session calls set_hands_free at build time and on every change
        kw.setdefault("hands_free", settings.input_mode == "hands_free")
        kw.setdefault("vad_min_speech_ms", float(getattr(settings, "vad_min_speech_ms", 60.0)))
        return cls(api_key=keys.deepgram_api_key, options=opts, **kw)

    def __repr__(self) -> str:
        return f"DeepgramListener(url={self.url!r}, model={self.options.model!r})"

    def set_hands_free(self, hands_free: bool) -> None:
        """Read on every frame and every result: takes effect at once, mid-session too."""
        self.hands_free = bool(hands_free)

    # ------------------------------------------------------------ connection
    async def start(self) -> None:
        """Open the socket now (session start), retrying 429/5xx/network failures a
        couple of times with backoff. Raises :class:`ProviderError` (e.g. a bad key)."""
        if self._started:
            return
        if not self._api_key and urlsplit(self.url).netloc.endswith("deepgram.com"):
            raise AuthError("No Deepgram API key is set: add it on the settings page or set DEEPGRAM_API_KEY.")
        self._started = True
        try:
            await self._connect_with_retry(self.start_retries)
        except BaseException:
            self._started = False
            raise
        self._writer_task = asyncio.create_task(self._writer(), name="deepgram-writer")

    async def _connect_with_retry(self, retries: int) -> None:
        attempt = 0
        while True:
            self.stats["start_attempts"] += 1
            try:
                await self._connect()
                return
            except ProviderError as exc:
                if not exc.retryable or attempt >= retries or self._closing:
                    raise
                delay = self.start_backoff_s[min(attempt, len(self.start_backoff_s) - 1)] if self.start_backoff_s else 0.0
                if exc.retry_after_s is not None:
                    delay = max(delay, min(exc.retry_after_s, 2.0))
                log.info("Deepgram connect failed (%s); retry %d in %.2fs", exc.kind, attempt + 1, delay)
                attempt += 1
                await asyncio.sleep(delay)

    def _socket_cm(self):
        """The SDK's connect context manager for this listener's endpoint (``/v1/listen``)."""
        return _client(self._api_key, self.url).listen.v1.connect(**self.options.query())

    async def _send_finalize(self) -> None:
        """Ask the service to finish the utterance now (v1: ``Finalize``)."""
        await self._sock.send_finalize()

    async def _send_keepalive(self) -> None:
        await self._sock.send_keep_alive()

    async def _connect(self) -> None:
        stack = contextlib.AsyncExitStack()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                sock = await stack.enter_async_context(self._socket_cm())
        except BaseException as exc:
            await stack.aclose()
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise map_error(exc) from exc
        self._stack, self._sock = stack, sock
        self._conn_id += 1
        self._conn_audio_s = 0.0
        self._last_send = time.monotonic()
        self._awaiting_since = None
        self._reader_task = asyncio.create_task(self._reader(sock, self._conn_id), name="deepgram-reader")

    async def _drop_connection(self) -> None:
        reader, self._reader_task = self._reader_task, None
        if reader is not None and reader is not asyncio.current_task() and not reader.done():
            reader.cancel()
        stack, self._stack, self._sock = self._stack, None, None
        if stack is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await stack.aclose()

    async def _reconnect(self) -> None:
        """New socket, then replay the audio no final result covered yet."""
        await self._drop_connection()
        delays = (0.05, 0.3, 1.0, 2.0)
        last: ProviderError | None = None
        for attempt in range(self.max_reconnects):
            await asyncio.sleep(delays[min(attempt, len(delays) - 1)])
            try:
                await self._connect()
            except ProviderError as exc:
                last = exc
                if not exc.retryable:
                    break
                continue
            self.stats["reconnects"] += 1
            self._interim = ""
            frames = list(self._unfinal)
            self._unfinal.clear()
            log.info("Deepgram socket reconnected; replaying %d frames", len(frames))
            for f in frames:
                await self._send_frame(f)
            self.stats["replayed_frames"] += len(frames)
            if self._finalizing and self._finalize_sent:
                # the Finalize sent on the old socket was lost with it: ask again (one
                # still queued goes out after the frames queued before it)
                await self._send_finalize()
            elif self._finals:
                # the new socket never heard the words already final: it will not end
                # that turn. End it locally after the endpointing silence.
                self._endpoint_armed = True
            return
        raise last or StreamDropped(f"The connection to the {SERVICE} dropped and could not be re-opened.")

    # ------------------------------------------------------------ writer
    async def _send_frame(self, f: _Frame) -> None:
        await self._send_frames([f])

    async def _send_frames(self, frames: list[_Frame]) -> None:
        """The frames as one binary message (Deepgram takes audio in chunks of any size).

        Why batch: each send is a few trips round the event loop. When a busy worker's
        loop takes tens of ms per turn, one send per 20 ms frame cannot keep up and the
        recognizer hears the audio seconds late (the 50-session load bench); whatever
        has queued meanwhile goes out at once instead."""
        rate = self.options.sample_rate
        for f in frames:
            dur = len(f.pcm) / 2 / rate
            f.conn, f.start_s, f.end_s = self._conn_id, self._conn_audio_s, self._conn_audio_s + dur
            self._conn_audio_s += dur
            self._unfinal.append(f)
            self._recent.append(f)
        last = frames[-1]
        while self._unfinal and last.end_s - self._unfinal[0].end_s > self.replay_limit_s:
            self._unfinal.popleft()
        await self._sock.send_media(frames[0].pcm if len(frames) == 1 else b"".join(f.pcm for f in frames))
        self._last_send = time.monotonic()
        if self._awaiting_since is None and any(f.voiced for f in frames):
            self._awaiting_since = self._last_send
        self.stats["frames_sent"] += len(frames)
        self.stats["sends"] += 1

    def _watchdog_due(self) -> bool:
        return self._awaiting_since is not None and self.watchdog_s > 0 and time.monotonic() - self._awaiting_since >= self.watchdog_s

    async def _writer(self) -> None:
        """The only coroutine that writes to the socket (keeps frame order across reconnects)."""
        tick = max(0.05, min(0.5, self.keepalive_s / 2, self.watchdog_s / 4 if self.watchdog_s > 0 else 0.5))
        try:
            held = None  # an item taken while gathering frames, handled next
            while True:
                if held is not None:
                    item, held = held, None
                elif not self._q.empty():
                    item = self._q.get_nowait()  # no wait_for (on 3.11 a task per call)
                else:
                    try:
                        item = await asyncio.wait_for(self._q.get(), tick)
                    except asyncio.TimeoutError:
                        item = None
                batch = [item] if isinstance(item, _Frame) else None
                while batch is not None and len(batch) < MAX_FRAMES_PER_SEND and not self._q.empty():
                    nxt = self._q.get_nowait()
                    if not isinstance(nxt, _Frame):
                        held = nxt
                        break
                    batch.append(nxt)
                try:
                    if item is _RECONNECT:
                        if not self._reader_alive():
                            await self._reconnect()
                        continue
                    if self._sock is None or not self._reader_alive():
                        await self._reconnect()
                    elif self._watchdog_due():
                        self._silent_reconnects += 1
                        if self._silent_reconnects > self.max_silent_reconnects:
                            # a fresh socket stayed as silent as the old one: the service is
                            # not answering. Reconnecting for ever would leave the person
                            # talking to nothing, unaware: fail (a notice), recover later.
                            raise ProviderTimeout(f"The {SERVICE} stopped answering.", retryable=True)
                        log.info("Deepgram sent nothing for %.1fs of voiced audio; reconnecting", self.watchdog_s)
                        self.stats["watchdog_reconnects"] += 1
                        await self._reconnect()
                    if item is _CLOSE:
                        await self._sock.send_close_stream()
                        return
                    if item is _FINALIZE:
                        await self._send_finalize()
                        self._finalize_sent = True
                        self._last_send = time.monotonic()
                    elif batch is not None:
                        await self._send_frames(batch)
                    elif time.monotonic() - self._last_send >= self.keepalive_s:
                        await self._send_keepalive()
                        self._last_send = time.monotonic()
                        self.stats["keepalives"] += 1
                except ProviderError:
                    raise
                except Exception as exc:  # the socket died under a send: reconnect and replay
                    if self._closing and item is _CLOSE:
                        return
                    log.info("Deepgram send failed (%s); reconnecting", type(exc).__name__)
                    await self._reconnect()
                    if item is _FINALIZE and not self._finalize_sent:
                        await self._send_finalize()
                        self._finalize_sent = True
        except ProviderError as exc:
            self._fail(exc)
        except asyncio.CancelledError:
            raise

    def _reader_alive(self) -> bool:
        return self._reader_task is not None and not self._reader_task.done()

    def _fail(self, exc: ProviderError) -> None:
        """The socket cannot be (re)opened: say so, keep listening (see :meth:`_maybe_recover`)."""
        if self.failed is None and not self._closing:
            self.failed = exc
            log.warning("Deepgram session failed: %s", exc.user_message)
            self._events.put_nowait(ListenNotice(exc.user_message, kind="error"))
            # words already final are the user's: end that turn with them
            if self._finals:
                self._end_turn()
            self._finalizing = False
            self._held.clear()
            self._recover_attempt = 0
            self._silent_reconnects = 0
            first = 30.0 if exc.kind == "auth" else (self.recover_backoff_s[0] if self.recover_backoff_s else 1.0)
            self._recover_at = time.monotonic() + first

    def _maybe_recover(self, voiced: bool) -> None:
        """After a failure, the next voiced frame past the backoff reopens the socket."""
        if not voiced or self._recover_task is not None or self._closing or time.monotonic() < self._recover_at:
            return
        self._recover_task = asyncio.create_task(self._recover(), name="deepgram-recover")

    async def _recover(self) -> None:
        try:
            await self._drop_connection()
            if self._writer_task is not None and not self._writer_task.done():
                self._writer_task.cancel()
                with contextlib.suppress(BaseException):
                    await self._writer_task
            try:
                await self._connect_with_retry(0)
            except ProviderError as exc:
                self._recover_attempt += 1
                backoff = self.recover_backoff_s[min(self._recover_attempt, len(self.recover_backoff_s) - 1)] if self.recover_backoff_s else 5.0
                self._recover_at = time.monotonic() + (max(backoff, 30.0) if exc.kind == "auth" else backoff)
                log.info("Deepgram still unavailable (%s); next try in %.0fs", exc.kind, backoff)
                return
            if self._closing:
                return
            self._unfinal.clear()
            self._q = asyncio.Queue()
            for pcm, t in self._held:  # what the user said while the socket was down
                self._q.put_nowait(_Frame(pcm, t, voiced=True))
            self._held.clear()
            self.failed = None
            self.stats["recoveries"] += 1
            self._writer_task = asyncio.create_task(self._writer(), name="deepgram-writer")
            self._events.put_nowait(ListenNotice(f"The {SERVICE} is back.", kind="info"))
        finally:
            self._recover_task = None

    # ------------------------------------------------------------ reader
    async def _reader(self, sock, conn_id: int) -> None:
        try:
            while True:
                msg = await sock.recv()
                if isinstance(msg, (bytes, bytearray)):
                    continue
                if conn_id == self._conn_id:
                    self._awaiting_since = None
                    self._silent_reconnects = 0
                self._handle(_as_dict(msg), conn_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._closing:
                self._closed.set()
                return
            log.info("Deepgram socket ended (%s)", type(exc).__name__)
            if conn_id == self._conn_id:
                self._q.put_nowait(_RECONNECT)

    def _t_of(self, audio_s: float, conn_id: int) -> float | None:
        """Monotonic ms of a point in a connection's audio timeline."""
        for f in reversed(self._recent):
            if f.conn != conn_id:
                continue
            if f.start_s - 1e-6 <= audio_s <= f.end_s + 1e-6 or audio_s > f.end_s:
                return f.t_ms - max(0.0, f.end_s - audio_s) * 1000.0 + max(0.0, audio_s - f.end_s) * 1000.0
        return None

    def _handle(self, m: dict, conn_id: int) -> None:
        kind = m.get("type")
        if kind == "Results":
            self._on_results(m, conn_id)
        elif kind == "SpeechStarted":
            t = self._t_of(float(m.get("timestamp") or 0.0), conn_id)
            t = t if t is not None else now_ms()
            if self._barge == "confirmed" or (self._barge is None and t < self._barge_floor):
                return  # already reported, or an onset from before the silence that re-armed us
            self._barge = "confirmed"  # Deepgram's VAD heard speech: that is a confirmed start
            self._events.put_nowait(SpeechStarted(t_ms=t, source="stt"))
        elif kind == "UtteranceEnd":
            if self._finals and self.hands_free:
                self._end_turn()
        elif kind == "Metadata":
            self._closed.set()
        elif kind == "Error":
            log.warning("Deepgram error message: %s", str(m.get("description", ""))[:200])

    def _on_results(self, m: dict, conn_id: int) -> None:
        alts = (m.get("channel") or {}).get("alternatives") or [{}]
        alt = alts[0] or {}
        text = (alt.get("transcript") or "").strip()
        is_final = bool(m.get("is_final"))
        if not is_final:
            if text:
                self._interim = text
                self._events.put_nowait(InterimTranscript(" ".join(self._finals + [text])))
            return
        end_s = float(m.get("start") or 0.0) + float(m.get("duration") or 0.0)
        # the audio up to here is final: no need to replay it after a reconnect
        while self._unfinal and self._unfinal[0].conn == conn_id and self._unfinal[0].end_s <= end_s + 1e-6:
            self._unfinal.popleft()
        self._interim = ""
        if text:
            self._finals.append(text)
            words = alt.get("words") or []
            last_end = float(words[-1].get("end", end_s)) if words else end_s
            t = self._t_of(last_end, conn_id)
            self._speech_end_ms = t if t is not None else self._last_voiced_t
        if self._finalizing and m.get("from_finalize"):
            self._end_turn()
        elif m.get("speech_final") and self.hands_free and not self._finalizing:
            # endpointing: the end of turn (in push-to-talk only the release ends it)
            self._end_turn()
        elif text:
            self._events.put_nowait(PreliminaryTranscript(" ".join(self._finals), speech_end_ms=self._speech_end_ms))

    def _end_turn(self, *, with_interim: bool = False) -> None:
        parts = self._finals + ([self._interim] if with_interim and self._interim else [])
        text = " ".join(parts).strip()
        finalizing = self._finalizing
        self._finalizing = False
        self._endpoint_armed = False
        if self._finalize_timer is not None:
            self._finalize_timer.cancel()
            self._finalize_timer = None
        if text:
            t = now_ms()
            end = self._speech_end_ms if self._speech_end_ms is not None else (self._last_voiced_t if self._last_voiced_t > -math.inf else t)
            self._events.put_nowait(EndOfTurn(text=text, speech_end_ms=end, eot_ms=t, stt_final_ms=t))
        elif finalizing:
            self._events.put_nowait(ListenNotice("No speech was recognized.", kind="empty"))
        self._finals, self._interim, self._speech_end_ms = [], "", None
        if self._barge == "confirmed":
            self._barge = None
            self._barge_floor = self._last_voiced_t

    # ------------------------------------------------------------ Listener API
    def _voiced(self, pcm16: bytes) -> bool:
        vad = self.vad
        if vad is not None:
            t0 = time.perf_counter()
            try:
                return bool(vad(pcm16))
            except Exception as exc:  # EngineUnavailable: the VAD helper died; never kill the mic
                log.warning("server VAD failed (%s: %s); using the energy gate for this session", type(exc).__name__, getattr(exc, "user_message", exc))
                self.vad = None
                close = getattr(vad, "close", None)
                if close is not None:
                    with contextlib.suppress(Exception):
                        close()
            finally:
                dt = (time.perf_counter() - t0) * 1000.0
                self.stats["vad_calls"] += 1
                self.stats["vad_ms"] += dt
                if dt > self.stats["vad_max_ms"]:
                    self.stats["vad_max_ms"] = dt
        return rms16(pcm16) > self.energy_threshold

    def _barge_in(self, voiced: bool, frame_ms: float, t_ms: float) -> None:
        """Speech-start reporting from our own gate (see the module notes)."""
        if voiced:
            before = self._voiced_ms
            self._voiced_ms += frame_ms
            self._unvoiced_ms = 0.0
            if self.vad is None:
                return
            for kind, at in (("onset", self.vad_onset_ms), ("confirmed", self.vad_min_ms)):
                if before < at - 1e-6 <= self._voiced_ms:
                    self.vad_marks.append((kind, now_ms()))
            onset_t = t_ms - self._voiced_ms
            if self._barge is None and self._voiced_ms >= self.vad_onset_ms - 1e-6:
                confirmed = self._voiced_ms >= self.vad_min_ms - 1e-6
                self._barge = "confirmed" if confirmed else "tentative"
                self._events.put_nowait(SpeechStarted(t_ms=onset_t, source="vad", tentative=not confirmed))
            elif self._barge == "tentative" and self._voiced_ms >= self.vad_min_ms - 1e-6:
                self._barge = "confirmed"
                self._events.put_nowait(SpeechStarted(t_ms=onset_t, source="vad", tentative=False))
            return
        self._unvoiced_ms += frame_ms
        if self._barge == "tentative" and self._unvoiced_ms >= DISCARD_SILENCE_MS:
            self._barge = None  # too short to be speech: resume playback
            self._barge_floor = self._last_voiced_t
            self._events.put_nowait(SpeechDiscarded(t_ms=t_ms))
        if self._unvoiced_ms >= DISCARD_SILENCE_MS:
            self._voiced_ms = 0.0
        if self._barge == "confirmed" and self._unvoiced_ms >= REANNOUNCE_SILENCE_MS and not self._finals and not self._interim and not self._finalizing:
            # 300 ms of silence, no words pending: the next voice is a new speech start
            # (the session's echo guard may have ignored the last one)
            self._barge = None
            self._barge_floor = self._last_voiced_t

    async def push(self, pcm16: bytes, t_ms: float) -> None:
        if not self._started:
            await self.start()
        if self._closing:
            return
        self.stats["frames_pushed"] += 1
        # A frame inside a stretch that streams anyway (push-to-talk, speech, its
        # silence tail, a Finalize) goes to the sender *before* the gate's verdict:
        # the gate (a round trip to the VAD helper, ~1.5 ms) then only decides
        # barge-in and the end of the stretch, never delays the audio Deepgram hears.
        early = _Frame(pcm16, t_ms) if self.failed is None and self._streaming_stretch(t_ms) else None
        if early is not None:
            self._q.put_nowait(early)
        # the Silero gate is a round trip to the VAD helper process: off the event loop,
        # unless the gate can answer without the model (no full window, or silence)
        quick = getattr(self.vad, "quick", None)
        voiced = quick(pcm16) if quick is not None else None
        if voiced is None:
            voiced = await run_per_frame(self._voiced, pcm16) if self.vad is not None else self._voiced(pcm16)
        frame_ms = len(pcm16) / 2 / self.options.sample_rate * 1000.0
        if self.failed is not None:
            if voiced or self._held:
                self._held.append((pcm16, t_ms))
            if voiced:
                self._last_voiced_t = t_ms
            self._maybe_recover(voiced)
            return
        self._barge_in(voiced, frame_ms, t_ms)
        if voiced:
            if self._last_voiced_t == -math.inf or t_ms - self._last_voiced_t > self.silence_stream_ms:
                for pcm, t in self._preroll:  # the onset just before the gate opened
                    self._q.put_nowait(_Frame(pcm, t))
                self._preroll.clear()
            self._last_voiced_t = t_ms
        elif self.hands_free and self._finals and not self._finalizing:
            silent_ms = t_ms - self._last_voiced_t
            if silent_ms >= (self.local_endpoint_ms if self._endpoint_armed else self.safety_endpoint_ms):
                # the server will not end this turn (a reconnect lost its endpointing
                # state, or it went quiet): Finalize, and its result ends the turn
                log.info("no end of turn from Deepgram after %.0f ms of silence; sending Finalize", silent_ms)
                self.stats["local_endpoints"] += 1
                self._start_finalize()
        streaming = voiced or self._streaming_stretch(t_ms)
        if early is not None:
            early.voiced = voiced  # for the watchdog, if the writer has not sent it yet
        elif streaming:
            self._q.put_nowait(_Frame(pcm16, t_ms, voiced))
        else:
            self._preroll.append((pcm16, t_ms))

    def _streaming_stretch(self, t_ms: float) -> bool:
        """Audio at ``t_ms`` is sent whatever the gate says: push-to-talk, a Finalize
        in progress, or within ``silence_stream_ms`` of the last voiced frame."""
        return (not self.hands_free) or self._finalizing or (t_ms - self._last_voiced_t <= self.silence_stream_ms)

    def events(self) -> AsyncIterator[ListenEvent]:
        return queued_events(self._events, _END)

    def _start_finalize(self) -> None:
        for pcm, t in self._preroll:
            self._q.put_nowait(_Frame(pcm, t))
        self._preroll.clear()
        self._finalizing = True
        self._finalize_sent = False
        self._q.put_nowait(_FINALIZE)
        if self._finalize_timer is not None:
            self._finalize_timer.cancel()
        self._finalize_timer = asyncio.create_task(self._finalize_deadline())

    async def finish_utterance(self) -> None:
        """Push-to-talk released: Finalize now; the ``from_finalize`` result ends the turn."""
        if not self._started or self._closing:
            return
        if self.failed is not None:
            if self._finals:
                self._end_turn()
            return
        self._start_finalize()

    async def _finalize_deadline(self) -> None:
        await asyncio.sleep(self.finalize_timeout_s)
        self._finalize_timer = None
        if self._finalizing:
            log.info("no from_finalize result within %.1fs; ending the turn with what we have", self.finalize_timeout_s)
            self._end_turn(with_interim=True)

    async def aclose(self) -> None:
        """CloseStream (Deepgram flushes and sends Metadata), then close the socket."""
        if self._closing:
            return
        self._closing = True
        if self._finalize_timer is not None:
            self._finalize_timer.cancel()
        if self._recover_task is not None:
            self._recover_task.cancel()
            with contextlib.suppress(BaseException):
                await self._recover_task
        if self._writer_task is not None and not self._writer_task.done() and self.failed is None:
            self._q.put_nowait(_CLOSE)
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(2.0):
                    await self._writer_task
                    await self._closed.wait()
        if self._writer_task is not None:
            self._writer_task.cancel()
        reader = self._reader_task
        if reader is not None:
            reader.cancel()
        close_vad = getattr(self.vad, "close", None)
        if close_vad is not None:
            with contextlib.suppress(Exception):
                await run_per_frame(close_vad)  # after any frame still in the VAD thread
        if reader is not None:
            with contextlib.suppress(BaseException):
                await reader
        await self._drop_connection()
        self._events.put_nowait(_END)


class DeepgramSTT(STT):
    """Pre-recorded ``POST /v1/listen`` for a whole clip: the fallback path when streaming is off."""

    name = "deepgram"
    capabilities = STTCapabilities(streaming=False, interim_results=False)

    def __init__(self, *, api_key: str, url: str | None = None, model: str = "nova-3", smart_format: bool = True, timeout_s: float = 15.0, max_retries: int = 2):
        self._api_key = str(api_key or "")
        self.url = url or deepgram_url_from_env()
        self.model = model
        self.smart_format = smart_format
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self._dg = None

    def __repr__(self) -> str:
        return f"DeepgramSTT(url={self.url!r}, model={self.model!r})"

    @classmethod
    def from_settings(cls, settings, keys, **kw) -> "DeepgramSTT":
        return cls(api_key=keys.deepgram_api_key, **kw)

    async def transcribe(self, pcm16: bytes, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None, score_words: bool = False) -> Transcript:
        if not self._api_key and urlsplit(self.url).netloc.endswith("deepgram.com"):
            raise AuthError("No Deepgram API key is set: add it on the settings page or set DEEPGRAM_API_KEY.")
        if self._dg is None:
            self._dg = _client(self._api_key, self.url)
        wav = AudioClip.from_pcm16(pcm16, sample_rate).wav
        attempt = 0
        while True:
            try:
                async with asyncio.timeout(self.timeout_s):
                    resp = await self._dg.listen.v1.media.transcribe_file(
                        request=wav, model=self.model, language=language, smart_format=self.smart_format,
                        request_options={"timeout": self.timeout_s, "max_retries": 0},
                    )
                break
            except BaseException as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                err = map_error(exc)
                if not err.retryable or attempt >= self.max_retries or (cancel is not None and cancel.cancelled):
                    raise err from exc
                attempt += 1
                await asyncio.sleep(0.2 * attempt)
        data = _as_dict(resp)
        try:
            alt = data["results"]["channels"][0]["alternatives"][0]
        except (KeyError, IndexError, TypeError) as exc:
            raise ProtocolError(f"The {SERVICE} answered without a transcript.") from exc
        return Transcript(text=(alt.get("transcript") or "").strip(), is_final=True, language=language)
