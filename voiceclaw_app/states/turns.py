"""Turn tasks and their cancel handles, keyed by the tab's client token.

A turn (typed or spoken) runs as its own asyncio task that iterates the pipeline's
``TurnRunner.run`` and pushes updates into the tab's Reflex state through a *sink*
(``app.modify_state`` in the app; a fake in tests). Tokens are batched every ~40 ms
into segments. Cancel handles live in this module's registry (one process; with
several workers the voice socket and its turns live in the same worker, which is
the one that owns the tab's mic socket).

Persistence: the user message when final; the assistant message created unfinished
and updated per audio chunk; on barge-in/stop the stored reply is cut to the chunks
the browser actually started playing and marked interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from ..db import repo
from ..pipeline.preemptive import EarlyTurn
from ..pipeline.timing import TurnMarks, now_ms
from ..providers.base import CancelToken
from ..server.auth import sign_stored_url
from . import services
from .chat import ChatState, StreamState, _conv_row, _msg_row

log = logging.getLogger("voiceclaw.turns")

FLUSH_S = 0.04  # token batching interval
TAIL = 32  # segments carried per update (~1.3 s of batches: a late render or a reload loses none)
ECHO_GUARD_MS = 300.0


# ---------------------------------------------------------------- sinks
class ReflexSink:
    """Applies a function to (StreamState, ChatState) of a tab via ``app.modify_state``."""

    @contextlib.asynccontextmanager
    async def states(self, token: str) -> AsyncIterator[tuple[StreamState, ChatState]]:
        import reflex as rx

        from ..voiceclaw_app import app

        async with app.modify_state(rx.BaseStateToken(ident=token, cls=StreamState)) as root:
            stream = await root.get_state(StreamState)
            chat = await root.get_state(ChatState)
            yield stream, chat


_sink: Any = ReflexSink()


def set_sink(sink: Any) -> None:
    """Tests swap the sink for an in-memory one."""
    global _sink
    _sink = sink


# ---------------------------------------------------------------- registry
@dataclass
class ActiveTurn:
    turn_id: str
    token: str
    conversation_id: str
    speak: bool
    #: the logged-in user the turn is for (repository calls and audio URLs are theirs)
    user_id: int = 0
    cancel: CancelToken = field(default_factory=CancelToken)
    task: asyncio.Task | None = None
    marks: TurnMarks = field(default_factory=TurnMarks)
    message_id: int | None = None
    segments: list[str] = field(default_factory=list)
    pending: str = ""
    reply_text: str = ""
    chunks: list[tuple[str, str]] = field(default_factory=list)  # (audio_id, text) in order
    played: int = 0
    playback_started_ms: float | None = None
    interrupted: bool = False
    done: bool = False
    error: str = ""
    playing: bool = False  # the browser is playing this turn's audio (may outlive the turn)
    #: the latest write of this turn's assistant message (writes run in order, see _write_message)
    db_last: "asyncio.Future | None" = None
    #: the browser reported the end of this turn's playback (ended when complete, or stopped):
    #: later reports (a replay of the same URLs) change nothing
    playback_over: bool = False
    first_playing_seen: bool = False
    finished: bool = False  # _finish stored the reply
    #: the page was (re)loaded while this turn ran: its new queue will not play the turn,
    #: so no "ended" report will come to end a "speaking" status
    page_reloaded: bool = False


ACTIVE: dict[str, ActiveTurn] = {}
#: turn_id -> (timing row id, origin ms) of finished turns still awaiting their first
#: playback report; taken out when it is stored, so only the first report counts
FINISHED_TIMINGS: dict[str, tuple[int, float, str, int]] = {}
#: client token -> coroutine function sending a JSON message on the tab's mic socket
VOICE_SENDERS: dict[str, Callable[[dict], Awaitable[None]]] = {}


def active(token: str) -> ActiveTurn | None:
    t = ACTIVE.get(token)
    return t if t is not None and not t.done else None


def speaking(token: str) -> bool:
    """The assistant is producing or playing a reply: the server finishes a turn
    (all audio synthesized) seconds before the browser has played it."""
    t = ACTIVE.get(token)
    return t is not None and (not t.done or t.playing)


def in_echo_guard(token: str) -> bool:
    """Within the first ~300 ms of playback: a speech start then is likely our own voice."""
    t = ACTIVE.get(token)
    if t is None or t.playback_started_ms is None:
        return False
    return now_ms() - t.playback_started_ms < ECHO_GUARD_MS


async def settled(token: str, timeout_s: float = 1.5) -> None:
    """Wait (bounded) until the tab's cancelled turn has finished storing its reply."""
    t = ACTIVE.get(token)
    task = t.task if t is not None else None
    if task is None or task.done() or task is asyncio.current_task() or not t.cancel.cancelled:
        return
    with contextlib.suppress(Exception, asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(task), timeout_s)


def interrupt(token: str, reason: str = "barge_in") -> bool:
    """Cancel the tab's running turn (barge-in, stop, new conversation)."""
    t = active(token)
    if t is None:
        return False
    t.interrupted = True
    t.cancel.cancel()
    if t.task is not None and not t.task.done():
        t.task.cancel()
    log.info("turn %s interrupted (%s) after %d played chunk(s)", t.turn_id, reason, t.played)
    return True


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _server_ms(data: dict) -> float | None:
    try:
        v = data.get("server_ms")
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def audio_report(token: str, data: dict) -> None:
    """Playback reports from the browser's audio queue.

    Only the first ``first_playing`` of a turn counts (a replay of its URLs must not
    rewrite the stored first_audio_playing / V2V), and once the turn's playback was
    reported over (``ended`` when complete, or ``stopped``) later reports change
    nothing: a Stop during a replay never cuts a reply that was heard in full.
    """
    turn_id = str(data.get("turn", ""))
    kind = data.get("event")
    t = ACTIVE.get(token)
    if t is not None and t.turn_id == turn_id:
        if t.playback_over:
            return
        if kind in ("first_playing", "chunk"):
            t.played = max(t.played, _int(data.get("index")) + 1)
            if t.playback_started_ms is None:
                t.playback_started_ms = now_ms()
            t.playing = True  # also after a drain while the LLM was slower than speech
        server_ms = _server_ms(data)
        if kind == "first_playing" and not t.first_playing_seen:
            t.first_playing_seen = True
            if server_ms is not None and t.marks.first_audio_playing is None:
                t.marks.mark("first_audio_playing", server_ms)
                if t.done:
                    _late_playing(turn_id, server_ms)
        if kind in ("stopped", "ended"):
            t.playing = False
            if t.done or kind == "stopped":
                t.playback_over = True
        if kind in ("stopped",) and data.get("played") is not None:
            before = t.played
            t.played = max(t.played, _int(data["played"]))
            if t.finished and t.speak and t.interrupted and t.played > before:
                # a chunk started just before the barge-in reached the page: keep it too
                _spawn(_store_cut(t))
            elif t.done and t.speak and not t.interrupted:
                # playback stopped mid-reply after the turn finished synthesizing
                # (barge-in, Stop, the page left): keep what was played, marked
                # interrupted (the page reports "stopped" only while a chunk still sounds)
                t.interrupted = True
                _spawn(_store_cut(t))
    elif kind == "first_playing" and _server_ms(data) is not None:
        _late_playing(turn_id, _server_ms(data))  # type: ignore[arg-type]


def _spawn(coro: Any) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


def playback_gone(token: str) -> None:
    """The page was (re)loaded: whatever it was playing is gone, nothing is playing now."""
    t = ACTIVE.get(token)
    if t is not None and not t.done:
        t.page_reloaded = True
    if t is not None and t.playing:
        t.playing = False
        if t.done:
            t.playback_over = True


async def _store_cut(turn: ActiveTurn) -> None:
    """Keep the reply up to the last chunk played, marked interrupted, in the DB and on the page."""
    content = _stored_reply(turn)
    if turn.message_id is not None:
        try:
            await _write_message(turn, content, _stored_audio(turn), finished=True, interrupted=True)
        except Exception:
            log.exception("could not store the interrupted reply")
    mid = str(turn.message_id or "")

    def apply(stream: StreamState, chat: ChatState) -> None:
        chat.messages = [({**m, "content": content, "interrupted": "1"} if m.get("id") == mid and m.get("role") == "assistant" else m) for m in chat.messages]

    await notify(turn.token, apply)


def _late_playing(turn_id: str, server_ms: float) -> None:
    info = FINISHED_TIMINGS.pop(turn_id, None)
    if info is None:
        return  # stored already (a later report is a replay), or not a turn of ours
    timing_id, origin, _, user_id = info
    if timing_id:
        asyncio.get_running_loop().run_in_executor(None, repo.set_first_audio_playing, user_id, timing_id, server_ms - origin)


# ---------------------------------------------------------------- starting turns
def start_turn(
    token: str,
    text: str,
    *,
    speak: bool,
    spoken_input: bool,
    conversation_id: str = "",
    marks: TurnMarks | None = None,
    prepared: Any = None,
    early: EarlyTurn | None = None,
    user_id: int = 0,
) -> ActiveTurn:
    """Run a turn for the tab; ``early`` is a turn the voice session already started
    at the pause (its held-back events are shown now)."""
    interrupt(token, reason="new turn")
    turn = ActiveTurn(turn_id=secrets.token_hex(6), token=token, conversation_id=conversation_id, speak=speak, user_id=user_id, marks=early.marks if early is not None else marks or TurnMarks())
    if early is not None:
        turn.cancel = early.cancel
    if turn.marks.stt_final is None:
        turn.marks.mark("stt_final")
    ACTIVE[token] = turn
    turn.task = asyncio.get_running_loop().create_task(_run(turn, text, spoken_input, prepared, early))
    return turn


async def prepare_runner(user_id: int, conversation_id: str) -> tuple[Any, Any]:
    """At speech start: the runner and the request (settings + bounded history), and
    providers warmed for it in the background (connections, the local LLM's prompt)."""
    settings = await services.load_settings(user_id)
    runner = await services.get_runner(settings)
    history = await services.history_for(user_id, conversation_id, settings)
    prepared = runner.prepare(history, conversation_id, spoken=True)
    task = asyncio.get_running_loop().create_task(_warm(runner, prepared))
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)
    return runner, prepared


_BACKGROUND: set[asyncio.Task] = set()


async def _warm(runner: Any, prepared: Any) -> None:
    try:
        await runner.warm(prepared)
    except Exception:
        log.debug("warm-up failed", exc_info=True)


async def notify(token: str, fn: Callable[[StreamState, ChatState], None]) -> None:
    try:
        async with _sink.states(token) as (stream, chat):
            fn(stream, chat)
    except Exception:
        log.exception("state update failed")


# ---------------------------------------------------------------- the turn
async def _run(turn: ActiveTurn, text: str, spoken_input: bool, prepared: Any, early: EarlyTurn | None = None) -> None:
    token = turn.token
    error = ""
    flusher: asyncio.Task | None = None
    try:
        settings = await services.load_settings(turn.user_id)
        conv = await asyncio.to_thread(repo.ensure_conversation, turn.user_id, turn.conversation_id)
        turn.conversation_id = conv.id
        history = None if prepared is not None or early is not None else await services.history_for(turn.user_id, turn.conversation_id, settings)
        user = await asyncio.to_thread(repo.add_user_message, turn.user_id, turn.conversation_id, text, spoken_input)
        reply = await asyncio.to_thread(repo.start_assistant_message, turn.user_id, turn.conversation_id, turn.speak)
        turn.message_id = reply.id
        convs = await asyncio.to_thread(repo.list_conversations, turn.user_id, "", 50)

        def begin(stream: StreamState, chat: ChatState) -> None:
            chat.conversation_id = turn.conversation_id
            chat.messages = chat.messages + [_msg_row({"id": user.id, "role": "user", "content": text})]
            chat.status = "thinking"
            chat.notice = ""
            chat.error = ""
            chat.conversations = [_conv_row(c) for c in convs]
            stream.user_interim = ""
            stream.reset_turn(turn.turn_id)

        await notify(token, begin)
        flusher = asyncio.get_running_loop().create_task(_flush_loop(turn))
        if early is not None:
            gen = early.events()
        else:
            runner = await services.get_runner(settings)
            if prepared is None:
                prepared = runner.prepare(history or [], turn.conversation_id, spoken=turn.speak)
            gen = runner.run(prepared, text, marks=turn.marks, cancel=turn.cancel, speak=turn.speak)
        try:
            async for ev in gen:
                await _on_event(turn, ev)
        finally:
            with contextlib.suppress(Exception):
                await gen.aclose()
    except asyncio.CancelledError:
        turn.interrupted = True
    except Exception as exc:  # the runner reports provider failures as TurnError; this is a bug or setup issue
        log.exception("turn failed")
        error = f"The turn failed: {type(exc).__name__}: {exc}"[:300]
    finally:
        turn.done = True
        if flusher is not None:
            flusher.cancel()
        await asyncio.shield(_finish(turn, error))


async def _flush_loop(turn: ActiveTurn) -> None:
    while True:
        await asyncio.sleep(FLUSH_S)
        if turn.pending:
            await _flush(turn)


async def _flush(turn: ActiveTurn) -> None:
    if not turn.pending:
        return
    turn.segments.append(turn.pending)
    turn.pending = ""
    segs = list(turn.segments)

    def apply(stream: StreamState, chat: ChatState) -> None:
        if stream.turn_id != turn.turn_id:
            return
        base = max(0, len(segs) - TAIL)
        stream.seg_base = base
        stream.seg_tail = segs[base:]

    await notify(turn.token, apply)


async def _on_event(turn: ActiveTurn, ev: Any) -> None:
    kind = type(ev).__name__
    if kind == "LLMToken":
        turn.pending += ev.text
        turn.reply_text += ev.text
    elif kind == "AudioReady":
        turn.chunks.append((ev.audio_id, ev.text))
        await _flush(turn)
        url = sign_stored_url(ev.url, turn.user_id)

        def apply(stream: StreamState, chat: ChatState) -> None:
            if stream.audio_turn == turn.turn_id:
                stream.audio_urls = stream.audio_urls + [url]

        await notify(turn.token, apply)
        if turn.message_id is not None:
            await _write_message(turn, turn.reply_text, [a for a, _ in turn.chunks])
    elif kind == "StillWorking":
        n = int(ev.waited_ms)

        def apply(stream: StreamState, chat: ChatState) -> None:
            stream.cue = f"still_working:{n}"
            chat.notice = "Still working…"

        await notify(turn.token, apply)
    elif kind == "TurnNotice":
        msg = ev.message

        def apply(stream: StreamState, chat: ChatState) -> None:
            chat.notice = msg

        await notify(turn.token, apply)
    elif kind == "TurnDone":
        turn.reply_text = ev.reply_text or turn.reply_text
    elif kind == "TurnError":
        turn.reply_text = ev.reply_text or turn.reply_text
        turn.error = ev.message
        if ev.audio_url:
            url = sign_stored_url(ev.audio_url, turn.user_id)

            def apply(stream: StreamState, chat: ChatState) -> None:
                if stream.audio_turn == turn.turn_id:
                    stream.audio_urls = stream.audio_urls + [url]

            await notify(turn.token, apply)


async def _write_message(turn: ActiveTurn, content: str, audio_ids: list[str], **flags: Any) -> None:
    """Write the turn's assistant message; writes of one turn run in order.

    A barge-in cancels the turn task while an incremental write may be running in a
    thread; abandoned, it could land after the final write and undo the cut. Each
    write waits for the one before it, and survives the cancellation of its caller."""
    prev = turn.db_last

    async def run() -> None:
        if prev is not None:
            with contextlib.suppress(BaseException):
                await prev
        await asyncio.to_thread(repo.update_assistant_message, turn.user_id, turn.message_id, content, audio_ids, **flags)

    turn.db_last = fut = asyncio.ensure_future(run())
    await asyncio.shield(fut)


def _stored_audio(turn: ActiveTurn) -> list[str]:
    """The audio ids kept with the reply: an interrupted spoken reply keeps the chunks
    that were played, so a replay matches the stored text."""
    chunks = turn.chunks[: turn.played] if turn.interrupted and turn.speak else turn.chunks
    return [a for a, _ in chunks]


def _stored_reply(turn: ActiveTurn) -> str:
    """What the history keeps: interrupted spoken replies end at the last played chunk."""
    if turn.interrupted and turn.speak:
        played = [t.strip() for _, t in turn.chunks[: turn.played] if t.strip()]
        return " ".join(played)
    return turn.reply_text.strip()


async def _finish(turn: ActiveTurn, error: str) -> None:
    error = error or turn.error
    if turn.pending:
        turn.segments.append(turn.pending)
        turn.pending = ""
    turn.marks.mark("turn_done")
    played_at_store = turn.played
    content = _stored_reply(turn)
    timing_id = 0
    try:
        if turn.message_id is not None:
            await _write_message(turn, content, _stored_audio(turn), finished=True, interrupted=turn.interrupted, error=error)
            timing_id = await asyncio.to_thread(repo.save_timing, turn.user_id, turn.conversation_id, turn.message_id, turn.marks, turn.marks.speech_end is not None)
    except Exception:
        log.exception("could not store the turn")
    origin = turn.marks.origin() or 0.0
    if turn.marks.first_audio_playing is None:  # else stored with the timing row: later reports are replays
        FINISHED_TIMINGS[turn.turn_id] = (timing_id, origin, turn.conversation_id, turn.user_id)
    if len(FINISHED_TIMINGS) > 200:
        for k in list(FINISHED_TIMINGS)[:100]:
            FINISHED_TIMINGS.pop(k, None)
    stages = turn.marks.stages()
    log.info("turn %s done interrupted=%s chunks=%d played=%d stages=%s", turn.turn_id, turn.interrupted, len(turn.chunks), turn.played, stages)
    audio_ids = _stored_audio(turn)
    has_audio = bool(turn.chunks) and not turn.interrupted

    def apply(stream: StreamState, chat: ChatState) -> None:
        shown = chat.conversation_id == turn.conversation_id  # not after "new conversation" or picking another one
        row = _msg_row({"id": turn.message_id, "role": "assistant", "content": content, "interrupted": turn.interrupted, "error": error})
        if shown and (content or error or turn.interrupted):
            chat.messages = chat.messages + [row]
        if shown:
            chat.last_audio_ids = audio_ids
        if error and shown:
            chat.error = error
        if stream.audio_turn == turn.turn_id:
            stream.audio_done = True  # the queue may now report "ended" when it drains
        if stream.turn_id == turn.turn_id:
            stream.streaming = False
            stream.turn_id = ""
        if turn.interrupted:
            chat.status = "listening" if chat.mic_on else "idle"
        elif error and not has_audio:
            chat.status = "error"
        elif not has_audio or turn.page_reloaded or chat.status not in ("speaking", "thinking"):
            chat.status = "listening" if chat.mic_on else "idle"
        elif chat.status == "thinking" and has_audio:
            chat.status = "speaking"

    await notify(turn.token, apply)
    turn.finished = True
    if turn.interrupted and turn.speak and turn.played > played_at_store:
        await _store_cut(turn)  # a "stopped" report with more played chunks came in meanwhile
