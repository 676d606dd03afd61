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

from ..providers.base import TTS, CancelToken, ProviderError
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
        from ..providers.base import AudioClip

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
    chunk: Chunk
    audio: StoredAudio | None  # None with ``error`` set when synthesis failed
    error: ProviderError | None = None


class TTSScheduler:
    def __init__(self, tts: TTS, store: AudioStore, *, voice: str, speed: float, parallel: int, cancel: CancelToken, cache: TTSCache | None = None, on_first_request: Callable[[], None] | None = None):
        self.tts = tts
        self.store = store
        self.voice = voice
        self.speed = speed
        self.cancel = cancel
        self.cache = cache
        self._sem = asyncio.Semaphore(max(1, parallel))
        self._queue: asyncio.Queue[asyncio.Task[ChunkAudio] | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[ChunkAudio]] = []
        self._on_first_request = on_first_request
        self._closed = False

    def submit(self, chunk: Chunk) -> None:
        if self._closed or self.cancel.cancelled:
            return
        task = asyncio.create_task(self._synthesize(chunk), name=f"tts-chunk-{chunk.seq}")
        self._tasks.append(task)
        self._queue.put_nowait(task)

    def close(self) -> None:
        """No more chunks will come."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    async def results(self) -> AsyncIterator[ChunkAudio]:
        """Audio in submission order, as soon as each (and all before it) is ready."""
        while True:
            task = await self._queue.get()
            if task is None:
                return
            result = await task
            if self.cancel.cancelled:
                return
            yield result

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

    async def _synthesize(self, chunk: Chunk) -> ChunkAudio:
        async with self._sem:
            if self.cancel.cancelled:
                return ChunkAudio(chunk, None)
            if self._on_first_request is not None:
                self._on_first_request()
                self._on_first_request = None
            try:
                audio = await synthesize_cached(self.tts, self.cache, self.store, chunk.speech, voice=self.voice, speed=self.speed, cancel=self.cancel)
            except ProviderError as exc:
                return ChunkAudio(chunk, None, exc)
            except Exception as exc:  # an engine bug must end in a message, not a stuck turn
                log.exception("TTS failed on chunk %d", chunk.seq)
                return ChunkAudio(chunk, None, ProviderError(f"Speech synthesis failed ({type(exc).__name__})."))
            return ChunkAudio(chunk, audio)
