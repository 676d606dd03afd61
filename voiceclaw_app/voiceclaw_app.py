"""The Reflex app: pages, the mic WebSocket and the audio route, startup tasks."""

import asyncio
import logging

import reflex as rx
from starlette.applications import Starlette
from starlette.routing import Route, WebSocketRoute

from .db import repo
from .db.migrate import migrate_at_startup
from .pages.dashboard import dashboard
from .pages.history import history
from .pages.settings import settings_page
from .server.audio import audio_route
from .server.ws_voice import ws_voice
from .states import services
from .states.chat import ChatState
from .states.history import HistoryState
from .states.settings import SettingsState

log = logging.getLogger("voiceclaw.app")

api = Starlette(
    routes=[
        Route("/audio/{id}.wav", audio_route, methods=["GET", "HEAD"]),
        WebSocketRoute("/ws/voice", ws_voice),
    ]
)


async def startup() -> None:
    """Migrate the configured database; mark replies a crash left unfinished as interrupted;
    warm the embedded engines; prune old audio."""
    await migrate_at_startup()
    try:
        n = await asyncio.to_thread(repo.recover_unfinished)
        if n:
            log.warning("marked %d unfinished repl%s interrupted", n, "y" if n == 1 else "ies")
    except Exception:
        log.exception("startup recovery failed (has `reflex db migrate` run?)")
    services.start_engine_warmup()
    loop = asyncio.get_running_loop()
    loop.create_task(services.warm_default_runner())
    loop.create_task(prune_audio_forever())


async def prune_audio_forever() -> None:
    """Retention: reply audio older than ``VOICECLAW_AUDIO_RETENTION_DAYS`` (default 7)
    is deleted at startup and every 6 hours; history keeps the text (replay says the
    audio is gone). The TTS cache prunes itself by size."""
    days = services.audio_retention_days()
    while True:
        try:
            n = await asyncio.to_thread(services.audio_store().prune, days * 86400.0)
            if n:
                log.info("retention: deleted %d audio file(s) older than %g day(s)", n, days)
        except Exception:
            log.exception("audio retention failed")
        await asyncio.sleep(6 * 3600)


app = rx.App(
    api_transformer=api,
    stylesheets=["/voiceclaw.css"],
    theme=rx.theme(accent_color="teal", radius="medium"),
)
app.register_lifespan_task(startup)
app.add_page(dashboard, route="/", title="VoiceClaw", on_load=ChatState.on_load)
app.add_page(settings_page, route="/settings", title="VoiceClaw · Settings", on_load=SettingsState.on_load)
app.add_page(history, route="/history", title="VoiceClaw · History", on_load=HistoryState.on_load)
