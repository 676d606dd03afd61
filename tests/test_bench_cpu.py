"""The load benchmark's CPU meter (``bench/cpu.py``) against processes whose use is known."""

from __future__ import annotations

import subprocess
import sys
import time

from voiceclaw_app.bench.cpu import CpuMeter, cpu_seconds


def test_a_spinning_process_counts_about_a_core_and_a_sleeping_one_about_nothing():
    spin = subprocess.Popen([sys.executable, "-c", "import time\nt = time.monotonic()\nwhile time.monotonic() - t < 30: pass"])
    sleep = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.3)  # both past their start-up
        meter = CpuMeter(lambda: {"spin": [spin.pid], "sleep": [sleep.pid]}).start()
        time.sleep(1.5)
        cpu = meter.stop()
    finally:
        spin.kill()
        sleep.kill()
        spin.wait()
        sleep.wait()
    # 2 cores, the test's own process mostly asleep: the spinner gets most of one
    assert 50 <= cpu["spin"] <= 110, cpu
    assert cpu["sleep"] < 5, cpu
    assert cpu["box_pct"] >= cpu["spin"] * 0.8, cpu


def test_a_process_that_is_gone_reads_as_none_and_is_not_counted():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert cpu_seconds(proc.pid) is None
    meter = CpuMeter(lambda: {"gone": [proc.pid]}).start()
    assert meter.stop()["gone"] == 0.0
