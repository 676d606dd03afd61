"""Synthesize up to K chunks at once, deliver their audio strictly in order.

Chunk 1 starts the moment it exists (tasks take a FIFO semaphore in submission
order, so it is never overtaken by look-ahead work); later chunks synthesize while
earlier ones play. Cancelling stops every pending and running synthesis: asyncio
tasks are cancelled and awaited, and engines running in threads see the
:class:`CancelToken` at their next chunk boundary; nothing of a cancelled turn is
stored or delivered afterwards.

Providers that take text over a long-lived socket (``capabilities.text_stream``:
Deepgram Aura, OpenAI Realtime) get the whole reply through one
:class:`~voiceclaw_app.providers.base.ReplyStream` instead (:class:`StreamedReply`):
each chunk's text is pushed as it is cut and flushed at the chunk boundary, so
synthesis starts without a request's setup and the service sees the sentence in
context. Where a service limits flushes (Aura: 20 per 60 s), :class:`FlushPolicy`
flushes the first chunks of a reply at once and groups later ones; a group's audio
is delivered as one chunk (the first one's ``seq``, the group's joined text), so
``AudioReady`` keeps meaning "this text is what plays". Barge-in sends ``Clear``
(or ``response.cancel``). If the stream cannot open, or breaks, the chunks whose
audio has not started go through the per-chunk path (a fresh request each).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Callable

from ..providers.base import TTS, AudioClip, CancelToken, ProviderError, ProviderTimeout, ReplyAudio, ReplyFlushed, ReplyStream, StreamDropped
from .audio_store import AudioStore, StoredAudio
from .text import Chunk

log = logging.getLogger("voiceclaw.tts")


CACHE_MAX_BYTES = 64 * 1024 * 1024
CACHE_MAX_ENTRIES = 1000


class TTSCache:
    """Audio by (provider, voice, speed, text) on disk, so every worker shares it.

    Entries live in ``<audio root>/cache/`` under a hash of the key: that folder is
    not served, and no turn ever hands out an entry's path. A hit is *copied* into a
    fresh random-id file of the audio store (:meth:`get`), which belongs to the
    turn (or phrase) that asked for it and is deleted with its conversation or by
    retention without touching the cache. Entries of the app's fixed phrases
    (:meth:`pin`) are kept; the others form an LRU pruned to ``max_bytes`` /
    ``max_entries`` (use updates a file's mtime).
    """

    def __init__(self, store: AudioStore, *, max_bytes: int = CACHE_MAX_BYTES, max_entries: int = CACHE_MAX_ENTRIES):
        self.store = store
        self.dir = store.root / "cache"
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._pinned: set[str] = set()
        self._size: int | None = None  # bytes of unpinned entries (lazily scanned)
        self._count = 0

    def pin(self, *texts: str) -> None:
        """Texts that are never evicted (the app's fixed phrases)."""
        self._pinned.update(t.strip() for t in texts)

    def entry_path(self, identity: tuple, text: str) -> Path:
        digest = hashlib.sha256(repr((identity, text.strip())).encode()).hexdigest()[:40]
        prefix = "f" if text.strip() in self._pinned else "r"
        return self.dir / f"{prefix}-{digest}.wav"

    def lookup(self, identity: tuple, text: str) -> Path | None:
        """The cache entry's file (internal; never give this path to a turn)."""
        path = self.entry_path(identity, text)
        return path if path.is_file() else None

    def get(self, identity: tuple, text: str) -> StoredAudio | None:
        """On a hit, a fresh random-id copy of the cached audio in the audio store."""
        path = self.lookup(identity, text)
        return None if path is None else self._copy(path)

    def _copy(self, path: Path) -> StoredAudio | None:
        """A fresh copy of the entry at ``path`` in the audio store; None if it just went."""
        try:
            stored = self.store.save(AudioClip.from_wav(path.read_bytes()))
            os.utime(path)  # recently used: the LRU keeps it
        except (OSError, EOFError, wave.Error):
            return None  # pruned meanwhile by another worker, or damaged: synthesize again
        return stored

    async def aget(self, identity: tuple, text: str) -> StoredAudio | None:
        """:meth:`get` with the copy made on the store's file thread. A miss (a reply's
        usual case) has nothing to copy: it is answered here with one stat, without
        waiting for that thread behind other writes."""
        path = self.lookup(identity, text)
        if path is None:
            return None
        return await self.store.run_io(self._copy, path)

    async def aput(self, identity: tuple, text: str, clip: AudioClip) -> None:
        """:meth:`put` on the store's file thread."""
        await self.store.run_io(self.put, identity, text, clip)

    def put(self, identity: tuple, text: str, clip: AudioClip) -> None:
        """Remember a phrase's audio (atomic write), then keep the cache under its cap.
        A cache that cannot be written (disk full) only costs a later synthesis."""
        path = self.entry_path(identity, text)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_bytes(clip.wav)
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("could not cache synthesized audio: %s", exc)
            return
        if path.name.startswith("r-"):
            if self._size is None:
                self._scan()
            else:
                self._size += len(clip.wav)
                self._count += 1
            if self._size > self.max_bytes or self._count > self.max_entries:
                self.prune()

    def _entries(self) -> list[tuple[float, int, Path]]:
        out = []
        for path in self.dir.glob("r-*.wav"):
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((st.st_mtime, st.st_size, path))
        return out

    def _scan(self) -> None:
        entries = self._entries()
        self._size = sum(e[1] for e in entries)
        self._count = len(entries)

    def prune(self) -> int:
        """Evict the least recently used unpinned entries down to ~80% of the caps."""
        entries = sorted(self._entries())
        size = sum(e[1] for e in entries)
        count = len(entries)
        removed = 0
        for _, nbytes, path in entries:
            if size <= self.max_bytes * 0.8 and count <= self.max_entries * 0.8:
                break
            path.unlink(missing_ok=True)
            size -= nbytes
            count -= 1
            removed += 1
        self._size, self._count = size, count
        return removed


async def synthesize_cached(tts: TTS, cache: TTSCache | None, store: AudioStore, text: str, *, voice: str, speed: float, cancel: CancelToken) -> StoredAudio | None:
    """One phrase through the cache, as a fresh random-id file of ``store``;
    ``None`` if cancelled before it was stored."""
    identity = tts.cache_identity(voice, speed)
    if cache is not None:
        hit = await cache.aget(identity, text)
        if hit is not None:
            return hit
    clip = await tts.synthesize(text, voice=voice, speed=speed, cancel=cancel)
    if cancel.cancelled:
        return None
    stored = await store.save_async(clip)
    if cache is not None:
        await cache.aput(identity, text, clip)
    return stored


@dataclass(frozen=True)
class ChunkAudio:
    """One playable piece of a chunk's audio (``part`` 0, 1, ...), or its failure.

    Streaming providers hand over a chunk in pieces so playback starts early; the
    pieces play back to back.
    """

    chunk: Chunk
    audio: StoredAudio | None  # None with ``error`` set when synthesis failed
    error: ProviderError | None = None
    part: int = 0


_DONE = object()
#: a streamed reply's first piece is handed to the player once this much audio is here
#: (audio arrives faster than real time, so a short first piece costs no gap); pieces
#: after it are twice as long as the one before (each stays ahead of playback)
FIRST_PIECE_MS = 200
#: how long :meth:`TTSScheduler.aclose` lets running syntheses stop on their own
THREAD_GRACE_S = 2.0  # engines in threads stop at their next chunk boundary
STREAMING_GRACE_S = 0.2  # network streams see the token at their next read


class TTSScheduler:
    def __init__(self, tts: TTS, store: AudioStore, *, voice: str, speed: float, parallel: int, cancel: CancelToken, cache: TTSCache | None = None, on_first_request: Callable[[], None] | None = None):
        self.tts = tts
        self.store = store
        self.voice = voice
        self.speed = speed
        self.cancel = cancel
        self.cache = cache
        self._sem = asyncio.Semaphore(max(1, parallel))
        self._queue: asyncio.Queue[asyncio.Queue | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._on_first_request = on_first_request
        self._closed = False
        self._stream: StreamedReply | None = StreamedReply(self) if tts.capabilities.text_stream else None

    def submit(self, chunk: Chunk) -> None:
        if self._closed or self.cancel.cancelled:
            return
        pieces: asyncio.Queue = asyncio.Queue()
        self._queue.put_nowait(pieces)
        if self._stream is not None and self._stream.accepts():
            self._stream.submit(chunk, pieces)
            return
        self.per_chunk(chunk, pieces)

    def per_chunk(self, chunk: Chunk, pieces: asyncio.Queue) -> None:
        """Synthesize one chunk with its own request (also the streamed path's fallback)."""
        task = asyncio.create_task(self._synthesize(chunk, pieces), name=f"tts-chunk-{chunk.seq}")
        self._tasks.append(task)

    def first_request(self) -> None:
        if self._on_first_request is not None:
            self._on_first_request()
            self._on_first_request = None

    def close(self) -> None:
        """No more chunks will come."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)
            if self._stream is not None:
                self._stream.close()

    async def results(self) -> AsyncIterator[ChunkAudio]:
        """Audio pieces in submission order, each as soon as it (and all before it) is ready."""
        while True:
            pieces = await self._queue.get()
            if pieces is None:
                return
            while True:
                item = await pieces.get()
                if item is _DONE:
                    break
                if self.cancel.cancelled:
                    return
                yield item

    async def aclose(self) -> None:
        """Cancel everything still running and wait until it has stopped.

        Cancelling an asyncio task that awaits a worker thread does not stop the
        thread, so the token goes first and running syntheses get a bounded grace
        period to return on their own (engines in threads check the token at their
        next chunk boundary); only then are the stragglers cancelled. When this
        returns, no synthesis of this turn runs, in a task or (within the bound) a
        thread.
        """
        self.cancel.cancel()
        self.close()
        if self._stream is not None:
            await self._stream.aclose()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            grace = STREAMING_GRACE_S if self.tts.capabilities.streaming else THREAD_GRACE_S
            _, pending_set = await asyncio.wait(pending, timeout=grace)
            if pending_set:
                log.debug("%d TTS task(s) still running after %.1fs: cancelling them", len(pending_set), grace)
            for task in pending_set:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def running(self) -> int:
        return sum(1 for t in self._tasks if not t.done())

    async def _synthesize(self, chunk: Chunk, out: asyncio.Queue) -> None:
        try:
            async with self._sem:
                if self.cancel.cancelled:
                    return
                self.first_request()
                try:
                    await self._pieces(chunk, out)
                except ProviderError as exc:
                    out.put_nowait(ChunkAudio(chunk, None, exc))
                except Exception as exc:  # an engine bug must end in a message, not a stuck turn
                    log.exception("TTS failed on chunk %d", chunk.seq)
                    out.put_nowait(ChunkAudio(chunk, None, ProviderError(f"Speech synthesis failed ({type(exc).__name__}).")))
        finally:
            out.put_nowait(_DONE)

    async def _pieces(self, chunk: Chunk, out: asyncio.Queue) -> None:
        if not self.tts.capabilities.streaming:
            audio = await synthesize_cached(self.tts, self.cache, self.store, chunk.speech, voice=self.voice, speed=self.speed, cancel=self.cancel)
            if audio is not None and not self.cancel.cancelled:
                out.put_nowait(ChunkAudio(chunk, audio))
            return
        identity = self.tts.cache_identity(self.voice, self.speed)
        if self.cache is not None:
            hit = await self.cache.aget(identity, chunk.speech)
            if hit is not None:
                out.put_nowait(ChunkAudio(chunk, hit))
                return
        clips: list[AudioClip] = []
        async for clip in self.tts.synthesize_stream(chunk.speech, voice=self.voice, speed=self.speed, cancel=self.cancel):
            if self.cancel.cancelled:
                return
            out.put_nowait(ChunkAudio(chunk, await self.store.save_async(clip), part=len(clips)))
            clips.append(clip)
        if clips and self.cache is not None and not self.cancel.cancelled:
            # the whole chunk, joined, so a repeat of this phrase is instant
            whole = b"".join(c.pcm16() for c in clips)
            await self.cache.aput(identity, chunk.speech, AudioClip.from_pcm16(whole, clips[0].sample_rate))


# ---------------------------------------------------------------- streamed text in
@dataclass
class FlushPolicy:
    """When to flush a reply's pending text, for a service that limits flushes
    (Aura: 20 per 60 s per socket; without a limit every chunk is flushed at once).

    A reply's first chunk is flushed at once (first audio is the latency that
    matters). After that a flush is spent only when it is needed: when the audio
    already delivered is about to run out (less than ``low_water_s`` left to play),
    when ``group_chars`` of text wait and more than ``reserve`` flushes are left (the
    reserve keeps the next replies' first chunks fast), and at the reply's end. So a
    short reply costs two flushes and a long one a few, not one per sentence."""

    low_water_s: float = 1.0
    reserve: int = 5
    group_chars: int = 300

    def flush_now(self, *, first: bool, pending_chars: int, left: int, limited: bool, ahead_s: float) -> bool:
        """``first``: nothing of the reply is playing or on its way yet."""
        if left <= 0:
            return False
        if not limited or first:
            return True
        if ahead_s < self.low_water_s:
            return True
        return left > self.reserve and pending_chars >= self.group_chars


@dataclass
class _Group:
    """Chunks flushed together: their audio plays as one chunk (the first's queue)."""

    flush_id: int
    members: list[tuple[Chunk, asyncio.Queue]]
    pcm: bytearray = field(default_factory=bytearray)
    parts: int = 0
    piece_ms: float = FIRST_PIECE_MS
    clips: list[AudioClip] = field(default_factory=list)

    @property
    def chunk(self) -> Chunk:
        first = self.members[0][0]
        if len(self.members) == 1:
            return first
        return dataclasses.replace(first, text="".join(c.text for c, _ in self.members), speech=" ".join(c.speech.strip() for c, _ in self.members))

    @property
    def out(self) -> asyncio.Queue:
        return self.members[0][1]

    def done(self) -> None:
        for _, q in self.members:
            q.put_nowait(_DONE)


_CLOSE = object()


class StreamedReply:
    """One reply through a provider's :class:`ReplyStream` (see the module notes).

    Every chunk's queue ends with ``_DONE`` exactly once whatever happens (flushed,
    grouped, cleared, failed over to the per-chunk path), so :meth:`TTSScheduler.results`
    never waits forever."""

    def __init__(self, sched: TTSScheduler, policy: FlushPolicy | None = None):
        self.sched = sched
        self.policy = policy or FlushPolicy()
        self._in: asyncio.Queue = asyncio.Queue()
        self._pending: list[tuple[Chunk, asyncio.Queue]] = []  # pushed, not flushed
        self._groups: deque[_Group] = deque()  # flushed, audio not complete
        self._flushes = 0
        self._failed = False
        self._first_audio_at: float | None = None  # monotonic s of the reply's first piece
        self._audio_s = 0.0  # audio delivered so far
        self._reply: ReplyStream | None = None
        self._task: asyncio.Task | None = None
        self._reader: asyncio.Task | None = None
        self._watch: asyncio.Task | None = None
        #: monotonic s of the service's last audio or flush marker, or of our last flush
        self._heard_at = 0.0
        self._progress = asyncio.Event()  # a flush completed, the reader ended, or cancelled

    def accepts(self) -> bool:
        return not self._failed

    def submit(self, chunk: Chunk, pieces: asyncio.Queue) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="tts-reply-stream")
        self._in.put_nowait((chunk, pieces))

    def close(self) -> None:
        self._in.put_nowait(_CLOSE)

    # ------------------------------------------------------------ writer
    async def _run(self) -> None:
        s = self.sched
        try:
            try:
                s.first_request()
                self._reply = await s.tts.open_reply(voice=s.voice, speed=s.speed, cancel=s.cancel)
            except ProviderError as exc:
                log.info("TTS stream could not open (%s); per-chunk requests for this reply", exc.kind)
                self._fail_over(exc)
                return
            self._reader = asyncio.create_task(self._read(self._reply), name="tts-reply-reader")
            self._watch = asyncio.create_task(self._stall_watch(self._reply), name="tts-reply-watch")
            closing = False
            while not s.cancel.cancelled and not self._failed:
                item = None
                if not closing:
                    timeout = self._recheck_s() if self._pending else None
                    try:
                        item = await asyncio.wait_for(self._in.get(), timeout) if timeout is not None else await self._in.get()
                    except asyncio.TimeoutError:
                        item = None
                if item is _CLOSE:
                    closing = True
                elif item is not None:
                    await self._chunk(*item)
                if self._failed:
                    return
                if self._pending and (closing or self._flush_due()):
                    if self._reply.flushes.left() > 0:
                        await self._flush()
                    else:  # the reply is complete but the window is spent: wait for a slot
                        await self._wait_or_cancel(max(0.05, self._reply.flushes.wait_s()))
                        continue
                if closing and not self._pending:
                    break
            # the reply's text is all flushed: wait for its audio
            while self._groups and not self._failed and not s.cancel.cancelled and not self._reader.done():
                self._progress.clear()
                await self._progress.wait()
        except ProviderError as exc:
            self._fail_over(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a provider bug must end in a message, not a stuck turn
            log.exception("TTS stream failed")
            self._fail_over(ProviderError(f"Speech synthesis failed ({type(exc).__name__})."))
        finally:
            await self._finish()

    def _pending_chars(self) -> int:
        return sum(len(c.speech) for c, _ in self._pending)

    def _ahead_s(self) -> float:
        """Audio delivered and not yet played (as if playback started on delivery); while
        a flush's audio has not begun to arrive, more flushing would not help: infinite."""
        if self._groups and self._groups[0].parts == 0:
            return float("inf")
        if self._first_audio_at is None:
            return 0.0
        return self._audio_s - (time.monotonic() - self._first_audio_at)

    def _flush_due(self) -> bool:
        assert self._reply is not None
        w = self._reply.flushes
        first = self._first_audio_at is None and not self._groups
        return self.policy.flush_now(first=first, pending_chars=self._pending_chars(), left=w.left(), limited=w.limit is not None, ahead_s=self._ahead_s())

    def _recheck_s(self) -> float:
        """How long the writer may wait for the next chunk before the pending text must go."""
        assert self._reply is not None
        if self._reply.flushes.left() <= 0:
            return max(0.05, self._reply.flushes.wait_s())
        ahead = self._ahead_s()
        if ahead == float("inf"):
            return 0.05  # re-check once the outstanding flush's audio starts
        return max(0.02, ahead - self.policy.low_water_s)

    async def _wait_or_cancel(self, delay_s: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.sched.cancel.wait(), delay_s)

    async def _chunk(self, chunk: Chunk, pieces: asyncio.Queue) -> None:
        s = self.sched
        assert self._reply is not None
        identity = s.tts.cache_identity(s.voice, s.speed)
        hit = await s.cache.aget(identity, chunk.speech) if s.cache is not None else None
        if hit is not None:
            if self._pending:  # the group before it must not play after it
                while self._reply.flushes.left() <= 0 and not s.cancel.cancelled:
                    await self._wait_or_cancel(max(0.05, self._reply.flushes.wait_s()))
                await self._flush()
            pieces.put_nowait(ChunkAudio(chunk, hit))
            pieces.put_nowait(_DONE)
            self._delivered_audio(hit.duration_ms)
            return
        text = chunk.speech.strip()
        # pieces are joined exactly as sent: one space between chunks, none at the reply's start
        await self._reply.push(text if not (self._pending or self._groups or self._flushes) else " " + text)
        self._pending.append((chunk, pieces))

    async def _flush(self) -> None:
        """Flush ids count from 0 per reply (the :class:`ReplyStream` contract), so the
        group is known before the flush is sent and no audio can arrive ahead of it."""
        assert self._reply is not None
        members, self._pending = self._pending, []
        group = _Group(self._flushes, members)
        self._groups.append(group)
        self._flushes += 1
        self._heard_at = time.monotonic()
        flush_id = await self._reply.flush()
        if flush_id != group.flush_id:
            raise ProviderError("Speech synthesis got out of step.", detail=f"flush id {flush_id} != {group.flush_id}")

    # ------------------------------------------------------------ reader
    async def _read(self, reply: ReplyStream) -> None:
        s = self.sched
        try:
            async for ev in reply.events():
                if s.cancel.cancelled:
                    return
                self._heard_at = time.monotonic()
                if isinstance(ev, ReplyAudio):
                    group = self._group(ev.flush_id)
                    if group is not None:
                        group.pcm += ev.pcm16
                        if len(group.pcm) >= 2 * reply.sample_rate * group.piece_ms / 1000:
                            await self._piece(group, reply.sample_rate)
                            group.piece_ms *= 2
                elif isinstance(ev, ReplyFlushed):
                    group = self._group(ev.flush_id)
                    if group is None:
                        continue
                    if group.pcm:
                        await self._piece(group, reply.sample_rate)
                    self._groups.popleft()
                    if len(group.members) == 1 and group.clips and s.cache is not None and not s.cancel.cancelled:
                        whole = b"".join(c.pcm16() for c in group.clips)
                        await s.cache.aput(s.tts.cache_identity(s.voice, s.speed), group.chunk.speech, AudioClip.from_pcm16(whole, reply.sample_rate))
                    group.done()
                    self._progress.set()
            if (self._groups or self._pending) and not s.cancel.cancelled:
                raise StreamDropped("The speech service closed the stream before the reply's audio was complete.", retryable=True)
        except ProviderError as exc:
            if not s.cancel.cancelled:
                log.info("TTS stream broke (%s): %s", exc.kind, exc.detail or exc.user_message)
                self._fail_over(exc)
        finally:
            self._progress.set()

    async def _stall_watch(self, reply: ReplyStream) -> None:
        """A service that took a flush and then sends nothing (no audio, no flush
        marker) would hold the turn, and the status, at "thinking" for ever: the reader
        waits on a socket that is open but silent. Past ``reply.stall_timeout_s``
        without a word from it while audio is owed, the stream fails over as a broken
        one does (chunks not yet heard get their own request, which has its own
        first-audio timeout, so a service that stays silent ends in a notice)."""
        limit = max(0.05, reply.stall_timeout_s)
        while not self._failed and not self.sched.cancel.cancelled:
            await asyncio.sleep(min(0.25, limit / 4))
            if self._groups and time.monotonic() - self._heard_at > limit:
                log.info("TTS stream sent nothing for %.1fs with audio owed; failing over", limit)
                self._fail_over(ProviderTimeout(f"The speech service sent no audio for {limit:.0f} s.", retryable=True))
                if self._reader is not None:
                    self._reader.cancel()
                self._progress.set()
                return

    def _group(self, flush_id: int) -> _Group | None:
        """The group a flush id belongs to (the oldest open one; an id before it is stale)."""
        while self._groups and self._groups[0].flush_id < flush_id:
            self._groups.popleft().done()  # a flush the service never confirmed: end it
        return self._groups[0] if self._groups and self._groups[0].flush_id == flush_id else None

    async def _piece(self, group: _Group, rate: int) -> None:
        s = self.sched
        pcm = bytes(group.pcm[: len(group.pcm) & ~1])
        group.pcm = group.pcm[len(pcm):]
        if not pcm or s.cancel.cancelled:
            return
        clip = AudioClip.from_pcm16(pcm, rate)
        group.out.put_nowait(ChunkAudio(group.chunk, await s.store.save_async(clip), part=group.parts))
        group.parts += 1
        group.clips.append(clip)
        self._delivered_audio(clip.duration_ms)

    def _delivered_audio(self, ms: float) -> None:
        if self._first_audio_at is None:
            self._first_audio_at = time.monotonic()
        self._audio_s += ms / 1000.0

    # ------------------------------------------------------------ failure, end
    def _fail_over(self, exc: ProviderError) -> None:
        """The stream failed: chunks whose audio has not started get their own request;
        a chunk cut mid-audio ends there (repeating its start would be heard)."""
        if self._failed:
            return
        self._failed = True
        s = self.sched
        if s.cancel.cancelled:
            return
        waiting: list[tuple[Chunk, asyncio.Queue]] = []
        for group in self._groups:
            if group.parts:
                group.done()
            else:
                waiting.extend(group.members)
        self._groups.clear()
        waiting.extend(self._pending)
        self._pending = []
        while True:
            try:
                item = self._in.get_nowait()
            except asyncio.QueueEmpty:
                break
            if item is not _CLOSE:
                waiting.append(item)
        self._in.put_nowait(_CLOSE)  # the writer may be waiting for a chunk: wake it (it returns, failed)
        for chunk, pieces in waiting:
            s.per_chunk(chunk, pieces)

    async def _finish(self) -> None:
        """End every queue still open and give the socket back (cleared when cancelled)."""
        reply, self._reply = self._reply, None
        if self.sched.cancel.cancelled:
            for group in self._groups:
                group.done()
            for _, q in self._pending:
                q.put_nowait(_DONE)
            self._groups.clear()
            self._pending = []
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        if self._reader is not None and not self._reader.done():
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        if reply is not None:
            with contextlib.suppress(Exception):
                if self.sched.cancel.cancelled or self._failed:
                    await reply.clear()
                await reply.aclose()

    async def aclose(self) -> None:
        """Cancelled: stop pushing, clear the service's buffer, wait for the writer."""
        task = self._task
        if task is None:
            return
        if not task.done():
            # the writer wakes (its loop checks the token), or is cancelled
            self._in.put_nowait(_CLOSE)
            self._progress.set()
            _, pending = await asyncio.wait([task], timeout=STREAMING_GRACE_S)
            if pending:
                task.cancel()
        with contextlib.suppress(BaseException):
            await task
