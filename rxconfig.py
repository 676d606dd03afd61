"""Reflex configuration for VoiceClaw.

Database: SQLite in the data dir by default, ``VOICECLAW_DATABASE_URL`` overrides
(e.g. ``postgresql+psycopg://user:pass@host/db``). ``REFLEX_REDIS_URL`` (read by
Reflex itself) moves state to Redis and enables several workers.

Origins: ``cors_allowed_origins`` is ``VOICECLAW_ALLOWED_ORIGINS`` (extra origins a
tunnel or proxy serves the app under), so no other site may read a response of the
backend with the user's cookie. The app's own origin (the request's Host) needs no
listing: the socket.io origin check is given the same rule as every other route
(``server/auth.py: origin_allowed``, wired in ``voiceclaw_app.py``).
``backend_host`` defaults to ``VOICECLAW_HOST`` or loopback, not Reflex's 0.0.0.0.
"""

import os

import reflex as rx
from reflex.plugins.sitemap import SitemapPlugin

from voiceclaw_app.db.engine import database_url

ALLOWED_ORIGINS = tuple(o.strip().rstrip("/") for o in os.environ.get("VOICECLAW_ALLOWED_ORIGINS", "").split(",") if o.strip())

config = rx.Config(
    app_name="voiceclaw_app",
    db_url=database_url(),
    redis_url=os.environ.get("REFLEX_REDIS_URL") or None,
    telemetry_enabled=False,
    show_built_with_reflex=False,
    disable_plugins=[SitemapPlugin],
    cors_allowed_origins=ALLOWED_ORIGINS,
    backend_host=os.environ.get("VOICECLAW_HOST", "").strip() or "127.0.0.1",
)
