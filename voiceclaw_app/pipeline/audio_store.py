"""Chunk audio as WAV files under the data dir, served at ``/audio/<id>.wav``.

Files on disk (not a module-level dict) so every worker process on this machine can
serve what any other synthesized; ids are random so a URL cannot be guessed from its
text. With several machines, :class:`~.audio_store_db.DbAudioStore` (same interface)
also keeps every clip in the database, so any box can serve it (see
:func:`~.audio_store_db.open_audio_store`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..providers.base import AudioClip

T = TypeVar("T")

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")


@dataclass(frozen=True)
class StoredAudio:
    audio_id: str
    url: str
    path: Path
    duration_ms: float


class AudioStore:
    """Writes clips atomically and resolves ids back to files, safely."""

    #: True when other machines can read what this store saves (not only this disk)
    shared = False

    def __init__(self, root: Path, url_prefix: str = "/audio"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url_prefix = url_prefix.rstrip("/")
        self._io: concurrent.futures.ThreadPoolExecutor | None = None

    async def run_io(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on this store's file thread, off the event loop.

        Why: a clip written on the event loop held a loaded worker's loop 130-270 ms
        (the disk busy with PostgreSQL and the other workers; ``VOICECLAW_LOOP_WATCH_MS``
        caught it), and with it every session's microphone on that worker. One thread,
        so the store's (and its cache's) writes never race each other, and no turn's
        audio waits behind the database calls in the default executor."""
        if self._io is None:
            self._io = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="audio-io")
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)

    async def save_async(self, clip: AudioClip, audio_id: str | None = None) -> StoredAudio:
        """:meth:`save` on the store's file thread (what a turn calls)."""
        return await self.run_io(self.save, clip, audio_id)

    def url_for(self, audio_id: str) -> str:
        return f"{self.url_prefix}/{audio_id}.wav"

    def save(self, clip: AudioClip, audio_id: str | None = None) -> StoredAudio:
        """Write the WAV (temp file + rename, so a reader never sees half a file)."""
        audio_id = audio_id or secrets.token_urlsafe(12)
        if not _ID_RE.match(audio_id):
            raise ValueError(f"bad audio id {audio_id!r}")
        path = self.root / f"{audio_id}.wav"
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(clip.wav)
        os.replace(tmp, path)
        return StoredAudio(audio_id, self.url_for(audio_id), path, clip.duration_ms)

    def path_for(self, audio_id: str) -> Path | None:
        """The file for an id, or None for unknown or malformed ids (no path tricks)."""
        if not _ID_RE.match(audio_id):
            return None
        path = self.root / f"{audio_id}.wav"
        return path if path.is_file() else None

    async def locate(self, audio_id: str) -> Path | None:
        """:meth:`path_for` off the event loop (the route's accessor; a shared store
        may have to fetch the clip, or wait a moment for another worker's upload)."""
        return await asyncio.to_thread(self.path_for, audio_id)

    def delete(self, audio_ids: list[str]) -> int:
        removed = 0
        for audio_id in audio_ids:
            path = self.path_for(audio_id)
            if path is not None:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def prune(self, max_age_s: float) -> int:
        """Delete audio files older than the retention period.

        Every file here is turn (or phrase) audio under a random id; the TTS cache
        lives in its own folder (``cache/``, not served) and prunes itself by size.
        """
        cutoff = time.time() - max_age_s
        removed = 0
        for path in self.root.glob("*.wav"):
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink(missing_ok=True)
                    removed += 1
            except FileNotFoundError:
                continue
        return removed
