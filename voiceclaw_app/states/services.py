"""Process-level services for the UI: settings, keys, the turn runner, engines.

Only the UI layer imports this; it reaches the pipeline and the provider factory,
never the other way round. Runners are cached per settings snapshot so HTTP
connections and loaded models are reused across turns (settings apply to the next
turn: a changed snapshot builds a new runner).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from typing import Any

from ..config import VoiceSettings, data_dir
from ..db import repo
from ..db.engine import database_url
from ..pipeline.audio_store import AudioStore
from ..pipeline.audio_store_db import open_audio_store
from ..providers.base import ChatMessage
from ..secrets import KeyStore

log = logging.getLogger("voiceclaw.app")

_runner_cache: dict[str, Any] = {}
_audio_store: AudioStore | None = None


def audio_store() -> AudioStore:
    global _audio_store
    if _audio_store is None:
        _audio_store = open_audio_store(data_dir() / "audio", database_url())  # disk, or shared via the database
    return _audio_store


def audio_retention_days() -> float:
    """``VOICECLAW_AUDIO_RETENTION_DAYS`` (default 7; at least 1 hour's worth)."""
    raw = os.environ.get("VOICECLAW_AUDIO_RETENTION_DAYS", "7")
    try:
        days = float(raw)
    except ValueError:
        log.warning("VOICECLAW_AUDIO_RETENTION_DAYS=%r is not a number; keeping audio 7 days", raw)
        return 7.0
    return max(days, 1 / 24)


def key_store() -> KeyStore:
    return KeyStore()


async def load_settings(user_id: int | None = None) -> VoiceSettings:
    """The global settings with this user's voice preferences over them (off the loop)."""
    return await asyncio.to_thread(repo.load_settings, user_id)


def bind_legacy_keys() -> int:
    """Startup: keys stored before keys were bound to addresses get the addresses of
    the saved settings (the only ones they were ever sent to)."""
    from ..providers.factory import key_targets

    return key_store().bind_legacy(key_targets(repo.load_settings()))


def _snapshot_key(settings: VoiceSettings, keys: Any) -> str:
    raw = json.dumps(settings.to_dict(), sort_keys=True) + "|" + "|".join(
        f"{k}:{hashlib.sha256(str(getattr(keys, k)).encode()).hexdigest()}" for k in sorted(keys.status())
    )
    return hashlib.sha256(raw.encode()).hexdigest()


async def get_runner(settings: VoiceSettings):
    """A TurnRunner for these settings (cached; built off the event loop).

    A voice that cannot load (missing model files, no key) leaves text chat working:
    the runner then has no TTS and each spoken turn says why.
    """
    from ..pipeline.turn import TurnRunner  # the pipeline's orchestrator
    from ..providers.base import ProviderError
    from ..providers.factory import build_llm, build_tts

    keys = await asyncio.to_thread(key_store().load)
    key = _snapshot_key(settings, keys)
    runner = _runner_cache.get(key)
    if runner is not None:
        return runner
    llm = await asyncio.to_thread(build_llm, settings, keys)
    tts, problem = None, None
    try:
        tts = await asyncio.to_thread(build_tts, settings, keys)
    except ProviderError as exc:
        problem = exc.user_message
        log.warning("no voice: %s", problem)
    runner = TurnRunner(llm=llm, tts=tts, audio_store=audio_store(), settings=settings, speech_unavailable=problem)
    old = list(_runner_cache.values())
    _runner_cache.clear()
    _runner_cache[key] = runner
    for r in old:  # release the previous snapshot's connections
        close = getattr(getattr(r, "llm", None), "aclose", None)
        if close is not None:
            _spawn(_quiet(close()))
    _spawn(_quiet(runner.phrases.prefetch()))  # "one moment", apologies: ready before they are needed
    return runner


_BACKGROUND: set[asyncio.Task] = set()


def _spawn(coro) -> None:
    task = asyncio.get_running_loop().create_task(coro)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


async def warm_default_runner() -> None:
    """At startup: build the runner for the saved settings and synthesize the fixed phrases."""
    try:
        await get_runner(await load_settings())
    except Exception:
        log.exception("could not prepare the turn runner at startup")


async def build_listener(settings: VoiceSettings):
    keys = await asyncio.to_thread(key_store().load)
    from ..providers.factory import build_listener as _build

    result = _build(settings, keys)
    if asyncio.iscoroutine(result):
        result = await result
    return result


async def _quiet(coro) -> None:
    try:
        await coro
    except Exception:  # pragma: no cover - best effort
        pass


async def history_for(user_id: int, conversation_id: str, settings: VoiceSettings) -> list[ChatMessage]:
    """Bounded recent history of the user's conversation for the LLM (the runner adds the system prompt)."""
    if not conversation_id:
        return []
    pairs = await asyncio.to_thread(repo.recent_history, user_id, conversation_id, settings.llm_history_turns)
    return [ChatMessage(role=r, content=c) for r, c in pairs]  # type: ignore[arg-type]


def engine_status() -> dict[str, str]:
    try:
        from ..providers import engines
    except ImportError:
        return {}
    try:
        return dict(engines.engine_status())
    except Exception as exc:  # pragma: no cover
        return {"engines": f"error: {exc}"}


def wait_engine_warmup(timeout_s: float) -> None:
    """Until the start-up warm-up of the embedded engines is done (blocking: a thread)."""
    try:
        from ..providers import engines
    except ImportError:
        return
    engines.wait_warmup(timeout_s)


def start_engine_warmup(settings: VoiceSettings | None = None) -> None:
    """Warm the embedded engines the deployment's settings (``settings``, else the
    stored ones) can use; ``VOICECLAW_WARM_ENGINES=all`` warms all of them."""
    try:
        from ..providers import engines
    except ImportError:
        log.info("embedded engines module not available; no warm-up")
        return
    try:
        if os.environ.get("VOICECLAW_WARM_ENGINES", "").strip().lower() == "all":
            names = engines.ENGINE_NAMES
        else:
            names = engines.needed_for(settings or repo.load_settings())
        skipped = [n for n in engines.ENGINE_NAMES if n not in names]
        if skipped:
            log.info("embedded engines not warmed (the settings do not use them; they load on first use): %s", ", ".join(skipped))
        if names:
            engines.start_warmup(names)
    except Exception:
        log.exception("engine warm-up failed to start")
