"""Reply audio that every worker on every machine can serve: clips kept in the database.

Why the database and not Redis or S3: a multi-box deployment already runs one
PostgreSQL (conversations, settings, timings), the clips are small (a few hundred
KB per reply), retention is days (history replays them), and deleting a
conversation must delete its audio: one store that does all of that, with no
extra service to operate. Redis would hold days of audio in RAM; an S3 bucket is one
more thing to run and secure.

How it stays off the turn's critical path: :meth:`DbAudioStore.save` writes the
WAV to the local audio directory exactly like :class:`AudioStore` (the worker that
synthesized it serves it from there at once) and hands the id to an uploader
thread, which inserts it into ``vc_audio_blob``. A worker that is asked for an id
it does not have fetches the row (and keeps a local copy); :meth:`locate` waits up
to ``fetch_wait_s`` for a clip that another worker has announced but not yet
uploaded. When the database is unreachable the uploader keeps the ids and retries
(the clips are on the synthesizing worker's disk meanwhile), so a database outage
never blocks or fails a turn.

Selected by ``VOICECLAW_AUDIO_STORE``: ``disk`` (one box), ``db``, or ``auto`` (the
default): ``db`` when the database is not SQLite (a PostgreSQL URL means
several boxes may share it), ``disk`` otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import Column, Float, LargeBinary, MetaData, String, Table, create_engine, delete, insert, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ..providers.base import AudioClip
from .audio_store import _ID_RE, AudioStore, StoredAudio

log = logging.getLogger("voiceclaw.audio")

_metadata = MetaData()
#: Created by the store itself (``checkfirst``), not by an Alembic revision: it is a
#: blob store the app's models never join against, like the TTS cache's folder.
audio_blobs = Table(
    "vc_audio_blob",
    _metadata,
    Column("id", String(64), primary_key=True),
    Column("wav", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False, index=True),
)


class DbAudioStore(AudioStore):
    """:class:`AudioStore` whose clips also live in a database table (any worker reads them)."""

    shared = True

    def __init__(self, root: Path, database_url: str, url_prefix: str = "/audio", *, fetch_wait_s: float = 3.0, retry_s: float = 1.0):
        super().__init__(root, url_prefix)
        self.fetch_wait_s = fetch_wait_s
        self.retry_s = retry_s
        kwargs: dict = {"pool_pre_ping": True}
        if database_url.startswith("postgresql"):
            kwargs["connect_args"] = {"connect_timeout": 3}  # an outage must not hang a request for long
        elif database_url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 15}
        self.engine: Engine = create_engine(database_url, **kwargs)
        self._pending: list[str] = []
        self._inflight: set[str] = set()  # ids taken by the uploader, not yet committed
        self._cond = threading.Condition()
        self._closed = False
        self._schema_ready = False
        self._uploader = threading.Thread(target=self._upload_forever, name="audio-upload", daemon=True)
        self._uploader.start()

    # -- writing ---------------------------------------------------------------
    def save(self, clip: AudioClip, audio_id: str | None = None) -> StoredAudio:
        stored = super().save(clip, audio_id)
        with self._cond:
            self._pending.append(stored.audio_id)
            self._cond.notify()
        return stored

    def _ensure_schema(self) -> None:
        """Create the table once. ``checkfirst`` is check-then-create: workers starting
        together can both see no table, and the loser's CREATE fails; the table then
        exists, which is all this needs (checked again before giving up)."""
        if not self._schema_ready:
            try:
                _metadata.create_all(self.engine, checkfirst=True)
            except Exception:
                if not all(sa.inspect(self.engine).has_table(t.name) for t in _metadata.sorted_tables):
                    raise
            self._schema_ready = True

    def _upload_forever(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed and not self._pending:
                    return
                batch, self._pending = self._pending, []
                self._inflight = set(batch)
            try:
                self._upload(batch)
                with self._cond:
                    self._inflight = set()
            except Exception as exc:
                log.warning("audio upload to the database failed (%s: %s); retrying in %.0f s", exc.__class__.__name__, exc, self.retry_s)
                with self._cond:
                    self._pending[:0] = batch
                    self._inflight = set()
                    if not self._closed:
                        self._cond.wait(self.retry_s)
                    else:
                        return

    def _upload(self, batch: list[str]) -> None:
        self._ensure_schema()
        rows = []
        for audio_id in batch:
            path = self.root / f"{audio_id}.wav"
            try:
                rows.append({"id": audio_id, "wav": path.read_bytes(), "created_at": path.stat().st_mtime})
            except FileNotFoundError:
                continue  # deleted before it was uploaded
        if not rows:
            return
        with self.engine.begin() as conn:
            for row in rows:
                try:
                    with conn.begin_nested():
                        conn.execute(insert(audio_blobs), row)
                except IntegrityError:
                    pass  # uploaded before a retry: the row is there

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until every saved clip is in the database (tests, shutdown)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._cond:
                if not self._pending and not self._inflight:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._uploader.join(5)
        self.engine.dispose()

    # -- reading ---------------------------------------------------------------
    def path_for(self, audio_id: str) -> Path | None:
        """The local file, fetched from the database first when this box lacks it."""
        local = super().path_for(audio_id)
        if local is not None or not _ID_RE.match(audio_id):
            return local
        return self._fetch(audio_id)

    def _fetch(self, audio_id: str) -> Path | None:
        try:
            self._ensure_schema()
            with self.engine.connect() as conn:
                row = conn.execute(select(audio_blobs.c.wav, audio_blobs.c.created_at).where(audio_blobs.c.id == audio_id)).first()
        except Exception as exc:
            log.warning("audio %s: database unreachable (%s)", audio_id, exc.__class__.__name__)
            return None
        if row is None:
            return None
        path = self.root / f"{audio_id}.wav"
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(row.wav)
        os.replace(tmp, path)
        os.utime(path, (row.created_at, row.created_at))  # retention counts from synthesis
        return path

    def _not_uploaded(self, audio_id: str) -> bool:
        with self._cond:
            return audio_id in self._inflight or audio_id in self._pending

    def _row_exists(self, audio_id: str) -> bool | None:
        """Whether the database has the clip; None when it cannot be asked."""
        try:
            self._ensure_schema()
            with self.engine.connect() as conn:
                return conn.execute(select(audio_blobs.c.id).where(audio_blobs.c.id == audio_id)).first() is not None
        except Exception:
            return None

    def _serveable(self, audio_id: str) -> Path | None:
        """The route's view: the database decides (a clip deleted on another box is
        gone here too, even if this box still has a copy), except for this worker's
        own clips not uploaded yet, and while the database is unreachable."""
        local = super().path_for(audio_id)
        if local is not None and self._not_uploaded(audio_id):
            return local
        exists = self._row_exists(audio_id)
        if exists is None:
            return local  # outage: serve what this box has
        if not exists:
            if local is not None and not self._not_uploaded(audio_id):
                local.unlink(missing_ok=True)  # deleted elsewhere
            return None
        return local or self._fetch(audio_id)

    async def locate(self, audio_id: str) -> Path | None:
        """Wait up to ``fetch_wait_s`` for a clip another worker announced but has not
        uploaded yet (its URL can reach the page a few ms before the row exists)."""
        if not _ID_RE.match(audio_id):
            return None
        deadline = time.monotonic() + self.fetch_wait_s
        while True:
            path = await asyncio.to_thread(self._serveable, audio_id)
            if path is not None or time.monotonic() >= deadline:
                return path
            await asyncio.sleep(0.05)

    # -- deleting --------------------------------------------------------------
    def delete(self, audio_ids: list[str]) -> int:
        ids = [a for a in audio_ids if _ID_RE.match(a)]
        removed = 0
        for audio_id in ids:
            path = self.root / f"{audio_id}.wav"
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        with self._cond:
            self._pending = [a for a in self._pending if a not in set(ids)]
        if ids:
            self._ensure_schema()
            with self.engine.begin() as conn:
                result = conn.execute(delete(audio_blobs).where(audio_blobs.c.id.in_(ids)))
            removed = max(removed, result.rowcount or 0)
        return removed

    def prune(self, max_age_s: float) -> int:
        """Retention in both places: the database rows and this box's local copies."""
        local = super().prune(max_age_s)
        self._ensure_schema()
        with self.engine.begin() as conn:
            result = conn.execute(delete(audio_blobs).where(audio_blobs.c.created_at < time.time() - max_age_s))
        return max(local, result.rowcount or 0)


def audio_store_mode(database_url: str) -> str:
    """``disk`` or ``db`` from ``VOICECLAW_AUDIO_STORE`` (``auto``: db unless SQLite)."""
    mode = os.environ.get("VOICECLAW_AUDIO_STORE", "auto").strip().lower() or "auto"
    if mode == "auto":
        return "disk" if database_url.startswith("sqlite") else "db"
    if mode not in ("disk", "db"):
        raise ValueError(f"VOICECLAW_AUDIO_STORE must be disk, db or auto, not {mode!r}")
    return mode


def open_audio_store(root: Path, database_url: str) -> AudioStore:
    """The configured audio store: local files only, or files plus the database."""
    if audio_store_mode(database_url) == "db":
        return DbAudioStore(root, database_url)
    return AudioStore(root)
