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
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ..providers.base import TTS, AudioClip, CancelToken, ProviderError
from .audio_store import AudioStore, StoredAudio
from .text import Chunk

log = logging.getLogger("voiceclaw.tts")


class TTSCache:
    """Audio by (provider, voice, speed, text) on disk, so every worker shares it.

    Entries are ordinary files of the audio store with a ``c-`` id prefix, which
    retention and conversation deletion leave alone.
    """

    def __init__(self, store: AudioStore):
        self.store = store

    @staticmethod
    def key(identity: tuple, text: str) -> str:
        digest = hashlib.sha256(repr((identity, text.strip())).encode()).hexdigest()[:32]
        return f"c-{digest}"

    def get(self, identity: tuple, text: str) -> StoredAudio | None:
        audio_id = self.key(identity, text)
        path = self.store.path_for(audio_id)
        if path is None:
            return None
        clip = AudioClip.from_wav(path.read_bytes())
        return StoredAudio(audio_id, self.store.url_for(audio_id), path, clip.duration_ms)

    def put(self, identity: tuple, text: str, clip) -> StoredAudio:
        return self.store.save(clip, self.key(identity, text))


async def synthesize_cached(tts: TTS, cache: TTSCache | None, store: AudioStore, text: str, *, voice: str, speed: float, cancel: CancelToken) -> StoredAudio | None:
    """One phrase through the cache; ``None`` if cancelled before it was stored."""
    identity = tts.cache_identity(voice, speed)
    if cache is not None:
        hit = cache.get(identity, text)
        if hit is not None:
            return hit
    clip = await tts.synthesize(text, voice=voice, speed=speed, cancel=cancel)
    if cancel.cancelled:
        return None
    return cache.put(identity, text, clip) if cache is not None else store.save(clip)


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
        """Cancel everything still running and wait until it has stopped."""
        self.cancel.cancel()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.close()

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
