"""VoiceSession: one per voice connection (a tab's ``/ws/voice``), all of a turn in one place.

Read it top to bottom for a turn:

1. **Frames in** (:meth:`push_audio`): 16 kHz PCM16 goes to the listener (built on the
   first frame; frames said while it starts are buffered and replayed in order).
2. **Listener events** (:meth:`_on_listen_event`): the :class:`BargeInPolicy` decides
   pause / barge-in / resume while a reply plays; the :class:`TurnStarter` prepares the
   request at the voice onset and starts the reply early at a likely-final transcript.
3. **The reply** (:meth:`_run`): a :class:`ReplyHandle` per turn; the user message is
   stored when final, the assistant message unfinished then updated (per audio chunk
   and at least every second of text); tokens and audio URLs go out as events.
4. **Playback reports** (:meth:`on_playback`): the page's audio queue says what it
   played; a cut keeps exactly the chunks heard, marked interrupted.
5. **Status** is derived in ``status.py`` after every change and emitted when it differs.

Inputs are messages (:meth:`on_control`: ptt, stop, mode, barge-in, the conversation
id and mute, typed text, playback reports); outputs are typed events
(``events.py``) to the subscribed outputs (the page's socket, the Reflex projection).
No Reflex, no database, no module state: the store and services are ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from typing import Any, Awaitable, Callable

from ..pipeline.events import AudioReady, LLMToken, StillWorking, TurnDone, TurnError, TurnNotice
from ..pipeline.preemptive import EarlyTurn, TurnStarter
from ..pipeline.timing import TurnMarks, now_ms
from ..providers.base import ChatMessage, EndOfTurn, InterimTranscript, ListenNotice, ProviderError, SpeechDiscarded, SpeechStarted
from . import events as ev_
from .audio_guard import AudioRateGuard
from .barge_in import BargeInPolicy
from .ports import ConversationStore, Services
from .reply import PROGRESS_WRITE_MS, ReplyHandle
from .status import StatusInputs, derive_status

log = logging.getLogger("voiceclaw.session")

MAX_FRAME_BYTES = 16000 * 2  # 1 s of audio: far above a 20-40 ms frame
MAX_BUFFERED_FRAMES = 250  # ~5-10 s of audio held while the listener starts
#: after a listener failure, frames are dropped this long before listening is retried
RETRY_AFTER_FAILURE_MS = 5000.0
#: longest typed message taken (a longer one is refused with a message)
MAX_TYPED_CHARS = 8000
#: finished replies whose first playback report may still come (per session)
MAX_AWAITING_PLAYBACK = 50
#: a finished reply with no words at all (the model stopped at once)
EMPTY_REPLY_NOTICE = "The assistant gave an empty answer. Please ask again."

Output = Callable[[ev_.SessionEvent], Awaitable[None]]


class VoiceSession:
    def __init__(
        self,
        *,
        services: Services,
        store: ConversationStore,
        user_id: int = 0,
        tab: str = "",
        mode: str = "hands_free",
        conversation_id: str = "",
        muted: bool = False,
        new_conversation_id: Callable[[], str] | None = None,
    ) -> None:
        self.services = services
        self.store = store
        self.user_id = user_id
        self.tab = tab
        self.mode = mode if mode in ("push_to_talk", "hands_free") else "hands_free"
        self.conversation_id = conversation_id
        #: the conversation id the page last sent (its changes are the user's picks)
        self._page_conversation = conversation_id
        self.muted = muted
        #: ids for conversations picked at a voice onset (the row is written with the first words)
        self._new_id = new_conversation_id or (lambda: uuid.uuid4().hex)
        self.listener: Any = None
        self.starter: TurnStarter | None = None
        self.reply: ReplyHandle | None = None
        self.barge = BargeInPolicy()
        self.mic_on = False
        #: another tab of this account has the mic: frames are dropped until this tab claims it again
        self.mic_lost = False
        #: a page (socket) is attached: it plays this session's audio and reports on it
        self.attached = False
        self.closed = False
        self.samples = 0
        self.rate_guard = AudioRateGuard()
        self._told_too_fast = False
        self._outputs: list[Output] = []
        self._starting: asyncio.Task | None = None
        self._buffer: deque[tuple[bytes, float]] = deque(maxlen=MAX_BUFFERED_FRAMES)
        self._draining = False
        self._events_task: asyncio.Task | None = None
        self._fresh_conversation = ""
        self._failed_at: float | None = None
        self._failed = False
        self._pause_timer: asyncio.TimerHandle | None = None
        self._status = ""
        #: turn_id -> (timing row id, origin ms) of finished replies awaiting their first playback report
        self._awaiting_playback: dict[str, tuple[int, float]] = {}
        self._background: set[asyncio.Task] = set()
        #: called when the mic is claimed (ptt_start, mic on): the hub takes it from the account's other tabs
        self.on_mic_claim: Callable[["VoiceSession"], Awaitable[None]] | None = None

    # ================================================================ outputs
    def subscribe(self, output: Output) -> None:
        self._outputs.append(output)

    def unsubscribe(self, output: Output) -> None:
        with contextlib.suppress(ValueError):
            self._outputs.remove(output)

    async def _emit(self, event: ev_.SessionEvent) -> None:
        for out in list(self._outputs):
            try:
                await out(event)
            except Exception:
                log.exception("a session output failed on %s", type(event).__name__)

    async def _update_status(self) -> None:
        r = self.reply
        inputs = StatusInputs(
            mic_on=self.mic_on,
            reply_running=r is not None and not r.done,
            playing=r is not None and r.ledger.playing,
            audio_pending=r is not None and r.done and not r.interrupted and bool(r.ledger.chunks) and not r.ledger.over and self.attached and not r.page_left,
            failed=self._failed,
        )
        status = derive_status(inputs)
        if status != self._status:
            self._status = status
            await self._emit(ev_.StatusChanged(status))

    @property
    def status(self) -> str:
        return self._status or "idle"

    def replying(self) -> bool:
        """The assistant is producing or playing a reply (the server finishes a turn
        seconds before the browser has played it)."""
        r = self.reply
        return r is not None and (not r.done or r.ledger.playing)

    def _in_echo_guard(self) -> bool:
        r = self.reply
        return r is not None and r.ledger.in_echo_guard(self.barge.echo_guard_ms)

    # ================================================================ connection
    async def attach(self, output: Output) -> None:
        """A page's socket is (again) this session's: it plays the audio from now on."""
        self.attached = True
        self.subscribe(output)
        await self._update_status()

    async def detach(self, output: Output) -> None:
        """The page's socket closed (reload, tab closed, left the dashboard): whatever it
        played is gone and its mic is off; a running reply goes on (its text is stored
        and shown to the page that comes back)."""
        self.unsubscribe(output)
        self.attached = False
        await self.stop_listening()
        await self._set_mic(False)
        await self._page_gone()

    async def _page_gone(self) -> None:
        r = self.reply
        if r is not None:
            if not r.done:
                r.page_left = True
            r.ledger.gone()
        await self._emit(ev_.PageGone())
        await self._update_status()

    async def _set_mic(self, on: bool) -> None:
        if on == self.mic_on:
            return
        self.mic_on = on
        if on:
            self._failed = False
        await self._emit(ev_.MicChanged(on))
        await self._update_status()

    async def claim_mic(self) -> None:
        """This tab starts the mic: it is the account's mic from now on (the hub tells the other tab)."""
        self.mic_lost = False
        if self.on_mic_claim is not None:
            await self.on_mic_claim(self)

    async def lose_mic(self) -> None:
        """Another tab of this account took the mic: stop listening and say so."""
        self.mic_lost = True
        await self.stop_listening()
        await self._set_mic(False)
        await self._emit(ev_.TakenOver())

    async def close(self) -> None:
        if self.closed:
            return
        await self.stop_listening()
        self.closed = True
        self._cancel_pause_timer()
        if self.reply is not None:
            self.reply.interrupt("session closed")

    # ================================================================ 1. frames in
    async def push_audio(self, pcm: bytes, t_ms: float | None = None) -> None:
        """A mic frame (``t_ms``: when its last sample was captured, on the session clock; now by default)."""
        t = now_ms() if t_ms is None else t_ms
        if not pcm or len(pcm) > MAX_FRAME_BYTES or len(pcm) % 2 or self.mic_lost or self.closed:
            return
        if not self.rate_guard.admit(len(pcm) // 2, t):
            if not self._told_too_fast:
                self._told_too_fast = True
                await self._emit(ev_.ErrorRaised("Audio is arriving faster than real time: the extra frames are dropped.", code="too_fast"))
            return
        self.samples += len(pcm) // 2
        if not self.mic_on:
            await self._set_mic(True)
        if self.listener is None or self._draining:
            if self._failed_at is not None and t - self._failed_at < RETRY_AFTER_FAILURE_MS:
                return  # the failure was reported; do not rebuild the listener 50 times a second
            self._buffer.append((pcm, t))  # bounded: the oldest frames go first
            if self._starting is None and self.listener is None:
                self._failed_at = None
                self._starting = asyncio.get_running_loop().create_task(self._start_listener())
            return
        await self._push(self.listener, pcm, t)

    async def _start_listener(self) -> None:
        try:
            settings = await self.services.load_settings(self.user_id)
            listener = await self.services.build_listener(settings)
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
        self._apply_mode()
        self.starter = TurnStarter(self._prepare, speculative=settings.speculative)
        self._events_task = asyncio.get_running_loop().create_task(self._consume(listener))
        # Replay what was said while the listener started (the user's first words), in
        # order: each push may wait (the VAD runs off the loop), so live frames keep
        # going to the buffer until it is empty.
        self._draining = True
        try:
            while self._buffer and self.listener is listener:
                pcm, t = self._buffer.popleft()
                if not await self._push(listener, pcm, t):
                    return
        finally:
            self._draining = False

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

    def _apply_mode(self) -> None:
        """Tell the listener the input mode (hands-free ends turns itself; push-to-talk waits for ptt_end)."""
        if self.listener is None:
            return
        try:
            self.listener.set_hands_free(self.mode == "hands_free")
        except Exception:
            log.exception("the listener refused the input mode")

    def set_mode(self, mode: Any) -> None:
        if mode in ("push_to_talk", "hands_free"):
            self.mode = mode
            self._apply_mode()

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
        await self._fail(msg)

    async def refuse(self, message: str, code: str) -> None:
        """A message the socket could not take (too large, not JSON...): say why; nothing else changes."""
        await self._emit(ev_.ErrorRaised(message, code=code))

    async def _fail(self, message: str) -> None:
        self._failed = True
        await self._emit(ev_.ErrorRaised(message))
        await self._update_status()

    async def stop_listening(self) -> None:
        await self._clear_pause(resume=True)
        listener, self.listener = self.listener, None
        starting, self._starting = self._starting, None
        if starting is not None and starting is not asyncio.current_task() and not starting.done():
            starting.cancel()  # a listener still being built must not come back after Stop
        self._buffer.clear()
        if self._events_task is not None and self._events_task is not asyncio.current_task():
            self._events_task.cancel()
        self._events_task = None
        starter, self.starter = self.starter, None
        if starter is not None:
            with contextlib.suppress(Exception):
                await starter.aclose()
        if listener is not None:
            with contextlib.suppress(Exception):
                await listener.aclose()

    # ================================================================ 2. listener events
    async def _consume(self, listener: Any) -> None:
        try:
            async for ev in listener.events():
                await self._on_listen_event(ev)
            if self.listener is listener and not self.closed:
                # the listener ended by itself (e.g. a cloud session that failed with
                # fallback off): forget it, so the next voiced frame builds a new one
                await self.stop_listening()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("listener failed")
            await self._fail(getattr(exc, "user_message", None) or f"Listening failed: {exc}")

    async def _on_listen_event(self, ev: Any) -> None:
        await self._emit(ev_.Heard(ev))
        if isinstance(ev, SpeechStarted):
            action = self.barge.on_onset(tentative=ev.tentative, replying=self.replying(), echo=self._in_echo_guard())
            log.debug("voice onset tentative=%s replying=%s playing=%s -> %s", ev.tentative, self.replying(), self.reply is not None and self.reply.ledger.playing, action)
            if action == "pause":
                # a voice onset that may still be a cough: pause playback at once, keep the
                # turn (the turn starter still sees it: it starts preparing the request now)
                await self._pause()
            elif action == "barge_in":
                await self._barge_in()
        elif isinstance(ev, SpeechDiscarded):
            was_replying = self.barge.paused or self.replying()
            if self.barge.on_discard() == "resume":
                self._cancel_pause_timer()
                await self._command("resume")
            if not was_replying:
                return  # a cough in silence: the request prepared at its onset is still right
        elif isinstance(ev, InterimTranscript):
            await self._emit(ev_.UserInterim(ev.text))
        elif isinstance(ev, ListenNotice):
            await self._emit(ev_.Notice(ev.message))
        elif isinstance(ev, EndOfTurn) and not (ev.text or "").strip():
            await self._emit(ev_.UserInterim(""))
        if self.starter is None:
            return
        try:
            committed = await self.starter.handle(ev)
        except Exception as exc:  # settings or provider set-up failed: say so, keep listening
            log.exception("could not start the turn")
            await self._fail(getattr(exc, "user_message", None) or f"Could not start the turn: {exc}")
            return
        if committed is not None:
            conv, self._fresh_conversation = self.conversation_id or self._fresh_conversation, ""
            await self.start_reply(committed.text, speak=self.starter.speak, spoken_input=True, early=committed.turn, reused=committed.reused, conversation_id=conv)

    async def _prepare(self) -> tuple[Any, Any]:
        """At speech start (TurnStarter): runner + request for this session's conversation.

        A session with no conversation yet gets its id now, so the gateway session key
        (history mode "server") is fixed before the first word is stored."""
        if self.reply is not None:
            await self.reply.settled()  # an interrupted reply is stored (cut) before history is read
        conv = self.conversation_id
        if not conv:
            self._fresh_conversation = self._fresh_conversation or self._new_id()
            conv = self._fresh_conversation
        if self.starter is not None:
            self.starter.speak = not self.muted
        settings = await self.services.load_settings(self.user_id)
        runner = await self.services.get_runner(settings)
        history = await self._history(conv, settings)
        prepared = runner.prepare(history, conv, spoken=True)
        self._spawn(self._warm(runner, prepared))
        return runner, prepared

    async def _history(self, conversation_id: str, settings: Any) -> list[ChatMessage]:
        """Bounded recent history for the LLM (the runner adds the system prompt)."""
        if not conversation_id:
            return []
        pairs = await asyncio.to_thread(self.store.recent_history, conversation_id, settings.llm_history_turns)
        return [ChatMessage(role=r, content=c) for r, c in pairs if r in ("user", "assistant")]  # type: ignore[arg-type]

    async def _warm(self, runner: Any, prepared: Any) -> None:
        try:
            await runner.warm(prepared)
        except Exception:
            log.debug("warm-up failed", exc_info=True)

    # ---- barge-in ----------------------------------------------------------
    async def _command(self, action: str, turn: str = "") -> None:
        await self._emit(ev_.PlaybackCommand(action, now_ms(), turn))

    async def _pause(self) -> None:
        await self._command("pause")
        self._cancel_pause_timer()
        loop = asyncio.get_running_loop()
        self._pause_timer = loop.call_later(self.barge.pause_timeout_s, lambda: self._spawn(self._pause_timed_out()))

    async def _pause_timed_out(self) -> None:
        self._pause_timer = None
        if self.barge.timed_out() == "resume":
            await self._command("resume")

    def _cancel_pause_timer(self) -> None:
        if self._pause_timer is not None:
            self._pause_timer.cancel()
            self._pause_timer = None

    async def _clear_pause(self, *, resume: bool) -> None:
        self._cancel_pause_timer()
        if self.barge.on_discard() == "resume" and resume:
            await self._command("resume")

    async def _barge_in(self) -> None:
        self._cancel_pause_timer()
        self.barge.paused = False
        await self._command("barge_in", self.reply.turn_id if self.reply is not None else "")
        if self.reply is not None:
            self.reply.ledger.playing = False  # the page stops at once (its "stopped" report says what was heard)
        if self.reply is not None and self.reply.interrupt("barge_in") and self.starter is not None:
            # the request prepared at the onset lacks the interrupted reply: prepare
            # again (``_prepare`` waits until the cut reply is stored)
            self.starter.invalidate()
        await self._update_status()

    # ================================================================ control messages
    async def on_control(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ptt_start":
            self.set_mode("push_to_talk")
            self._failed_at = None
            await self.claim_mic()
            if self.replying():
                await self._barge_in()
            await self._set_mic(True)
            await self.ensure_listener()
        elif kind == "ptt_end":
            if self.listener is not None:
                try:
                    await self.listener.finish_utterance()
                except Exception as exc:
                    log.exception("could not end the utterance")
                    await self._listening_failed(exc, "Listening failed")
            await self._set_mic(False)
        elif kind == "mic":  # the page's capture started (claims the account's mic) or stopped
            if msg.get("on"):
                self._failed_at = None
                await self.claim_mic()
                await self._set_mic(True)
            else:
                await self._set_mic(False)
        elif kind == "barge_in":  # the voice button pressed while the assistant speaks
            self._failed_at = None
            if self.barge.on_button(replying=self.replying()) == "barge_in":
                await self._barge_in()
        elif kind == "stop":
            self._failed_at = None
            await self.stop_listening()
            if self.reply is not None:
                self.reply.interrupt("stop")
                self.reply.ledger.playing = False  # the page stopped its playback with the mic
            await self._set_mic(False)
            await self._update_status()
        elif kind == "mode":
            self.set_mode(msg.get("mode"))
        elif kind == "context":
            await self.set_context(msg.get("conversation_id"), msg.get("muted"))
        elif kind == "text":
            await self.say(msg.get("text"))
        elif kind == "playback":
            await self.on_playback(msg)
        elif kind == "playback_stopped":
            # the page is going away mid-reply (pagehide): the reply is cut where it stopped
            await self.on_playback({"event": "stopped", "turn": msg.get("turn"), "played": msg.get("played")})

    async def set_context(self, conversation_id: Any, muted: Any = None) -> None:
        """The page's conversation id and mute (the page is the source of both)."""
        if isinstance(muted, bool):
            self.muted = muted
            if self.starter is not None:
                self.starter.speak = not muted
        if not isinstance(conversation_id, str) or conversation_id == self._page_conversation:
            return  # unchanged on the page (e.g. only mute changed)
        self._page_conversation = conversation_id
        if conversation_id == self.conversation_id:
            return  # the page caught up with the conversation a reply started
        # another conversation (or "new conversation"): the running reply stops, and the
        # request prepared for the old one is stale
        self.conversation_id = conversation_id
        self._fresh_conversation = ""
        if self.reply is not None:
            self.reply.interrupt("conversation changed")
        if self.starter is not None:
            self.starter.invalidate()
        await self._update_status()

    async def say(self, text: Any) -> ReplyHandle | None:
        """A typed message: refused with a message when empty or too long."""
        if not isinstance(text, str) or not text.strip():
            return None
        text = text.strip()
        if len(text) > MAX_TYPED_CHARS:
            await self._emit(ev_.ErrorRaised(f"That message is too long ({len(text):,} characters): send at most {MAX_TYPED_CHARS:,} at a time.", code="too_long"))
            return None
        return await self.start_reply(text, speak=not self.muted, spoken_input=False)

    # ================================================================ 3. the reply
    async def start_reply(self, text: str, *, speak: bool, spoken_input: bool, marks: TurnMarks | None = None, prepared: Any = None, early: EarlyTurn | None = None, reused: bool = False, conversation_id: str = "") -> ReplyHandle:
        """Run a reply to ``text``; ``early`` is one the turn starter began at the pause
        (its held-back events flow now)."""
        if self.reply is not None:
            self.reply.interrupt("new turn")
        if not self.conversation_id:
            # a new conversation: its id is fixed now, so a second message typed before the
            # first is stored lands in the same one (the row is written with the first words)
            self.conversation_id = conversation_id or self._new_id()
        reply = ReplyHandle(conversation_id=conversation_id or self.conversation_id, speak=speak, text=text, reused=reused, marks=early.marks if early is not None else marks or TurnMarks())
        if early is not None:
            reply.cancel = early.cancel
        if reply.marks.stt_final is None:
            reply.marks.mark("stt_final")
        self.reply = reply
        self._failed = False
        reply.task = asyncio.get_running_loop().create_task(self._run(reply, text, spoken_input, prepared, early))
        reply.task.add_done_callback(lambda _: self._ended_unstarted(reply))
        await self._update_status()
        return reply

    async def _run(self, reply: ReplyHandle, text: str, spoken_input: bool, prepared: Any, early: EarlyTurn | None) -> None:
        error = ""
        try:
            settings = await self.services.load_settings(self.user_id)
            reply.conversation_id = await asyncio.to_thread(self.store.ensure_conversation, reply.conversation_id)
            user_id = await asyncio.to_thread(self.store.add_user_message, reply.conversation_id, text, spoken_input)
            reply.message_id = await asyncio.to_thread(self.store.start_assistant_message, reply.conversation_id, reply.speak)
            await self._emit(ev_.TurnStarted(reply.turn_id, reply.conversation_id, user_id, text, reply.speak))
            if early is not None:
                gen = early.events()
            else:
                runner = await self.services.get_runner(settings)
                if prepared is None:
                    prepared = runner.prepare(await self._history(reply.conversation_id, settings), reply.conversation_id, spoken=reply.speak)
                gen = runner.run(prepared, text, marks=reply.marks, cancel=reply.cancel, speak=reply.speak)
            try:
                async for ev in gen:
                    await self._on_turn_event(reply, ev)
            finally:
                with contextlib.suppress(Exception):
                    await gen.aclose()
        except asyncio.CancelledError:
            reply.interrupted = True
        except Exception as exc:  # the runner reports provider failures as TurnError; this is a bug or setup issue
            log.exception("turn failed")
            error = getattr(exc, "user_message", None) or f"The turn failed: {type(exc).__name__}: {exc}"[:300]
        finally:
            reply.done = True
            await asyncio.shield(self._finish(reply, error))

    def _ended_unstarted(self, reply: ReplyHandle) -> None:
        """A reply cancelled before its task ran never reached ``_run``'s ``finally``: end it here."""
        if not reply.done:
            reply.interrupted = reply.done = True
            self._spawn(self._finish(reply, ""))

    async def _on_turn_event(self, reply: ReplyHandle, ev: Any) -> None:
        if isinstance(ev, LLMToken):
            reply.reply_text += ev.text
            await self._emit(ev_.ReplyToken(reply.turn_id, ev.text))
            if reply.message_id is not None and now_ms() - reply.last_write_ms >= PROGRESS_WRITE_MS:
                # text-only (muted) replies have no audio chunks: write the text so far, so a
                # crash mid-reply keeps what was streamed
                await reply.write(self.store.update_assistant_message, reply.message_id, reply.reply_text, reply.stored_audio())
        elif isinstance(ev, AudioReady):
            reply.ledger.sent(ev.audio_id, ev.text)
            await self._emit(ev_.ReplyAudio(reply.turn_id, ev.url, ev.audio_id))
            if reply.message_id is not None:
                await reply.write(self.store.update_assistant_message, reply.message_id, reply.reply_text, reply.stored_audio())
        elif isinstance(ev, StillWorking):
            await self._emit(ev_.StillWorkingCue(reply.turn_id, int(ev.waited_ms)))
        elif isinstance(ev, TurnNotice):
            await self._emit(ev_.Notice(ev.message))
        elif isinstance(ev, TurnDone):
            reply.reply_text = ev.reply_text or reply.reply_text
        elif isinstance(ev, TurnError):
            reply.reply_text = ev.reply_text or reply.reply_text
            reply.error = ev.message
            if ev.audio_url:
                await self._emit(ev_.ReplyAudio(reply.turn_id, ev.audio_url))
        await self._emit(ev_.PipelineEvent(reply.turn_id, ev))

    async def _finish(self, reply: ReplyHandle, error: str) -> None:
        error = error or reply.error
        reply.marks.mark("turn_done")
        played_at_store = reply.ledger.played
        content = reply.stored_text()
        audio_ids = reply.stored_audio()
        timing_id = 0
        try:
            if reply.message_id is not None:
                await reply.write(self.store.update_assistant_message, reply.message_id, content, audio_ids, finished=True, interrupted=reply.interrupted, error=error)
                timing_id = await asyncio.to_thread(self.store.save_timing, reply.conversation_id, reply.message_id, reply.marks, reply.marks.speech_end is not None)
        except Exception:
            log.exception("could not store the turn")
        if reply.marks.first_audio_playing is None:  # else stored with the timing row: later reports are replays
            self._awaiting_playback[reply.turn_id] = (timing_id, reply.marks.origin() or 0.0)
            while len(self._awaiting_playback) > MAX_AWAITING_PLAYBACK:
                self._awaiting_playback.pop(next(iter(self._awaiting_playback)))
        log.info("turn %s done interrupted=%s chunks=%d played=%d stages=%s", reply.turn_id, reply.interrupted, len(reply.ledger.chunks), reply.ledger.played, reply.marks.stages())
        if error and not reply.ledger.chunks and not reply.interrupted:
            self._failed = True
        elif not error and not reply.interrupted and not reply.cancel.cancelled and not content.strip():
            # the model answered with nothing at all: say so, or the person waits in silence
            await self._emit(ev_.Notice(EMPTY_REPLY_NOTICE))
        await self._emit(ev_.TurnFinished(reply.turn_id, reply.conversation_id, reply.message_id, content, reply.interrupted, error, audio_ids))
        reply.finished = True
        await self._update_status()
        if reply.cut and reply.ledger.played > played_at_store:
            await self._store_cut(reply)  # a "stopped" report with more played chunks came in meanwhile

    async def _store_cut(self, reply: ReplyHandle) -> None:
        """Keep the reply up to the last chunk played, marked interrupted, stored and shown."""
        content = reply.stored_text()
        if reply.message_id is not None:
            try:
                await reply.write(self.store.update_assistant_message, reply.message_id, content, reply.stored_audio(), finished=True, interrupted=True)
            except Exception:
                log.exception("could not store the interrupted reply")
        await self._emit(ev_.ReplyCut(reply.turn_id, reply.message_id, content))

    # ================================================================ 4. playback reports
    async def on_playback(self, data: dict) -> None:
        """The page's audio queue: mounted / first_playing / chunk / ended / stopped.

        Only the first ``first_playing`` of a reply counts (a replay of its URLs must not
        rewrite the stored first-audio time / V2V), and once the reply's playback was
        reported over, later reports change nothing: a Stop during a replay never cuts
        a reply that was heard in full."""
        kind = data.get("event")
        if kind == "mounted":
            await self._page_gone()  # a new queue: whatever an earlier one played is gone
            return
        if kind not in ("first_playing", "chunk", "ended", "stopped"):
            return
        turn_id = str(data.get("turn") or "")
        r = self.reply
        if r is not None and r.turn_id == turn_id:
            if r.ledger.over:
                return  # its playback was reported over: this is a replay
            eff = r.ledger.report(kind, data, reply_done=r.done)
            if eff.first_playing_ms is not None and r.marks.first_audio_playing is None:
                r.marks.mark("first_audio_playing", eff.first_playing_ms)
                if r.done:
                    self._late_playing(turn_id, eff.first_playing_ms)
            if kind == "stopped":
                if not r.done:
                    # the queue stopped mid-reply (the page was left, or a barge-in/Stop the
                    # server has not acted on yet): nothing more will be heard, so it ends now
                    r.interrupt("playback stopped")
                elif r.finished and r.cut and eff.more_played:
                    # a chunk started just before the barge-in reached the page: keep it too
                    self._spawn(self._store_cut(r))
                elif r.speak and not r.interrupted:
                    # stopped mid-reply after the reply finished synthesizing (barge-in,
                    # Stop, the page left): keep what was played, marked interrupted
                    r.interrupted = True
                    self._spawn(self._store_cut(r))
            if kind in ("ended", "stopped"):
                await self._emit(ev_.PlaybackEnded(turn_id, kind == "stopped"))
            await self._update_status()
        elif kind == "first_playing" and isinstance(data.get("server_ms"), (int, float)):
            self._late_playing(turn_id, float(data["server_ms"]))

    def _late_playing(self, turn_id: str, server_ms: float) -> None:
        info = self._awaiting_playback.pop(turn_id, None)
        if info is None:
            return  # stored already (a later report is a replay), or not a reply of this session
        timing_id, origin = info
        if timing_id:
            self._spawn(asyncio.to_thread(self.store.set_first_audio_playing, timing_id, server_ms - origin))

    async def drain(self) -> None:
        """Wait for the session's background work (warm-ups hold model locks and cores)."""
        await asyncio.gather(*self._background, return_exceptions=True)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
