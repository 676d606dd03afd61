"""``bench cloud`` runs end to end against the protocol servers (two turns per
protocol pair): it must finish, count no errors, and never report a turn faster
than the ideal critical path it computes (that would mean the clocks are wrong).
Figures are not asserted here (benchmarks, not timed tests)."""

from __future__ import annotations

import pytest

from voiceclaw_app.bench.cloud import run_cloud


@pytest.mark.parametrize(("stt", "tts"), [("flux", "deepgram"), ("deepgram", "openai")])
async def test_bench_cloud_runs_and_measures_above_its_floor(stt, tts):
    out = await run_cloud(runs=2, tts=tts, stt=stt)
    assert out["scenario"] == "cloud" and out["errors"] == 0, out.get("error_reasons") or out
    assert out["time_to_first_audio_ms"]["p50"] >= out["floor_ms"]["p50"] - 5.0, out
    assert out["overhead_ms"]["p50"] > -5.0
