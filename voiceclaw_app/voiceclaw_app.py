"""The Reflex app: pages, the login routes, the voice socket (over the app's
SessionHub) and the audio route, the guards in front of them, startup tasks.

Nothing imports this module: what needs the app gets it passed in (the projection's sink).
"""

import asyncio
import contextlib
import gc
import logging
import os

import reflex as rx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route, WebSocketRoute

from .db import repo
from .db.models import new_id
from .db.migrate import migrate_at_startup
from .pages.dashboard import dashboard
from .pages.history import history
from .pages.login import login_page
from .pages.settings import settings_page
from .server import auth, loop_watch, mic_bus, reflex_tokens
from .server.audio import audio_route
from .server.hub import SessionHub
from .server.persistence import DbConversationStore
from .server.ws_voice import make_ws_voice
from .states import services
from .states.auth import AuthGate, LoginState
from .states.chat import ChatState
from .states.history import HistoryState
from .states.projection import Projection, ReflexSink
from .states.settings import SettingsState

log = logging.getLogger("voiceclaw.app")


def _configure_logging() -> None:
    """The app's own loggers (``voiceclaw.*``) to stderr at ``VOICECLAW_LOG_LEVEL``
    (default INFO): without a handler Python prints only warnings, and the turn log
    ("turn ... done interrupted=... played=...") is what an operator reads first.
    No secret is ever logged (keys are redacted where they are handled)."""
    root = logging.getLogger("voiceclaw")
    if root.handlers:
        return
    level = os.environ.get("VOICECLAW_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(getattr(logging, level, logging.INFO))
    root.propagate = False


_configure_logging()

def _projection(token: str, user_id: int) -> Projection:
    return Projection(ReflexSink(app, user_id), token, user_id)


#: this process's live voice sessions (one per tab's voice socket)
hub = SessionHub(services=services, store_for=DbConversationStore, projection_for=_projection, new_conversation_id=new_id)

api = Starlette(
    routes=[
        Route("/auth/login", auth.login_route, methods=["POST"]),
        Route("/auth/logout", auth.logout_route, methods=["POST"]),
        Route("/auth/setup", auth.setup_route, methods=["POST"]),
        Route("/audio/{id}.wav", audio_route, methods=["GET", "HEAD"]),
        WebSocketRoute("/ws/voice", make_ws_voice(hub, authenticate=auth.authenticate, origin_allowed=auth.origin_allowed)),
    ],
    # in front of Reflex's own routes too (the api mounts them): /_event included
    middleware=[Middleware(auth.OriginGuard)],
)


@contextlib.asynccontextmanager
async def refuse_unprotected_start():
    """A lifespan context (it runs before the app serves, and raising stops the start):
    no serving beyond loopback with no account; a warning without TLS there."""
    host = rx.config.get_config().backend_host
    problem = await asyncio.to_thread(auth.exposure_problem, host)
    if problem:
        log.error("%s", problem)
        raise RuntimeError(problem)
    warning = auth.exposure_warning(host)
    if warning:
        log.warning("%s", warning)
    if os.environ.get("VOICECLAW_ACCESS_TOKEN"):
        log.warning("VOICECLAW_ACCESS_TOKEN is no longer used and is ignored: accounts replace it (README: Accounts and access)")
    yield


async def startup() -> None:
    """Migrate the configured database; mark replies a crash left unfinished as
    interrupted; bind keys stored before key binding to the addresses configured now;
    warm the embedded engines the settings use; prune old audio; with Redis, mark this worker alive
    (``server.reflex_tokens``) and follow the other workers' mic claims (``server.mic_bus``)."""
    await migrate_at_startup()
    try:
        await asyncio.to_thread(services.bind_legacy_keys)
    except Exception:
        log.exception("could not bind the stored keys to their addresses")
    try:
        n = await asyncio.to_thread(repo.recover_unfinished)
        if n:
            log.warning("marked %d unfinished repl%s interrupted", n, "y" if n == 1 else "ies")
    except Exception:
        log.exception("startup recovery failed (has `reflex db migrate` run?)")
    await asyncio.to_thread(services.start_engine_warmup)  # those the stored settings use
    loop = asyncio.get_running_loop()
    loop.create_task(_warm_then_freeze())
    loop.create_task(prune_audio_forever())
    loop.create_task(reflex_tokens.keep_alive(app))  # with Redis: a crashed worker's tabs keep their tokens
    loop.create_task(mic_bus.follow_claims(app, hub))  # with Redis: one mic per account across workers
    watch_ms = loop_watch.threshold_ms_from_env()
    if watch_ms:  # logs where a held loop is, and slow garbage collections
        loop_watch.LoopWatch(watch_ms).start()
        loop_watch.GcWatch(watch_ms).start()


async def _warm_then_freeze() -> None:
    """Build the default runner, then move everything this worker has built so far out
    of the garbage collector's reach (``gc.freeze``).

    Why: Reflex freezes the supervisor's heap before it forks the workers, but what a
    worker builds after (its app, clients, the runner and phrases, imports on first use)
    stayed in the oldest generation, and every full collection walked it: 120-470 ms a
    pass on a loaded worker (``VOICECLAW_LOOP_WATCH_MS`` logs them), every thread
    stopped, every microphone on that worker waiting. Frozen objects are still freed
    when their last reference goes; only cycles among them are never collected."""
    await services.warm_default_runner()
    await asyncio.to_thread(services.wait_engine_warmup, 120.0)
    gc.collect()
    gc.freeze()
    log.info("heap frozen after warm-up: %d objects out of the collector's reach", gc.get_freeze_count())


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
app.add_middleware(AuthGate(), index=0)
reflex_tokens.install(app)  # with Redis: a crashed worker's tabs keep their tokens


def _socket_origin_ok(origin: str | None, environ: dict) -> bool:
    """socket.io's own origin check (engine.io calls it on every handshake) with the
    app's one rule: the Host's origin or VOICECLAW_ALLOWED_ORIGINS, even on loopback."""
    headers = {"host": environ.get("HTTP_HOST", "")}
    if origin is not None:
        headers["origin"] = origin
    return auth.origin_allowed(headers)


# Reflex hands socket.io the configured list only (no "own Host" rule): give it the
# same check as the other routes (OriginGuard refuses foreign origins before it too).
if app.sio is not None:
    app.sio.eio.cors_allowed_origins = _socket_origin_ok
app.register_lifespan_task(refuse_unprotected_start)
app.register_lifespan_task(startup)
app.add_page(login_page, route="/login", title="VoiceClaw · Log in", on_load=LoginState.on_load)
app.add_page(dashboard, route="/", title="VoiceClaw", on_load=ChatState.on_load)
app.add_page(settings_page, route="/settings", title="VoiceClaw · Settings", on_load=SettingsState.on_load)
app.add_page(history, route="/history", title="VoiceClaw · History", on_load=HistoryState.on_load)
