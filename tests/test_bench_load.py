"""``bench load`` end to end, small: 2 simulated users spread over 2 harness processes
against a one-worker cluster (Redis, PostgreSQL, Caddy) and the protocol servers.

Not a timed test: it checks that the benchmark runs, counts what it should and
reports its harness's loop lag, so the figures in the README can be produced again."""

from __future__ import annotations

import pytest

from deploy.cluster import missing_tools
from voiceclaw_app.bench.load import run_load

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


async def test_bench_load_runs_turns_in_harness_processes_and_reports_their_lag():
    missing = missing_tools()
    if missing:
        pytest.skip(missing)
    result = await run_load(sessions=2, minutes=0.25, workers=1, harness_processes=2)
    assert result["harness_processes"] == 2
    assert result["errors"] == 0 and result["warmup_errors"] == 0, result["error_log"]
    assert result["turns_spoken"] >= 2 and result["runs"] == result["turns_spoken"]
    assert result["overhead_ms"]["p50"] is not None and result["time_to_first_audio_ms"]["p95"] is not None
    lag = result["harness_loop_lag_ms"]
    assert lag is not None and 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
    assert result["rss_mb_start"] > 0 and result["rss_mb_end"] > 0
    cpu = result["cpu_pct"]
    assert set(cpu) == {"workers", "proxy", "redis", "postgres", "protocol_servers", "harness", "box_pct"}, cpu
    # every part that carried the turns was seen working: the process lists are right
    assert all(cpu[part] > 0 for part in ("workers", "proxy", "postgres", "protocol_servers", "harness")), cpu
    # no process counted in two parts: together they are at most the whole box
    assert sum(v for part, v in cpu.items() if part != "box_pct") <= cpu["box_pct"] + 1, cpu


async def test_bench_load_idle_streams_microphones_without_turns_and_counts_their_cpu():
    missing = missing_tools()
    if missing:
        pytest.skip(missing)
    result = await run_load(sessions=2, minutes=0.2, workers=1, idle=True)
    assert result["idle"] is True
    assert result["turns_spoken"] == 0 and result["runs"] == 0 and result["errors"] == 0, result["error_log"]
    cpu = result["cpu_pct"]
    # two microphones at real time for 12 s: the worker and the harness were busy with them
    assert cpu["workers"] > 0 and cpu["harness"] > 0 and cpu["proxy"] > 0, cpu
