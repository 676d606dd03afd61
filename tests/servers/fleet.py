"""The three cloud protocol servers (Deepgram live, OpenAI chat SSE, OpenAI speech) together,
with the guide's cloud profile, on an event loop of their own.

Why a loop of their own: the app under test runs in other processes, and the test or
benchmark driving it is busy pacing microphone audio; the servers must answer on
time regardless. :class:`CloudFleet` runs them on a background thread (tests reach
the server objects to queue faults); :func:`fleet_process` runs one in a child
process (the load benchmark, whose clients would otherwise share the GIL with them).
``env()`` is what a VoiceClaw process needs to use them.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import threading
from typing import Callable

from .deepgram import DeepgramProfile, FakeDeepgramServer
from .openai_chat import ChatBehavior, FakeChatServer
from .openai_speech import FakeSpeechServer, SpeechBehavior

# the guide's cloud profile, as the other cloud benchmarks use it
from voiceclaw_app.bench.cloud import INTERIM_S, IS_FINAL_S, SPEECH_FINAL_S  # noqa: E402
from voiceclaw_app.bench.pipeline import TOKENS_PER_S, TTFT_S, TTS_REALTIME, TTS_TTFB_S, replies  # noqa: E402

API_KEY = "bench"


def numbered_replies(seed: int = 13) -> Callable[[list[dict]], str]:
    """A reply whose first clause is new each time (the app's TTS cache must not serve it)."""
    pool = replies(64, seed=seed)
    counter = itertools.count()

    def reply(_messages: list[dict]) -> str:
        k = next(counter)
        return f"Answer {k}: {pool[k % len(pool)]}"

    return reply


class CloudFleet:
    """``start()`` / ``stop()`` (or ``with``); ``dg``, ``chat``, ``speech`` are the live servers."""

    def __init__(self, reply_fn: Callable[[list[dict]], str] | None = None, default_text: str = "What is the capital of France?"):
        self.reply_fn = reply_fn or numbered_replies()
        self.profile = DeepgramProfile(interim_every_s=INTERIM_S, is_final_after_s=IS_FINAL_S, speech_final_after_s=SPEECH_FINAL_S, energy_threshold=100.0, default_text=default_text, idle_timeout_s=30.0)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cloud-fleet", daemon=True)
        self.dg: FakeDeepgramServer | None = None
        self.chat: FakeChatServer | None = None
        self.speech: FakeSpeechServer | None = None

    def start(self) -> "CloudFleet":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        from voiceclaw_app.server.loop_watch import LoopWatch, threshold_ms_from_env

        watch_ms = threshold_ms_from_env()
        if watch_ms:  # was the simulated cloud itself late? (its loop's lag, logged)
            LoopWatch(watch_ms).start()
        self.dg = await FakeDeepgramServer(api_key=API_KEY, profile=self.profile).start()
        self.chat = await FakeChatServer(ChatBehavior(ttft_s=TTFT_S, tokens_per_s=TOKENS_PER_S), reply_fn=self.reply_fn, api_key=API_KEY).start()
        self.speech = await FakeSpeechServer(SpeechBehavior(ttfb_s=TTS_TTFB_S, realtime_factor=TTS_REALTIME), api_key=API_KEY).start()

    def call(self, fn: Callable[[], object]) -> object:
        """Run ``fn`` on the servers' loop (to queue a fault or read what they saw)."""
        async def run():
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(10)

    def stop(self) -> None:
        async def _stop():
            for srv in (self.dg, self.chat, self.speech):
                if srv is not None:
                    await srv.stop()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(30)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self) -> "CloudFleet":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        assert self.dg and self.chat and self.speech
        return fleet_env(self.dg.url, self.chat.base_url, self.speech.base_url)


def fleet_env(dg_url: str, chat_url: str, speech_url: str) -> dict[str, str]:
    """Provider settings that point a VoiceClaw process at the fleet."""
    return {
        "VOICECLAW_STT": "deepgram", "DEEPGRAM_API_KEY": API_KEY, "VOICECLAW_DEEPGRAM_URL": dg_url,
        "VOICECLAW_TTS": "openai", "OPENAI_API_KEY": API_KEY, "VOICECLAW_TTS_BASE_URL": speech_url, "VOICECLAW_TTS_VOICE": "alloy",
        "VOICECLAW_LLM_BASE_URL": chat_url, "VOICECLAW_LLM_API_KEY": API_KEY, "VOICECLAW_LLM_MODEL": "bench-model",
    }


def _child(conn, default_text: str) -> None:
    import logging
    import os

    if os.environ.get("VOICECLAW_LOOP_WATCH_MS"):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s fleet %(levelname)s %(name)s: %(message)s")
    fleet = CloudFleet(default_text=default_text).start()
    conn.send(fleet.env())
    conn.recv()  # anything (or EOF): stop
    fleet.stop()


class fleet_process:
    """A :class:`CloudFleet` in a child process: ``with fleet_process() as env: ...``."""

    def __init__(self, default_text: str = "What is the capital of France?"):
        self.default_text = default_text

    def __enter__(self) -> dict[str, str]:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(child, self.default_text), daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            self._proc.kill()
            raise RuntimeError("the protocol servers did not start")
        return self._conn.recv()

    @property
    def pid(self) -> int | None:
        """The child process's pid (the load benchmark counts its CPU)."""
        return self._proc.pid

    def __exit__(self, *exc) -> None:
        try:
            self._conn.send("stop")
        except (BrokenPipeError, OSError):
            pass
        self._proc.join(15)
        if self._proc.is_alive():
            self._proc.kill()
