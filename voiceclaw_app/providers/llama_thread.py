"""Every llama.cpp call in the process runs on one thread.

Why: llama.cpp's CPU backend parallelizes with OpenMP (libgomp), and libgomp keeps
a team of worker threads for each thread that calls into it. Once the threads of
all teams outnumber the cores, libgomp stops spinning at the barriers between a
graph's operations and sleeps on a futex at each one instead. The reply's model
was called from a fresh thread per reply and from ``asyncio.to_thread``, and the
words' end-of-turn model from its own executor: several teams on two cores.
Measured on the third 2-core host (Intel Xeon, 2026-12-06), Gemma 3 270M:

* the reply: first token 82-102 ms and 46-50 ms per token, against 61-75 ms and
  32 ms per token with every call on one thread;
* the words' model: ~100 ms to score a 12-word request, against 63-67 ms.

One thread also means the two models take turns on the cores instead of fighting
over them. A reply is advanced one step (one piece of text) per job
(:meth:`.local_llm.LocalLlamaLLM.stream`), so the words' model, asked at a pause
while a preemptive reply is generating, waits at most one token, not the reply.

Whisper (CTranslate2) bundles its own libgomp and runs on one thread
(:mod:`.local_stt`); Piper and Smart Turn use onnxruntime's own pools.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from typing import Any, Callable, TypeVar

T = TypeVar("T")

_guard = threading.Lock()
_executor: concurrent.futures.ThreadPoolExecutor | None = None
_ident: int | None = None


def _mark() -> None:
    global _ident
    _ident = threading.get_ident()


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    global _executor
    with _guard:
        if _executor is None:
            _executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama", initializer=_mark)
        return _executor


def _forget_after_fork() -> None:
    """A forked child has no copy of the thread: it makes its own on first use."""
    global _executor, _ident, _guard
    _executor, _ident, _guard = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def on_llama_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident


def submit(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> "concurrent.futures.Future[T]":
    """Queue ``fn`` on the llama thread (first in, first out)."""
    return _pool().submit(fn, *args, **kwargs)


def call(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` on the llama thread and wait for it (blocking: worker threads,
    tests, the CLI). On the llama thread itself it runs at once."""
    if on_llama_thread():
        return fn(*args, **kwargs)
    return submit(fn, *args, **kwargs).result()


async def run(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Await ``fn`` on the llama thread. Cancelling the awaiter does not stop a job
    already running; later jobs still run after it, in order."""
    return await asyncio.wrap_future(submit(fn, *args, **kwargs))
