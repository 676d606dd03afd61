"""Caps how much audio a session takes: at most a little faster than real time.

A client that streams faster than real time (a bug, a replay, an attack) would make
the listener fall behind without bound; frames beyond the budget are dropped and the
page is told once. A token bucket of samples: ``burst_s`` of audio may arrive at
once (a reconnect flushing its buffer), then ``rate`` x real time.

Why an 8 s burst: the bucket counts arrival on the server, so a server that stalls
(an overloaded box: the load benchmark at 50 sessions on 2 cores) reads a
real-time client's queued frames all at once. With 3 s, 21 of ~500 turns there (two runs) told
a person speaking normally that their audio came "faster than real time". 8 s of
audio is 256 KB; a client that really streams fast still meets the cap within
seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..pipeline.timing import now_ms

SAMPLE_RATE = 16000


@dataclass
class AudioRateGuard:
    rate: float = 1.5
    burst_s: float = 8.0
    dropped_samples: int = 0
    _tokens: float = field(default=-1.0)
    _last_ms: float = 0.0

    def admit(self, n_samples: int, t_ms: float | None = None) -> bool:
        t = now_ms() if t_ms is None else t_ms
        cap = self.burst_s * SAMPLE_RATE
        if self._tokens < 0:
            self._tokens, self._last_ms = cap, t
        self._tokens = min(cap, self._tokens + (t - self._last_ms) / 1000.0 * SAMPLE_RATE * self.rate)
        self._last_ms = t
        if n_samples > self._tokens:
            self.dropped_samples += n_samples
            return False
        self._tokens -= n_samples
        return True
