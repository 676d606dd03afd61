"""Real in-process providers for pipeline tests (subclasses of the interfaces, not mocks).

``ToneTTS`` synthesizes a tone whose length follows the text, after a settable
delay, in a worker thread like the embedded engines, and checks the cancel token.
"""

from __future__ import annotations

import asyncio
import math
import struct
import threading
import time

from voiceclaw_app.providers.base import TTS, AudioClip, CancelToken, ProviderError, TTSCapabilities


class ToneTTS(TTS):
    name = "tone"

    def __init__(self, delay_s: float = 0.05, sample_rate: int = 16000, fail_on: str | None = None, thread: bool = True):
        self.delay_s = delay_s
        self.sample_rate = sample_rate
        self.fail_on = fail_on
        self.thread = thread
        self.capabilities = TTSCapabilities(streaming=False, sample_rate=sample_rate)
        self.calls: list[str] = []
        self.active = 0
        self.max_active = 0
        self.finished: list[str] = []
        self._lock = threading.Lock()

    def _work(self, text: str, cancel: CancelToken) -> AudioClip:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            end = time.monotonic() + self.delay_s
            while time.monotonic() < end:
                if cancel.cancelled:
                    raise ProviderError("cancelled")
                time.sleep(0.005)
            n = int(self.sample_rate * min(0.06 * len(text.split()) + 0.1, 5.0))
            pcm = b"".join(struct.pack("<h", int(3000 * math.sin(2 * math.pi * 440 * i / self.sample_rate))) for i in range(n))
            self.finished.append(text)
            return AudioClip.from_pcm16(pcm, self.sample_rate)
        finally:
            with self._lock:
                self.active -= 1

    async def synthesize(self, text: str, *, voice: str, speed: float, cancel: CancelToken) -> AudioClip:
        self.calls.append(text)
        if self.fail_on and self.fail_on in text:
            raise ProviderError("The speech service failed (HTTP 500).", status=500)
        if self.thread:
            return await asyncio.to_thread(self._work, text, cancel)
        return self._work(text, cancel)
