"""A held event loop, caught in the act (``VOICECLAW_LOOP_WATCH_MS``, off by default).

Why: a worker that answers late under load is usually a worker whose event loop was
held, by something synchronous on it or by a queue of callbacks it cannot drain, and
a sampling profiler's averages hide a 300 ms stall among minutes of idle time. This
logs the loop thread's stack *while* the loop is held: a heartbeat callback runs on
the loop every 20 ms, and a watcher thread that finds it older than the threshold
logs where the loop thread is, once per stall. It costs one callback every 20 ms and
one thread waking every quarter threshold. It also logs the garbage collector's
passes that take that long (:class:`GcWatch`): a full pass over a worker's ~200,000
objects is ~90 ms on an idle core, and it stops every thread.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import sys
import threading
import time
import traceback

log = logging.getLogger("voiceclaw.loop")

BEAT_S = 0.02


def threshold_ms_from_env() -> float:
    """``VOICECLAW_LOOP_WATCH_MS`` as a positive number of ms; 0 (off) when unset or bad."""
    try:
        value = float(os.environ.get("VOICECLAW_LOOP_WATCH_MS", "0"))
    except ValueError:
        return 0.0
    return value if value > 0 else 0.0


def lag_summary(lags: list[float]) -> dict[str, float] | None:
    """p50, p99 and max (ms) of heartbeat lags, and how many beats; None for none."""
    lags = sorted(lags)
    if not lags:
        return None
    pick = lambda q: round(lags[min(len(lags) - 1, int(q * len(lags)))], 1)  # noqa: E731
    return {"p50": pick(0.5), "p99": pick(0.99), "max": round(lags[-1], 1), "beats": len(lags)}


class LoopWatch:
    """Logs the stack of the thread running ``loop`` whenever ``loop`` has not run its
    heartbeat for ``threshold_ms``. Start it from a coroutine on that loop."""

    def __init__(self, threshold_ms: float, report_every_s: float = 60.0) -> None:
        self.threshold_s = threshold_ms / 1000.0
        self.report_every_s = report_every_s
        self.stalls = 0
        #: how late each heartbeat ran (ms) since the last report: the loop's lag
        self.lags: list[float] = []
        self._reported_at = time.monotonic()
        self._beat = time.monotonic()
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def start(self) -> "LoopWatch":
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._tick()
        threading.Thread(target=self._watch, name="loop-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _tick(self) -> None:
        now = time.monotonic()
        if self._loop is not None:
            self.lags.append(max(0.0, (now - self._beat - BEAT_S) * 1000))
        self._beat = now
        if now - self._reported_at >= self.report_every_s:
            self._report(now)
        if not self._stop.is_set() and self._loop is not None:
            self._loop.call_later(BEAT_S, self._tick)

    def _report(self, now: float) -> None:
        """The loop's lag over the last period, logged."""
        self._reported_at = now
        lag, self.lags = lag_summary(self.lags), []
        if lag:
            log.info("event loop lag over %.0f s: p50 %.1f ms, p99 %.1f ms, max %.0f ms (%d beats)", self.report_every_s, lag["p50"], lag["p99"], lag["max"], lag["beats"])

    def _watch(self) -> None:
        reported = 0.0
        while not self._stop.wait(self.threshold_s / 4):
            beat = self._beat
            held = time.monotonic() - beat
            if held < self.threshold_s + BEAT_S or beat == reported:
                continue
            reported = beat
            self.stalls += 1
            frame = sys._current_frames().get(self._loop_thread)
            stack = "".join(traceback.format_stack(frame)[-14:]) if frame is not None else "(no frame)"
            log.warning("event loop held for %.0f ms so far; the loop thread is at:\n%s", held * 1000, stack)


class GcWatch:
    """Logs each garbage-collector pass that takes ``threshold_ms`` or longer (``gc.callbacks``)."""

    def __init__(self, threshold_ms: float) -> None:
        self.threshold_s = threshold_ms / 1000.0
        self.slow: list[tuple[int, float]] = []  # (generation, ms) of the passes logged
        self._t0 = 0.0

    def start(self) -> "GcWatch":
        gc.callbacks.append(self._on_gc)
        return self

    def stop(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
            return
        took = time.perf_counter() - self._t0
        if took >= self.threshold_s:
            self.slow.append((int(info.get("generation", -1)), took * 1000))
            log.warning("garbage collection of generation %s took %.0f ms (%s objects freed, %d frozen)", info.get("generation"), took * 1000, info.get("collected"), gc.get_freeze_count())
