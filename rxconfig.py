"""Reflex configuration for VoiceClaw.

Database: SQLite in the data dir by default, ``VOICECLAW_DATABASE_URL`` overrides
(e.g. ``postgresql+psycopg://user:pass@host/db``). ``REFLEX_REDIS_URL`` (read by
Reflex itself) moves state to Redis and enables several workers.
"""

import os

import reflex as rx
from reflex.plugins.sitemap import SitemapPlugin

from voiceclaw_app.db.engine import database_url

config = rx.Config(
    app_name="voiceclaw_app",
    db_url=database_url(),
    redis_url=os.environ.get("REFLEX_REDIS_URL") or None,
    telemetry_enabled=False,
    show_built_with_reflex=False,
    disable_plugins=[SitemapPlugin],
)
