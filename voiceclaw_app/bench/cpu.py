"""CPU used by named groups of processes over a window, from ``/proc`` (Linux).

The load benchmark runs the app, its proxy, its databases, the protocol servers and
its own simulated users on one box: when the figures go bad, the first question is
who had the cores. :class:`CpuMeter` answers it per group, in percent of one core
(2 cores = 200 %), with every process on the box summed beside it.

The box's share is that sum, not ``/proc/stat``'s busy ticks: those are sampled at
the timer tick, and work that wakes on a timer and sleeps again before the next tick
(a microphone paced every 20 ms, and the server's answer to it) is mostly missed:
40 % busy there against 58 % in the processes' own, exactly kept, times (20 idle
microphones, 3 workers).
"""

from __future__ import annotations

import os
import time
from typing import Callable

_TICK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name (which may hold spaces and
    parentheses): state, parent pid, process group, ...; None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of ``pid`` so far; None when it is gone."""
    fields = stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / _TICK


def all_pids() -> list[int]:
    """Every process on the box (kernel threads included)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


class CpuMeter:
    """``start()``, then ``stop()`` -> ``{group: % of one core, ..., "box_pct": ...}``.

    ``groups`` is asked at the end (processes come and go: PostgreSQL backends, a
    restarted worker); a process that started during the window is counted from
    zero, one gone by the end is not counted (its time is lost with it).
    """

    def __init__(self, groups: Callable[[], dict[str, list[int]]]) -> None:
        self._groups = groups
        self._before: dict[int, float] = {}
        self._t0 = 0.0

    def start(self) -> "CpuMeter":
        self._before = {pid: s for pid in all_pids() if (s := cpu_seconds(pid)) is not None}
        self._t0 = time.monotonic()
        return self

    def stop(self) -> dict[str, float]:
        elapsed = max(time.monotonic() - self._t0, 1e-9)
        used = {pid: now - self._before.get(pid, 0.0) for pid in all_pids() if (now := cpu_seconds(pid)) is not None}
        out = {name: round(100.0 * sum(used.get(pid, 0.0) for pid in set(pids)) / elapsed, 1) for name, pids in self._groups().items()}
        out["box_pct"] = round(100.0 * sum(used.values()) / elapsed, 1)
        return out
