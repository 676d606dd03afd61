"""Per-process registry of the embedded engines: load once, warm in the background.

Decision: one copy of each engine per process (per web worker). The models are
small (about 0.5 GB RSS for all three) and an in-process call avoids a hop; with
several Granian workers each worker holds its own copy, stated in the README.

* :func:`start_warmup` loads and warms STT, the end-of-turn models (Smart Turn, 8.7 MB,
  and the words' scorer on Gemma's file: the listener needs them at the user's first
  pause), LLM and TTS, one after another, in one
  daemon thread (loading them in parallel on 2 cores only makes each slower), so
  the event loop never blocks and the app answers while models load.
* :func:`needed_for` names the engines the deployment's settings can use (a cloud
  provider's local fallback included); the app warms only those at start-up, so a
  worker serving cloud providers without fallback holds no model at all. Any other
  engine still loads on first use (a provider switched to local on the settings page
  warms at once: ``states/settings.py``).
* :func:`engine_status` reports ``"warming"``, ``"ready"``, ``"off"`` (not loaded:
  the settings do not use it) or ``"error: ..."`` per engine for the UI's "warming up"
  badge; :func:`all_ready` sums it up.
* One engine failing (a damaged voice package, say) leaves the others usable:
  text chat works without TTS, and the error names the package to reinstall.

Thread split on 2 cores (each runtime defaults to *all* cores and they would fight):
STT 1 thread (its decoder steps are too small for two: see ``local_stt``; the
other core stays with llama.cpp), LLM 2 threads (prefill and the first clause are the
critical path), TTS 1 thread (it runs while llama.cpp keeps generating), and the
VAD helper process pinned to one core. ``VOICECLAW_STT_THREADS``,
``VOICECLAW_LLM_THREADS``, ``VOICECLAW_TTS_THREADS`` override.
"""

from __future__ import annotations

import resource
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from ..config import VoiceSettings
from .base import EngineUnavailable, ProviderError
from .factory import CLOUD_TTS, DEEPGRAM_STT
from .local_llm import LocalLlamaLLM
from .local_stt import LocalWhisperSTT
from .local_tts import LocalPiperTTS
from .smart_turn import SmartTurnV3
from .text_turn import GemmaTextTurn

ENGINE_NAMES = ("stt", "turn", "text_turn", "llm", "tts")


@dataclass
class _Slot:
    factory: Callable[[], object]
    instance: object | None = None
    state: str = "idle"  # idle | warming | ready | error
    error: str = ""
    load_ms: float | None = None
    rss_mb_delta: float | None = None
    done: threading.Event = field(default_factory=threading.Event)


_lock = threading.RLock()
_slots: dict[str, _Slot] = {}
_warm_thread: threading.Thread | None = None
_queue: list[str] = []  # engines the warm-up thread has still to load


def rss_mb() -> float:
    """This process's resident memory now (Linux /proc), else its peak."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def needed_for(settings: VoiceSettings) -> tuple[str, ...]:
    """The engines ``settings`` can call on, in :data:`ENGINE_NAMES` order.

    A cloud STT or TTS with ``fallback_to_local`` keeps its local stand-in warm: the
    fallback happens mid-turn, when seconds of model loading would be dead air."""
    local_stt = settings.stt_provider not in DEEPGRAM_STT or settings.fallback_to_local
    wanted = {
        "stt": local_stt,
        "turn": local_stt and settings.turn_detection == "smart_turn",
        "text_turn": local_stt and settings.turn_detection == "smart_turn",
        "llm": settings.uses_local_llm,
        "tts": settings.tts_provider not in CLOUD_TTS or settings.fallback_to_local,
    }
    return tuple(n for n in ENGINE_NAMES if wanted[n])


def _default_factories(settings: VoiceSettings) -> dict[str, Callable[[], object]]:
    return {
        "stt": lambda: LocalWhisperSTT(),
        "turn": lambda: SmartTurnV3(),
        "text_turn": lambda: GemmaTextTurn(),
        "llm": lambda: LocalLlamaLLM(assistant_name=settings.assistant_name, system_prompt=settings.system_prompt),
        "tts": lambda: LocalPiperTTS(),
    }


def configure(settings: VoiceSettings | None = None, factories: dict[str, Callable[[], object]] | None = None) -> None:
    """Set what each engine is built from (tests pass fakes); only before it loaded."""
    settings = settings or VoiceSettings.from_env()
    merged = _default_factories(settings)
    merged.update(factories or {})
    with _lock:
        for name in ENGINE_NAMES:
            slot = _slots.get(name)
            if slot is None or slot.state in ("idle", "error"):
                _slots[name] = _Slot(factory=merged[name])


def _slot(name: str) -> _Slot:
    if name not in ENGINE_NAMES:
        raise KeyError(name)
    with _lock:
        if not _slots:
            configure()
        return _slots[name]


def _load(name: str) -> object:
    """Build and warm one engine in the calling (worker) thread; record the outcome."""
    slot = _slot(name)
    with _lock:
        if slot.state == "ready":
            return slot.instance
        slot.state = "warming"
    before = rss_mb()
    t0 = time.monotonic()
    try:
        engine = slot.factory()
        warm_sync = getattr(engine, "_warm_sync", None)
        if warm_sync is not None:
            warm_sync()
        with _lock:
            slot.instance = engine
            slot.state = "ready"
            slot.error = ""
            slot.load_ms = round((time.monotonic() - t0) * 1000.0, 1)
            slot.rss_mb_delta = round(rss_mb() - before, 1)
        return engine
    except ProviderError as exc:
        with _lock:
            slot.state, slot.error = "error", exc.user_message
        raise
    except Exception as exc:  # a runtime's own exception type: still one engine down, not the app
        with _lock:
            slot.state, slot.error = "error", f"{type(exc).__name__}: {exc}"
        raise EngineUnavailable(f"The local {name} engine failed to start: {exc}", detail=repr(exc)) from exc
    finally:
        slot.done.set()


def start_warmup(names: tuple[str, ...] = ENGINE_NAMES, settings: VoiceSettings | None = None) -> threading.Thread:
    """Load and warm the engines in a background thread; returns at once.

    Calling it again while a warm-up runs adds the names to that thread's queue and
    returns it; after a failure it retries the engines in error (e.g. once the package
    was reinstalled).
    """
    global _warm_thread
    with _lock:
        if settings is not None:
            configure(settings)
        for n in names:
            slot = _slot(n)
            if slot.state in ("idle", "error") and n not in _queue:
                slot.state = "warming"
                slot.done.clear()
                _queue.append(n)
        if _warm_thread is not None and _warm_thread.is_alive():
            return _warm_thread

        def run() -> None:
            while True:
                with _lock:  # the queue is read and the thread ends under one lock: no name is left behind
                    if not _queue:
                        return
                    n = _queue.pop(0)
                try:
                    _load(n)
                except ProviderError:
                    pass  # recorded in the slot; the other engines still load

        _warm_thread = threading.Thread(target=run, name="engines-warmup", daemon=True)
        _warm_thread.start()
        return _warm_thread


def wait_warmup(timeout_s: float) -> bool:
    """Block (a worker thread, never the loop) until the warm-up thread is done, at most
    ``timeout_s``; True when none is running any more."""
    thread = _warm_thread
    if thread is not None:
        thread.join(timeout_s)
        return not thread.is_alive()
    return True


def engine_status() -> dict[str, str]:
    """``{"stt": "ready", "llm": "warming", "turn": "off", "tts": "error: ..."}`` for the UI."""
    words = {"ready": "ready", "warming": "warming", "idle": "off"}
    out: dict[str, str] = {}
    with _lock:
        for name in ENGINE_NAMES:
            slot = _slot(name)
            out[name] = f"error: {slot.error}" if slot.state == "error" else words[slot.state]
    return out


def all_ready() -> bool:
    return all(v == "ready" for v in engine_status().values())


def memory_report() -> dict[str, float | None]:
    """Process RSS and the RSS each engine added while loading (MB)."""
    with _lock:
        report: dict[str, float | None] = {f"{n}_rss_mb": _slot(n).rss_mb_delta for n in ENGINE_NAMES}
        report.update({f"{n}_load_ms": _slot(n).load_ms for n in ENGINE_NAMES})
    report["process_rss_mb"] = round(rss_mb(), 1)
    return report


def get_engine(name: str, timeout_s: float | None = None) -> object:
    """The loaded engine (blocking: loads it here if no warm-up did). Worker threads only."""
    slot = _slot(name)
    if slot.state == "ready":
        return slot.instance
    if slot.state == "warming" and _warm_thread is not None and _warm_thread.is_alive():
        slot.done.wait(timeout_s)
        if slot.state == "ready":
            return slot.instance
        if slot.state == "error":
            raise EngineUnavailable(slot.error)
    return _load(name)


async def aget_engine(name: str) -> object:
    """Async access for the pipeline: waits for/does the load in a thread."""
    import asyncio

    return await asyncio.to_thread(get_engine, name)


def get_stt() -> LocalWhisperSTT:
    return get_engine("stt")  # type: ignore[return-value]


def get_turn_analyzer() -> SmartTurnV3:
    return get_engine("turn")  # type: ignore[return-value]


def get_llm() -> LocalLlamaLLM:
    return get_engine("llm")  # type: ignore[return-value]


def get_tts() -> LocalPiperTTS:
    return get_engine("tts")  # type: ignore[return-value]


def reset_for_tests() -> None:
    """Forget every engine (tests that swap factories or data dirs)."""
    global _warm_thread
    with _lock:
        _slots.clear()
        _queue.clear()
        _warm_thread = None
