"""Synthesize up to K chunks at once, deliver their audio strictly in order.

Chunk 1 starts the moment it exists (tasks take a FIFO semaphore in submission
order, so it is never overtaken by look-ahead work); later chunks synthesize while
earlier ones play. Cancelling stops every pending and running synthesis: asyncio
tasks are cancelled and awaited, and engines running in threads see the
:class:`CancelToken` at their next chunk boundary; nothing of a cancelled turn is
stored or delivered afterwards.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable

from ..providers.base import TTS, AudioClip, CancelToken, ProviderError
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
        if path is None:
            return None
        try:
            stored = self.store.save(AudioClip.from_wav(path.read_bytes()))
            os.utime(path)  # recently used: the LRU keeps it
        except (OSError, EOFError, wave.Error):
            return None  # pruned meanwhile by another worker, or damaged: synthesize again
        return stored

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
        hit = cache.get(identity, text)
        if hit is not None:
            return hit
    clip = await tts.synthesize(text, voice=voice, speed=speed, cancel=cancel)
    if cancel.cancelled:
        return None
    stored = store.save(clip)
    if cache is not None:
        cache.put(identity, text, clip)
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

    def submit(self, chunk: Chunk) -> None:
        if self._closed or self.cancel.cancelled:
            return
        pieces: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(self._synthesize(chunk, pieces), name=f"tts-chunk-{chunk.seq}")
        self._tasks.append(task)
        self._queue.put_nowait(pieces)

    def close(self) -> None:
        """No more chunks will come."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

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
                if self._on_first_request is not None:
                    self._on_first_request()
                    self._on_first_request = None
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
            hit = self.cache.get(identity, chunk.speech)
            if hit is not None:
                out.put_nowait(ChunkAudio(chunk, hit))
                return
        clips: list[AudioClip] = []
        async for clip in self.tts.synthesize_stream(chunk.speech, voice=self.voice, speed=self.speed, cancel=self.cancel):
            if self.cancel.cancelled:
                return
            out.put_nowait(ChunkAudio(chunk, self.store.save(clip), part=len(clips)))
            clips.append(clip)
        if clips and self.cache is not None and not self.cancel.cancelled:
            # the whole chunk, joined, so a repeat of this phrase is instant
            whole = b"".join(c.pcm16() for c in clips)
            self.cache.put(identity, chunk.speech, AudioClip.from_pcm16(whole, clips[0].sample_rate))
