"""Bring whatever database is configured up to the latest Alembic revision.

Why here and not a make stamp: a stamp file says that *some* database was migrated
once, not that the one the app is about to use was (a new ``VOICECLAW_DATA_DIR`` or
``VOICECLAW_DATABASE_URL`` then failed every turn with "no such table"). So the
check is made against the database itself, at every start-up (a cheap read of
``alembic_version``), and the upgrade runs only when revisions are missing.

Several workers (or boxes) may start at once against one PostgreSQL: the upgrade
runs under a lock that lives where the data lives (a PostgreSQL advisory lock;
for SQLite a file lock next to the database file), and the revision is checked
again once the lock is held, so exactly one process migrates and the others wait.

``python -m voiceclaw_app.db.migrate`` is the same thing as a command (``make``
runs it before ``run``/``test``; quick when nothing is missing).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import sys
from pathlib import Path
from typing import Iterator

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Connection, Engine, make_url

from .engine import database_url

log = logging.getLogger("voiceclaw.migrate")

ROOT = Path(__file__).resolve().parents[2]
# One fixed 64-bit key for pg_advisory_lock: "vcmigrat" as an integer.
_PG_LOCK_KEY = int.from_bytes(b"vcmigrat", "big") & 0x7FFF_FFFF_FFFF_FFFF


class MigrationError(RuntimeError):
    """The database could not be brought up to date (the message says why, in words)."""


def _script() -> tuple[Config, ScriptDirectory]:
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    return cfg, ScriptDirectory.from_config(cfg)


def missing_revisions(conn: Connection, script: ScriptDirectory) -> bool:
    """True when the database lacks at least one head revision of ``alembic/versions``."""
    current = set(MigrationContext.configure(conn).get_current_heads())
    heads = set(script.get_heads())
    if current == heads:
        return False
    # a database *ahead* of this code (a newer release migrated it) is not ours to touch
    known = {rev.revision for rev in script.walk_revisions()}
    return not (current - known) and bool(heads - current)


@contextlib.contextmanager
def _migration_lock(engine: Engine) -> Iterator[Connection]:
    """A connection holding the cross-process migration lock for this database."""
    url = engine.url
    if url.get_backend_name() == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("select pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
            conn.commit()
            try:
                yield conn
            finally:
                conn.execute(text("select pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY})
                conn.commit()
        return
    lock_path = _sqlite_lock_path(url.database)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            with engine.connect() as conn:
                yield conn
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _sqlite_lock_path(database: str | None) -> str:
    if not database or database == ":memory:":
        return str(Path("/tmp") / "voiceclaw-memory.migrate.lock")
    path = Path(database)
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path) + ".migrate-lock"


def ensure_migrated(url: str | None = None) -> bool:
    """Upgrade the database at ``url`` (default: the configured one) to every head.

    Returns True when it ran migrations, False when nothing was missing. Raises
    :class:`MigrationError` with a readable message when the database cannot be
    reached or a migration fails.
    """
    url = url or database_url()
    cfg, script = _script()
    kwargs: dict = {}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30}
    engine = create_engine(url, **kwargs)
    try:
        with engine.connect() as conn:
            if not missing_revisions(conn, script):
                return False
        with _migration_lock(engine) as conn:
            if not missing_revisions(conn, script):
                return False  # another worker migrated while we waited for the lock
            _upgrade(cfg, script, conn)
            log.info("migrated %s to %s", _safe(url), ", ".join(sorted(script.get_heads())))
            return True
    except MigrationError:
        raise
    except Exception as exc:
        raise MigrationError(f"could not migrate the database at {_safe(url)}: {exc.__class__.__name__}: {exc}") from exc
    finally:
        engine.dispose()


async def migrate_at_startup(retry_s: float = 5.0) -> None:
    """The app's start-up hook: migrate now; if the database cannot be reached yet
    (PostgreSQL still starting, a network blip), keep trying in the background and
    say so in the log, instead of serving turns that would fail on missing tables."""
    while True:
        try:
            await asyncio.to_thread(ensure_migrated)
            return
        except MigrationError as exc:
            log.error("%s; retrying in %.0f s", exc, retry_s)
        await asyncio.sleep(retry_s)


def _upgrade(cfg: Config, script: ScriptDirectory, conn: Connection) -> None:
    """``alembic upgrade heads`` on this connection (every head: parallel branches too)."""

    def steps(rev, _context):
        return script._upgrade_revs("heads", rev)

    with EnvironmentContext(cfg, script, fn=steps, destination_rev="heads") as env:
        env.configure(connection=conn, render_as_batch=True)
        with env.begin_transaction():
            env.run_migrations()
    conn.commit()


def _safe(url: str) -> str:
    """The URL without its password (for logs and messages)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    url = (argv or sys.argv[1:] or [None])[0]
    try:
        ran = ensure_migrated(url)
    except MigrationError as exc:
        print(exc, file=sys.stderr)
        return 1
    if not ran:
        log.info("database %s is up to date", _safe(url or database_url()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
