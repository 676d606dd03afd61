"""One interface per capability (STT, LLM, TTS), LiveKit-style.

Providers live one per file next to this module and implement these classes; the
pipeline depends only on this module. Nothing here imports Reflex, httpx or a model
runtime, so the pipeline can be tested with any provider that speaks these types.

Errors are typed (:class:`ProviderError` and subclasses) and carry ``user_message``:
the sentence a person sees or hears when the turn fails.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import contextlib
import io
import logging
import threading
import wave
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal


# ---------------------------------------------------------------- cancellation
class CancelToken:
    """A cancel flag shared between the event loop and worker threads.

    ``asyncio`` cancellation cannot interrupt a thread running a model; code in a
    thread checks :attr:`cancelled` at each token or chunk boundary instead.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []

    def cancel(self) -> None:
        with self._lock:
            self._event.set()
            waiters, self._waiters = self._waiters, []
        for loop, fut in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                loop.call_soon_threadsafe(_resolve, fut)

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        """Return once cancelled, whichever thread cancels: the event loop's side of
        the token (e.g. a turn waiting for its first token wakes at once)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._lock:
            if self._event.is_set():
                return
            self._waiters.append((loop, fut))
        try:
            await fut
        finally:
            with self._lock, contextlib.suppress(ValueError):
                self._waiters.remove((loop, fut))


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


# ---------------------------------------------------------------- short blocking calls
_FRAME_EXECUTOR: "concurrent.futures.ThreadPoolExecutor | None" = None
_FRAME_EXECUTOR_LOCK = threading.Lock()


async def run_per_frame(fn, *args):
    """Run a short blocking per-frame call (a VAD round trip to its helper process)
    off the event loop, on one dedicated thread.

    Why not ``asyncio.to_thread``: the default executor also runs Whisper, Gemma and
    Piper calls that take hundreds of ms; a frame's VAD must not queue behind them.
    One thread keeps the calls in order (they are awaited one frame at a time)."""
    global _FRAME_EXECUTOR
    if _FRAME_EXECUTOR is None:
        with _FRAME_EXECUTOR_LOCK:
            if _FRAME_EXECUTOR is None:
                _FRAME_EXECUTOR = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vad-frames")
    return await asyncio.get_running_loop().run_in_executor(_FRAME_EXECUTOR, fn, *args)


# ---------------------------------------------------------------- errors
ErrorKind = Literal["auth", "not_found", "rate_limit", "server", "timeout", "connect", "dropped", "protocol", "bad_request", "engine"]


class ProviderError(Exception):
    """A provider failure with a sentence a person understands.

    ``retryable`` says whether trying again *before anything was shown or spoken*
    can help (rate limits, 5xx, connection failures); never after.
    """

    kind: ErrorKind = "protocol"

    def __init__(self, user_message: str, *, status: int | None = None, retryable: bool = False, retry_after_s: float | None = None, detail: str = ""):
        super().__init__(user_message)
        self.user_message = user_message
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.detail = detail


class AuthError(ProviderError):
    kind = "auth"


class NotFoundError(ProviderError):
    kind = "not_found"


class BadRequestError(ProviderError):
    kind = "bad_request"


class RateLimitError(ProviderError):
    kind = "rate_limit"


class ServerError(ProviderError):
    kind = "server"


class ProviderTimeout(ProviderError):
    kind = "timeout"


class ConnectError(ProviderError):
    kind = "connect"


class StreamDropped(ProviderError):
    kind = "dropped"


class ProtocolError(ProviderError):
    kind = "protocol"


class EngineUnavailable(ProviderError):
    """An embedded engine could not load (missing or corrupt model files)."""

    kind = "engine"


def error_for_status(service: str, status: int, detail: str = "", retry_after_s: float | None = None) -> ProviderError:
    """Map an HTTP status to a typed error with a plain-words message."""
    if status in (401, 403):
        return AuthError(f"The {service} rejected the API key (HTTP {status}).", status=status, detail=detail)
    if status == 404:
        return NotFoundError(f"The {service} was not found at that address (HTTP 404): check the base URL and model.", status=status, detail=detail)
    if status == 429:
        return RateLimitError(f"The {service} is rate-limiting requests (HTTP 429); try again in a moment.", status=status, retryable=True, retry_after_s=retry_after_s, detail=detail)
    if status >= 500:
        return ServerError(f"The {service} had an internal error (HTTP {status}).", status=status, retryable=True, retry_after_s=retry_after_s, detail=detail)
    if 400 <= status < 500:
        extra = f": {detail[:200]}" if detail else ""
        return BadRequestError(f"The {service} refused the request (HTTP {status}){extra}.", status=status, detail=detail)
    return ProtocolError(f"The {service} answered with an unexpected HTTP {status}.", status=status, detail=detail)


# ---------------------------------------------------------------- LLM
@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass
class LLMRequest:
    """Everything one completion needs; built while the user is still speaking."""

    messages: list[ChatMessage]
    model: str = ""
    user: str | None = None  # gateway session key (history mode "server")
    headers: dict[str, str] = field(default_factory=dict)
    read_timeout_s: float = 30.0
    max_tokens: int | None = None
    temperature: float | None = None
    #: the settings' ``assistant_name``: embedded base models speak as "<name>:" in a dialogue prompt
    assistant_name: str = ""


@dataclass(frozen=True)
class LLMCapabilities:
    streaming: bool = True
    #: the provider keeps the conversation itself (gateway ``user`` sessions)
    server_history: bool = False


class LLM(abc.ABC):
    """Streams reply text for a chat request."""

    name: str = "llm"
    capabilities = LLMCapabilities()

    @abc.abstractmethod
    def stream(self, request: LLMRequest, cancel: CancelToken) -> AsyncIterator[str]:
        """Yield text deltas as they arrive; raise :class:`ProviderError` on failure.

        A stream that ends after text was produced, for a reason that lost nothing
        (e.g. the gateway's trailing ``error`` event), just ends.
        """

    async def warm(self) -> None:
        """Open/refresh the connection (or load the model) before the turn needs it."""

    async def prefill(self, messages: list[ChatMessage], assistant_name: str = "") -> None:
        """Process the request's prefix (system prompt + history) before the user's
        words are known. Embedded models evaluate it into their cache (with the
        request's ``assistant_name``, part of a dialogue prompt); remote ones have
        nothing to do."""

    async def aclose(self) -> None:
        """Release connections."""


# ---------------------------------------------------------------- TTS
@dataclass(frozen=True)
class AudioClip:
    """A finished chunk of speech as a WAV file's bytes."""

    wav: bytes
    sample_rate: int
    duration_ms: float

    @classmethod
    def from_pcm16(cls, pcm: bytes, sample_rate: int, channels: int = 1) -> "AudioClip":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(channels)
            w.setsampwidth(2)
            w.setframerate(sample_rate)
            w.writeframes(pcm)
        frames = len(pcm) // (2 * channels)
        return cls(buf.getvalue(), sample_rate, 1000.0 * frames / sample_rate)

    def pcm16(self) -> bytes:
        """The clip's samples without the WAV header."""
        with wave.open(io.BytesIO(self.wav), "rb") as w:
            return w.readframes(w.getnframes())

    @classmethod
    def from_wav(cls, data: bytes) -> "AudioClip":
        with wave.open(io.BytesIO(data), "rb") as w:
            rate = w.getframerate()
            frames = w.getnframes()
        return cls(data, rate, 1000.0 * frames / rate if rate else 0.0)


@dataclass(frozen=True)
class TTSCapabilities:
    streaming: bool = False  # returns audio progressively
    sample_rate: int = 24000
    #: takes text over a long-lived socket (:meth:`TTS.open_reply`): the scheduler pushes
    #: a reply's chunks into one stream instead of one request per chunk
    text_stream: bool = False


class FlushWindow:
    """A service's limit on flushes per sliding window (Aura: 20 per 60 s), per socket.

    Why here: the provider knows the limit, the scheduler decides where to flush, and
    both must count the same flushes."""

    def __init__(self, limit: int | None = None, window_s: float = 60.0, clock=None):
        import time as _time

        self.limit = limit
        self.window_s = window_s
        self._clock = clock or _time.monotonic
        self._times: list[float] = []

    def _trim(self) -> None:
        cutoff = self._clock() - self.window_s
        while self._times and self._times[0] <= cutoff:
            self._times.pop(0)

    def left(self) -> int:
        """Flushes still allowed now (a large number when there is no limit)."""
        if self.limit is None:
            return 1 << 30
        self._trim()
        return max(0, self.limit - len(self._times))

    def wait_s(self) -> float:
        """Seconds until one more flush is allowed (0 when one is allowed now)."""
        if self.left() > 0:
            return 0.0
        return max(0.0, self._times[0] + self.window_s - self._clock())

    def used(self) -> None:
        if self.limit is not None:
            self._times.append(self._clock())


@dataclass(frozen=True)
class ReplyAudio:
    """Audio (PCM16 mono at the stream's ``sample_rate``) of flush ``flush_id``; in order."""

    flush_id: int
    pcm16: bytes


@dataclass(frozen=True)
class ReplyFlushed:
    """All audio of flush ``flush_id`` was delivered (Aura ``Flushed``, Realtime
    ``response.done``). ``transcript``: what the service says it read, when it says."""

    flush_id: int
    transcript: str | None = None


ReplyEvent = ReplyAudio | ReplyFlushed


class ReplyStream(abc.ABC):
    """One reply's text in, its audio out, over a provider's long-lived socket.

    Text is pushed as the chunker cuts it (spaces kept: services join the pieces as
    sent); :meth:`flush` asks for the audio of everything pushed since the last flush
    and returns that flush's id; :meth:`events` yields the audio in flush order and a
    :class:`ReplyFlushed` marker per flush; :meth:`clear` (barge-in) drops pending text
    and audio. Failures are raised from :meth:`events` as :class:`ProviderError`.
    """

    sample_rate: int = 24000
    #: the socket's flush limit (shared by the replies it carries); unlimited by default
    flushes: FlushWindow = FlushWindow()
    #: the longest the service may send nothing (no audio, no flush marker) while a
    #: flush's audio is owed; providers set their first-audio timeout here
    stall_timeout_s: float = 10.0

    @abc.abstractmethod
    async def push(self, text: str) -> None:
        """Send text to synthesize (no audio comes before a flush)."""

    @abc.abstractmethod
    async def flush(self) -> int:
        """Synthesize what was pushed since the last flush; returns the flush's id.
        Ids count 0, 1, 2... per reply, so a caller knows the id before audio arrives."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Drop everything not yet delivered (the reply is cancelled)."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[ReplyEvent]:
        """Audio and flush markers in order, until :meth:`aclose`."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """The reply is over: give the socket back (warm) for the next one."""


class QueuedReplyStream(ReplyStream):
    """A reply stream whose socket reader puts audio, flush markers and failures on
    ``self._queue`` (``None`` ends it): :meth:`events` is the same for every provider."""

    _queue: "asyncio.Queue"
    _closed: bool = False

    async def events(self) -> AsyncIterator[ReplyEvent]:
        while not self._closed:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, ProviderError):
                raise item
            yield item


class TTS(abc.ABC):
    """Turns one chunk of speakable text into audio."""

    name: str = "tts"
    capabilities = TTSCapabilities()

    @abc.abstractmethod
    async def synthesize(self, text: str, *, voice: str, speed: float, cancel: CancelToken) -> AudioClip:
        """Return the whole chunk's audio; raise :class:`ProviderError` on failure."""

    async def synthesize_stream(self, text: str, *, voice: str, speed: float, cancel: CancelToken) -> AsyncIterator[AudioClip]:
        """The chunk's audio in playable pieces, the first as early as possible.

        Streaming providers (``capabilities.streaming``) override this so playback can
        start on the first few hundred ms of a chunk instead of waiting for all of
        it; pieces play back to back. The default is one piece: :meth:`synthesize`.
        """
        yield await self.synthesize(text, voice=voice, speed=speed, cancel=cancel)

    async def open_reply(self, *, voice: str, speed: float, cancel: CancelToken) -> ReplyStream:
        """A :class:`ReplyStream` for one reply (providers with ``capabilities.text_stream``).

        Raises :class:`ProviderError` when the socket cannot be opened; the scheduler
        then uses the per-chunk path (:meth:`synthesize_stream`) for that reply."""
        raise NotImplementedError(f"{self.name} takes text per request, not as a stream")

    def drain_notices(self) -> list[str]:
        """Sentences for the user since the last call (e.g. "switched to the built-in voice")."""
        return []

    def cache_identity(self, voice: str, speed: float) -> tuple[str, str, float]:
        """The (provider, voice, speed) part of the TTS cache key."""
        return (self.name, voice, round(speed, 3))

    async def warm(self) -> None:
        """Open the connection or load the voice before it is needed."""

    async def aclose(self) -> None:
        """Release resources."""


# ---------------------------------------------------------------- STT
@dataclass(frozen=True)
class Transcript:
    text: str
    is_final: bool = True
    #: monotonic ms of the last voiced audio when the STT knows it (None: unknown)
    speech_end_ms: float | None = None
    language: str | None = None
    #: the recognizer's own probability of each word, in order (each the lowest of
    #: its tokens'), when it knows them: at a mid-sentence pause Whisper completes the
    #: fragment with words that were never said ("Turn on the lights in *there*."),
    #: and scores them low
    word_probabilities: tuple[float, ...] | None = None
    #: what the recognizer needs to work those probabilities out later, if it can
    #: (:meth:`STT.word_probabilities`); opaque to everyone else
    scoring: Any = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class STTCapabilities:
    streaming: bool = False
    interim_results: bool = False


class STT(abc.ABC):
    """Batch speech-to-text on 16 kHz mono PCM16. Streaming providers add a session API."""

    name: str = "stt"
    capabilities = STTCapabilities()

    @abc.abstractmethod
    async def transcribe(self, pcm16: bytes, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None, score_words: bool = False) -> Transcript:
        """Transcribe a whole utterance. ``score_words``: the caller will ask
        :meth:`word_probabilities` for it (a pause's transcript), so a recognizer may
        prepare them alongside the transcription."""

    async def warm(self) -> None:
        """Load the model or open the connection."""

    async def word_probabilities(self, transcript: Transcript) -> tuple[float, ...] | None:
        """How sure the recognizer is of each of ``transcript``'s words, in order
        (``None``: it cannot tell). Asked only where it matters (a pause's transcript,
        for the end-of-turn verdict, which reads the last ones), so a recognizer may
        work it out then rather than for every transcription."""
        return transcript.word_probabilities

    async def aclose(self) -> None:
        """Release resources."""


@dataclass(frozen=True)
class TurnVerdict:
    """An end-of-turn model's answer for the audio of a turn so far."""

    complete: bool
    probability: float  # of "the speaker is done"
    ms: float  # model time


class TurnAnalyzer(abc.ABC):
    """Decides from the audio (not a fixed silence) whether a pause ends the turn.

    Listeners ask it at a short pause; "complete" ends the turn there, "incomplete"
    keeps listening (up to a ceiling the listener owns)."""

    name: str = "turn"

    @abc.abstractmethod
    async def score(self, pcm16: bytes) -> TurnVerdict:
        """Score the turn's 16 kHz mono PCM16 audio so far, off the event loop."""


class TextTurnAnalyzer(abc.ABC):
    """Decides from the words heard so far whether they make a whole request
    (LiveKit's turn detector: a language model over the transcript)."""

    name: str = "text_turn"

    @abc.abstractmethod
    async def score(self, text: str) -> TurnVerdict:
        """Score the transcript of the turn so far, off the event loop."""


# ---------------------------------------------------------------- streaming listening
@dataclass(frozen=True)
class SpeechStarted:
    """The user started speaking (barge-in trigger). ``t_ms``: monotonic ms of the first voiced audio.

    ``tentative``: a voice onset too short yet to count as speech (``vad_min_speech_ms``):
    it may be a cough or a click, so the session only *pauses* playback (that is
    what keeps barge-in within ~150 ms of the first voiced audio); the turn is
    cancelled by the confirming ``SpeechStarted(tentative=False)``, and playback
    resumes on :class:`SpeechDiscarded`.
    """

    t_ms: float
    source: str = "vad"  # which detector saw it first: "vad" (server) or "stt" (e.g. Deepgram SpeechStarted)
    tentative: bool = False


@dataclass(frozen=True)
class SpeechDiscarded:
    """A tentative onset ended before it counted as speech (a click, a cough): resume playback."""

    t_ms: float


@dataclass(frozen=True)
class InterimTranscript:
    """Words so far, for the live transcript; may change."""

    text: str


@dataclass(frozen=True)
class PreliminaryTranscript:
    """A likely-final transcript before the end of turn is confirmed (short pause,
    Deepgram ``is_final``): listeners may start the LLM preemptively and must drop
    that work if the :class:`EndOfTurn` text differs."""

    text: str
    speech_end_ms: float | None = None


@dataclass(frozen=True)
class EndOfTurn:
    """The user's turn is over: final text and the marks the turn timing starts from."""

    text: str
    speech_end_ms: float  # last voiced audio (contract mark ``speech_end``)
    eot_ms: float  # when the end of turn was decided (``eot_decided``)
    stt_final_ms: float  # when the final transcript was available (``stt_final``)


@dataclass(frozen=True)
class ListenNotice:
    """Something to tell the user that does not end the session (e.g. utterance cut at max length)."""

    message: str
    kind: str = "info"


ListenEvent = SpeechStarted | SpeechDiscarded | InterimTranscript | PreliminaryTranscript | EndOfTurn | ListenNotice


async def queued_events(queue: "asyncio.Queue", end: object) -> AsyncIterator[ListenEvent]:
    """What a listener's :meth:`Listener.events` returns: items of its queue until ``end``."""
    while True:
        ev = await queue.get()
        if ev is end:
            return
        yield ev


class Listener(abc.ABC):
    """A live listening session over the mic stream: VAD + STT (local) or Deepgram.

    The mic WebSocket pushes 16 kHz mono PCM16 frames with their arrival time and
    reads :meth:`events`. One listener per voice session.
    """

    @abc.abstractmethod
    async def push(self, pcm16: bytes, t_ms: float) -> None:
        """Feed one frame (20-40 ms); never blocks the loop for long."""

    @abc.abstractmethod
    def events(self) -> AsyncIterator[ListenEvent]:
        """Events in order, until :meth:`aclose`."""

    async def finish_utterance(self) -> None:
        """Push-to-talk released: end the turn now, whatever the VAD says."""

    def set_hands_free(self, hands_free: bool) -> None:
        """The session's input mode (may change mid-session). Hands-free: the listener
        ends turns itself (VAD silence, Deepgram endpointing). Push-to-talk: a pause
        while the button is held never ends the turn; only :meth:`finish_utterance` does."""
        self.hands_free = hands_free

    hands_free: bool = True

    async def aclose(self) -> None:
        """Stop listening and release resources."""


# ---------------------------------------------------------------- warm sockets (TTS with streamed text)
class WarmSocket(abc.ABC):
    """A provider's long-lived connection, as :class:`WarmSockets` sees it.

    The lifecycle both streamed voices share lives here once: a reader task runs
    :meth:`_read` (the provider's message loop) from :meth:`_start_reader` on; if it
    ends on an error the socket is dead and the reply it carries fails with
    :meth:`_ended_error`; :meth:`close` says goodbye (:meth:`_say_goodbye`), stops the
    reader and closes the transport (:meth:`_close_transport`), each step bounded."""

    #: what the log calls it ("Deepgram speak socket"), and the provider's logger
    label: str = "socket"
    log: logging.Logger = logging.getLogger("voiceclaw.providers")
    reply: Any = None
    _alive: bool = False
    _reader: asyncio.Task | None = None

    @property
    def alive(self) -> bool:
        """Still open and usable (the service may close it at any time)."""
        return self._alive

    def _start_reader(self, name: str) -> None:
        self._alive = True
        self._reader = asyncio.create_task(self._reader_loop(), name=name)

    async def _reader_loop(self) -> None:
        try:
            await self._read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._alive = False
            self.log.info("%s ended (%s)", self.label, type(exc).__name__)
            if self.reply is not None:
                self.reply.fail(self._ended_error(exc))

    @abc.abstractmethod
    async def _read(self) -> None:
        """The message loop: returns or raises when the connection ends."""

    @abc.abstractmethod
    def _ended_error(self, exc: Exception) -> "ProviderError":
        """What the reply in flight fails with when the reader died of ``exc``."""

    async def _say_goodbye(self) -> None:
        """The service's own close message, if it has one (sent before the reader stops)."""

    @abc.abstractmethod
    async def _close_transport(self) -> None:
        """Close the connection itself."""

    async def close(self) -> None:
        """Close it (best effort, never raises)."""
        self._alive = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._say_goodbye()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self._close_transport()


class WarmSockets:
    """One opened socket kept ready so a reply never waits for a handshake.

    :meth:`warm` (the user started speaking) opens one if none is idle; :meth:`take`
    hands the idle one out, waits for one being opened, or opens a new one; a reply
    gives it back when done. A socket the service closed is dropped and the next
    :meth:`warm`/:meth:`take` opens a fresh one (the reconnect). One socket per voice
    session in practice: replies of one session do not overlap (a new one starts
    after the last was cancelled or finished). A provider whose service limits a
    socket (Aura's flush window) passes ``usable`` and a ``max_idle`` of 2: a socket
    whose window is spent rests while the other serves."""

    def __init__(self, open_socket, *, max_idle: int = 1):
        self._open = open_socket
        self.max_idle = max_idle
        self._idle: list[WarmSocket] = []
        self._opening: asyncio.Task | None = None
        self.opened = 0  # sockets opened so far (tests, doctor)
        self._closed = False

    def _live_idle(self, usable=None) -> WarmSocket | None:
        """An idle open socket (that ``usable`` accepts), taken out of the pool."""
        self._idle = [s for s in self._idle if s.alive]
        for sock in reversed(self._idle):
            if usable is None or usable(sock):
                self._idle.remove(sock)
                return sock
        return None

    async def _open_one(self) -> WarmSocket:
        sock = await self._open()
        self.opened += 1
        return sock

    async def warm(self, usable=None) -> None:
        """Have one socket open and idle (that ``usable`` accepts; raises the open's
        :class:`ProviderError`)."""
        if self._closed:
            return
        self._idle = [s for s in self._idle if s.alive]
        if any(usable is None or usable(s) for s in self._idle):
            return
        if self._opening is None or self._opening.done():
            self._opening = asyncio.create_task(self._open_one(), name="tts-socket-open")
        task = self._opening
        sock = await asyncio.shield(task)
        if self._opening is task:
            self._opening = None
            self.give_back(sock)

    async def take(self, usable=None) -> WarmSocket:
        """An idle socket, the one being opened, or a new one. ``usable`` (optional)
        skips idle sockets that cannot serve now (e.g. their flush window is spent):
        they stay in the pool and recover."""
        sock = self._live_idle(usable)
        if sock is not None:
            return sock
        task = self._opening
        if task is not None:
            self._opening = None
            with contextlib.suppress(ProviderError):
                sock = await asyncio.shield(task)
                if sock.alive:
                    return sock
        return await self._open_one()

    def give_back(self, sock: WarmSocket) -> None:
        if sock.alive and not self._closed and len(self._idle) < self.max_idle:
            self._idle.append(sock)
            return
        if sock.alive and not self._closed and self._idle:
            # the pool is full: keep the newest, close the oldest
            self._idle.append(sock)
            sock = self._idle.pop(0)
        task = asyncio.get_running_loop().create_task(sock.close())
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)

    async def aclose(self) -> None:
        self._closed = True
        socks, self._idle = self._idle, []
        if self._opening is not None:
            with contextlib.suppress(BaseException):
                socks.append(await self._opening)
            self._opening = None
        for sock in socks:
            await sock.close()


_BACKGROUND: set = set()


#: a one-chunk reply's first piece (ms of audio), then pieces twice as long as the one before
REPLY_FIRST_PIECE_MS = 300


async def one_flush_reply(tts: TTS, text: str, *, voice: str, speed: float, cancel: CancelToken | None, timeout_s: float, service: str) -> AsyncIterator[AudioClip]:
    """One chunk through a provider's :class:`ReplyStream` (push, one flush): how
    text-stream providers implement :meth:`TTS.synthesize_stream` for the fixed
    phrases, ``doctor`` and the per-chunk fallback. The stream is cleared if the
    caller stops early, so no audio of it reaches the next reply."""
    reply = await tts.open_reply(voice=voice, speed=speed, cancel=cancel or CancelToken())
    done = False
    buf, piece_ms = bytearray(), REPLY_FIRST_PIECE_MS
    rate = reply.sample_rate
    try:
        await reply.push(text.strip())
        await reply.flush()
        events = reply.events().__aiter__()
        while True:
            try:
                async with asyncio.timeout(timeout_s):
                    ev = await events.__anext__()
            except TimeoutError as exc:
                raise ProviderTimeout(f"The {service} sent no audio for {timeout_s:.0f} s.", retryable=True) from exc
            if cancel is not None and cancel.cancelled:
                return
            if isinstance(ev, ReplyFlushed):
                done = True
                if buf:
                    yield AudioClip.from_pcm16(bytes(buf), rate)
                return
            buf += ev.pcm16
            if len(buf) >= 2 * rate * piece_ms // 1000:
                cut = len(buf) & ~1
                piece, buf = bytes(buf[:cut]), buf[cut:]
                piece_ms *= 2
                yield AudioClip.from_pcm16(piece, rate)
    finally:
        if not done:
            await reply.clear()
        await reply.aclose()


async def whole_clip(tts: TTS, text: str, *, voice: str, speed: float, cancel: CancelToken | None, service: str) -> AudioClip:
    """:meth:`TTS.synthesize` from :meth:`TTS.synthesize_stream`: the pieces joined."""
    clips = [c async for c in tts.synthesize_stream(text, voice=voice, speed=speed, cancel=cancel)]
    if not clips and not (cancel is not None and cancel.cancelled):
        raise ProtocolError(f"The {service} sent no audio for the text.")
    rate = clips[0].sample_rate if clips else tts.capabilities.sample_rate
    return AudioClip.from_pcm16(b"".join(c.pcm16() for c in clips), rate)
