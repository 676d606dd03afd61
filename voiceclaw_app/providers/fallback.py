"""Fall back to the embedded engines when a cloud STT or TTS fails mid-session.

Policy (issue: cloud providers; setting ``fallback_to_local``, on by default):

* **TTS**: the cloud client has already retried what is safe to retry. If a chunk
  still fails, that chunk and the rest of the turn are spoken by the embedded voice
  (a different voice beats silence), and a notice says so. The next turn tries the
  cloud again: :meth:`FallbackTTS.warm` (called when the user starts speaking) resets.
* **STT**: if the Deepgram socket cannot be (re)opened, the session continues on the
  local VAD + Whisper listener; the audio of the utterance in progress is replayed
  into it so the user's words are not lost, and a notice says so. That lasts for the
  rest of the turn: once the local turn has ended (and after a backoff), a fresh
  cloud listener (``primary_factory``) is opened between turns; when it is up the
  session switches back and a notice says so. The input mode (:meth:`set_hands_free`)
  is forwarded to whichever listener is active.
* The LLM never falls back here (finishing a gateway reply with the tiny local model
  would be nonsense).

The local engines are passed as factories (zero-argument callables returning the
engine, or an awaitable of it) so this module does not depend on their classes and
they are only loaded when needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from typing import AsyncIterator, Awaitable, Callable, Union

from .base import (
    AudioClip,
    CancelToken,
    EndOfTurn,
    SpeechDiscarded,
    SpeechStarted,
    Listener,
    ListenEvent,
    ListenNotice,
    ProviderError,
    ReplyStream,
    TTS,
    TTSCapabilities,
    queued_events,
)

log = logging.getLogger("voiceclaw.fallback")

TTSFactory = Callable[[], Union[TTS, Awaitable[TTS]]]
ListenerFactory = Callable[[], Union[Listener, Awaitable[Listener]]]
NoticeCallback = Callable[[str], None]


async def _build(factory: Callable[[], object]) -> object:
    obj = factory()
    if inspect.isawaitable(obj):
        obj = await obj
    return obj


class FallbackTTS(TTS):
    """A cloud TTS that hands over to an embedded one when it fails (for the rest of the turn).

    ``notices`` collects the sentences to show; :meth:`drain_notices` returns and clears
    them (the turn orchestrator turns them into ``TurnNotice`` events) and
    ``on_notice`` is called as well when given.
    """

    def __init__(self, primary: TTS, fallback_factory: TTSFactory, *, enabled: bool = True, on_notice: NoticeCallback | None = None, fallback_voice: str = ""):
        self.primary = primary
        self.fallback_factory = fallback_factory
        self.enabled = enabled
        self.on_notice = on_notice
        self.fallback_voice = fallback_voice
        self.notices: list[str] = []
        self.name = f"{primary.name}+fallback"
        self.capabilities = TTSCapabilities(streaming=primary.capabilities.streaming, sample_rate=primary.capabilities.sample_rate, text_stream=primary.capabilities.text_stream)
        self._fallback: TTS | None = None
        self._fallback_lock = asyncio.Lock()
        self._using_fallback = False
        self.fallbacks = 0  # how many times this instance switched (tests, logs)

    @property
    def using_fallback(self) -> bool:
        return self._using_fallback

    def cache_identity(self, voice: str, speed: float) -> tuple[str, str, float]:
        # Audio from the embedded voice must not be cached under the cloud voice's name.
        if self._using_fallback and self._fallback is not None:
            return self._fallback.cache_identity(self.fallback_voice, speed)
        return self.primary.cache_identity(voice, speed)

    def drain_notices(self) -> list[str]:
        out, self.notices = self.notices, []
        return out

    def new_turn(self) -> None:
        """Try the cloud again (the failure may have been transient)."""
        self._using_fallback = False

    async def _get_fallback(self) -> TTS:
        async with self._fallback_lock:
            if self._fallback is None:
                self._fallback = await _build(self.fallback_factory)  # type: ignore[assignment]
            return self._fallback  # type: ignore[return-value]

    def _notice(self, message: str) -> None:
        self.notices.append(message)
        if self.on_notice is not None:
            try:
                self.on_notice(message)
            except Exception:  # a UI callback must not break synthesis
                log.exception("notice callback failed")

    def _take_over(self, exc: ProviderError, cancel: CancelToken | None) -> None:
        """The cloud failed: re-raise when falling back is off (or the turn is cancelled),
        else switch to the embedded voice for the rest of the turn and say so once."""
        if not self.enabled or (cancel is not None and cancel.cancelled):
            raise exc
        if not self._using_fallback:
            self._using_fallback = True
            self.fallbacks += 1
            log.warning("cloud TTS failed (%s); embedded voice takes over for this turn", exc.kind)
            self._notice(f"{exc.user_message} Using the built-in voice for the rest of this reply.")

    async def synthesize(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        if not self._using_fallback:
            try:
                return await self.primary.synthesize(text, voice=voice, speed=speed, cancel=cancel)
            except ProviderError as exc:
                self._take_over(exc, cancel)
        fallback = await self._get_fallback()
        return await fallback.synthesize(text, voice=self.fallback_voice, speed=speed, cancel=cancel)

    async def synthesize_stream(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AsyncIterator[AudioClip]:
        """Stream from the cloud; on failure the embedded voice takes over. If part of
        this chunk was already handed over, its rest is dropped (repeating its start
        would be heard) and the following chunks use the embedded voice."""
        if not self._using_fallback:
            handed = False
            try:
                async for clip in self.primary.synthesize_stream(text, voice=voice, speed=speed, cancel=cancel):
                    handed = True
                    yield clip
                return
            except ProviderError as exc:
                self._take_over(exc, cancel)
                if handed:
                    return
        fallback = await self._get_fallback()
        yield await fallback.synthesize(text, voice=self.fallback_voice, speed=speed, cancel=cancel)

    async def open_reply(self, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> ReplyStream:
        """The cloud's reply stream. When it cannot open (or the embedded voice already
        took over this turn) this raises, and the scheduler sends the reply's chunks
        one by one through :meth:`synthesize_stream`, which falls back chunk by chunk."""
        if self._using_fallback:
            raise ProviderError("The built-in voice is speaking this reply.", retryable=False)
        try:
            return await self.primary.open_reply(voice=voice, speed=speed, cancel=cancel or CancelToken())
        except ProviderError as exc:
            self._take_over(exc, cancel)
            raise

    async def warm(self) -> None:
        """Speech started: a new turn tries the cloud first; warm its connection."""
        self.new_turn()
        await self.primary.warm()

    async def aclose(self) -> None:
        await self.primary.aclose()
        if self._fallback is not None:
            await self._fallback.aclose()


_END = object()


class FallbackListener(Listener):
    """Deepgram (or any cloud listener) with the embedded listener as a safety net.

    Switches when the primary cannot start (network, service down: not a bad key
    unless ``fallback_on_auth``) or reports a fatal ``ListenNotice(kind="error")``
    mid-session. Audio since the last end of turn is kept (bounded) and replayed into
    the embedded listener, so an utterance in progress survives the switch.

    ``primary_factory`` (optional) builds a fresh, unstarted cloud listener: with it,
    the cloud is tried again between turns (after the fallen-back turn ended, then
    with a growing backoff ``retry_backoff_s``) and the session switches back to it.
    """

    def __init__(self, primary: Listener, fallback_factory: ListenerFactory, *, enabled: bool = True, fallback_on_auth: bool = True, replay_s: float = 30.0, on_notice: NoticeCallback | None = None,
                 primary_factory: ListenerFactory | None = None, retry_backoff_s: tuple[float, ...] = (2.0, 10.0, 30.0, 60.0)):
        self.primary = primary
        self.fallback_factory = fallback_factory
        self.primary_factory = primary_factory
        self.retry_backoff_s = retry_backoff_s
        self.enabled = enabled
        self.fallback_on_auth = fallback_on_auth
        self.on_notice = on_notice
        self.notices: list[str] = []
        self.hands_free = getattr(primary, "hands_free", True)
        self._active: Listener = primary
        self._switched = False
        self.fallbacks = 0  # how many times this session switched to the embedded listener
        self.restores = 0  # how many times it switched back to the cloud
        self._out: asyncio.Queue = asyncio.Queue()
        self._pump: asyncio.Task | None = None
        self._started = False
        self._closing = False
        self._switch_lock = asyncio.Lock()
        #: held while a frame goes to the active listener and while a new listener gets
        #: the replayed utterance: live frames never overtake the replay
        self._push_lock = asyncio.Lock()
        self._frames: deque[tuple[bytes, float]] = deque(maxlen=max(1, int(replay_s / 0.02)))
        self._in_turn = False  # the active listener reported speech that has not ended yet
        self._turn_pending = False  # switched: the embedded listener's first turn has not ended yet
        self._retry_at: float | None = None
        self._retry_attempt = 0
        self._retry_task: asyncio.Task | None = None

    @property
    def active(self) -> Listener:
        return self._active

    @property
    def switched(self) -> bool:
        """On the embedded listener now."""
        return self._switched

    def set_hands_free(self, hands_free: bool) -> None:
        self.hands_free = bool(hands_free)
        self._active.set_hands_free(self.hands_free)

    def _notify(self, msg: str, kind: str) -> None:
        self.notices.append(msg)
        if self.on_notice is not None:
            with contextlib.suppress(Exception):
                self.on_notice(msg)
        self._out.put_nowait(ListenNotice(msg, kind=kind))

    async def start(self) -> None:
        """Open the primary now (session start); on failure, start the embedded listener."""
        if self._started:
            return
        self._started = True
        self.primary.set_hands_free(self.hands_free)
        start = getattr(self.primary, "start", None)
        try:
            if start is not None:
                await start()
        except ProviderError as exc:
            if not self.enabled or (exc.kind == "auth" and not self.fallback_on_auth):
                self._started = False
                raise
            await self._switch(exc.user_message)
            return
        self._pump = asyncio.create_task(self._pump_from(self.primary))

    async def _switch(self, reason: str) -> None:
        async with self._switch_lock:
            if self._switched or self._closing:
                return
            self._switched = True
            self.fallbacks += 1
            log.warning("cloud listener failed (%s); switching to the embedded listener", reason)
            old = self._active
            fallback: Listener = await _build(self.fallback_factory)  # type: ignore[assignment]
            fallback.set_hands_free(self.hands_free)
            start = getattr(fallback, "start", None)
            if start is not None:
                await start()
            async with self._push_lock:
                self._active = fallback
                self._turn_pending = True
                self._notify(f"{reason} Using the built-in speech recognition for now.", "fallback")
                for pcm, t in list(self._frames):  # the utterance in progress
                    await fallback.push(pcm, t)
            self._pump = asyncio.create_task(self._pump_from(fallback))
            self._schedule_retry()
            if old is not fallback:
                with contextlib.suppress(Exception):
                    await old.aclose()

    # ---- back to the cloud, between turns
    def _schedule_retry(self) -> None:
        if self.primary_factory is None or not self.retry_backoff_s:
            self._retry_at = None
            return
        delay = self.retry_backoff_s[min(self._retry_attempt, len(self.retry_backoff_s) - 1)]
        self._retry_at = time.monotonic() + delay

    def _maybe_retry_primary(self) -> None:
        if (self._switched and self._retry_at is not None and self._retry_task is None and not self._in_turn and not self._turn_pending
                and not self._closing and time.monotonic() >= self._retry_at):
            self._retry_task = asyncio.create_task(self._retry_primary())

    async def _retry_primary(self) -> None:
        try:
            new: Listener = await _build(self.primary_factory)  # type: ignore[arg-type]
            new.set_hands_free(self.hands_free)
            start = getattr(new, "start", None)
            try:
                if start is not None:
                    await start()
            except ProviderError as exc:
                with contextlib.suppress(Exception):
                    await new.aclose()  # frees its VAD context in the helper process
                self._retry_attempt += 1
                self._schedule_retry()
                log.info("cloud listener still unavailable (%s); staying on the embedded listener", exc.kind)
                return
            async with self._switch_lock:
                if self._closing or not self._switched or self._in_turn or self._turn_pending:
                    # the user started talking meanwhile: never switch inside a turn
                    with contextlib.suppress(Exception):
                        await new.aclose()
                    self._retry_at = time.monotonic()
                    return
                async with self._push_lock:
                    old = self._active
                    self.primary = new
                    self._active = new
                    self._switched = False
                    self._retry_at = None
                    self._retry_attempt = 0
                    self.restores += 1
                    if self._pump is not None:
                        self._pump.cancel()
                    self._pump = asyncio.create_task(self._pump_from(new))
                    for pcm, t in list(self._frames)[-50:]:  # the last second: an onset in progress
                        await new.push(pcm, t)
                log.info("cloud listener is back")
                self._notify("Cloud speech recognition is back.", "info")
                with contextlib.suppress(Exception):
                    await old.aclose()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("re-opening the cloud listener failed")
            self._retry_attempt += 1
            self._schedule_retry()
        finally:
            self._retry_task = None

    async def _pump_from(self, listener: Listener) -> None:
        try:
            async for ev in listener.events():
                if listener is not self._active:
                    return
                if isinstance(ev, ListenNotice) and ev.kind == "error" and listener is self.primary and self.enabled and not self._closing:
                    asyncio.create_task(self._switch(ev.message))
                    return
                if isinstance(ev, SpeechStarted):
                    self._in_turn = True
                elif isinstance(ev, (EndOfTurn, SpeechDiscarded)) or (isinstance(ev, ListenNotice) and ev.kind in ("empty", "error")):
                    self._in_turn = False
                    if not isinstance(ev, SpeechDiscarded):
                        self._turn_pending = False
                if isinstance(ev, EndOfTurn):
                    self._frames.clear()
                self._out.put_nowait(ev)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if listener is self.primary and self.enabled and not self._closing:
                asyncio.create_task(self._switch(getattr(exc, "user_message", None) or "Cloud speech recognition failed."))
                return
            self._out.put_nowait(ListenNotice(f"Listening failed: {exc}", kind="error"))
        if listener is self._active:  # the active listener ended (closed): so do we
            self._out.put_nowait(_END)

    async def push(self, pcm16: bytes, t_ms: float) -> None:
        if not self._started:
            await self.start()
        async with self._push_lock:
            self._frames.append((pcm16, t_ms))
            if self._switched:
                self._maybe_retry_primary()
            await self._active.push(pcm16, t_ms)

    def events(self) -> AsyncIterator[ListenEvent]:
        return queued_events(self._out, _END)

    async def finish_utterance(self) -> None:
        await self._active.finish_utterance()

    async def aclose(self) -> None:
        self._closing = True
        if self._retry_task is not None:
            self._retry_task.cancel()
            with contextlib.suppress(BaseException):
                await self._retry_task
        await self._active.aclose()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(BaseException):
                await self._pump
        self._out.put_nowait(_END)
