"""LoopWatch: a held event loop is logged with the stack that holds it, once per stall;
a loop that keeps running is never reported."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

import voiceclaw_app.states.chat  # noqa: F401  Reflex state classes are defined at collection (as in test_auth)
import voiceclaw_app.states.history  # noqa: F401
import voiceclaw_app.states.settings  # noqa: F401
from voiceclaw_app.server.loop_watch import GcWatch, LoopWatch, threshold_ms_from_env


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # synchronous work on the loop: what the watch is for


async def test_a_held_loop_is_logged_with_the_code_holding_it(caplog):
    caplog.set_level(logging.WARNING, logger="voiceclaw.loop")
    watch = LoopWatch(threshold_ms=100).start()
    try:
        await asyncio.sleep(0.1)
        _hold_the_loop(0.4)
        await asyncio.sleep(0.1)
    finally:
        watch.stop()
    assert watch.stalls == 1  # one stall, one report (not one per check)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "_hold_the_loop" in text and "event loop held for" in text


async def test_a_loop_that_keeps_running_is_not_reported(caplog):
    caplog.set_level(logging.WARNING, logger="voiceclaw.loop")
    watch = LoopWatch(threshold_ms=150).start()
    try:
        for _ in range(20):
            _hold_the_loop(0.02)  # short bits of work, each well under the threshold
            await asyncio.sleep(0.01)
    finally:
        watch.stop()
    assert watch.stalls == 0
    assert not [r for r in caplog.records if r.name == "voiceclaw.loop"]


@pytest.mark.parametrize("value, expected", [("", 0.0), ("250", 250.0), ("-5", 0.0), ("soon", 0.0)])
def test_threshold_from_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("VOICECLAW_LOOP_WATCH_MS", value)
    assert threshold_ms_from_env() == expected


def test_a_slow_garbage_collection_is_logged(caplog):
    import gc

    caplog.set_level(logging.WARNING, logger="voiceclaw.loop")
    watch = GcWatch(threshold_ms=0).start()  # every pass counts
    try:
        gc.collect(2)
    finally:
        watch.stop()
    assert [g for g, _ms in watch.slow] == [2]
    assert "garbage collection of generation 2 took" in caplog.text
    fast = GcWatch(threshold_ms=60_000).start()
    try:
        gc.collect(0)
    finally:
        fast.stop()
    assert fast.slow == []


async def test_the_loop_lag_is_reported_per_period(caplog):
    caplog.set_level(logging.INFO, logger="voiceclaw.loop")
    watch = LoopWatch(threshold_ms=1000, report_every_s=0.3).start()
    try:
        await asyncio.sleep(0.1)
        _hold_the_loop(0.12)  # one beat 100+ ms late, under the stall threshold
        await asyncio.sleep(0.4)
    finally:
        watch.stop()
    reports = [r.getMessage() for r in caplog.records if "event loop lag over" in r.getMessage()]
    assert reports and watch.stalls == 0
    worst = float(reports[0].split("max ")[1].split(" ms")[0])
    assert 90 <= worst < 1000


async def test_a_worker_freezes_its_heap_once_warm(monkeypatch):
    """What a worker built by the end of its warm-up leaves the collector's reach, so a
    full collection does not walk it (120-470 ms a pass on a loaded worker)."""
    import gc

    from voiceclaw_app import voiceclaw_app as app_module

    order: list[str] = []

    async def warm_runner() -> None:
        order.append("runner")

    monkeypatch.setattr(app_module.services, "warm_default_runner", warm_runner)
    monkeypatch.setattr(app_module.services, "wait_engine_warmup", lambda timeout_s: order.append("engines"))
    built = [[i] for i in range(1000)]  # what the worker built
    try:
        await app_module._warm_then_freeze()
        assert order == ["runner", "engines"]
        assert gc.get_freeze_count() >= len(built)
        oldest = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(b) in oldest for b in built)  # frozen: in no generation the collector walks
    finally:
        gc.unfreeze()
