"""Audio the fake speech servers send: the text itself, readable back from the samples.

Each character becomes :data:`SAMPLES_PER_CHAR` samples of value ``ord(c) * 16``, so
a test can turn the audio it received back into the text that was synthesized
(:func:`decode_speech`) and check order, grouping and what a cancel dropped, on the
bytes the client really delivered. 50 ms per character at 24 kHz: speech-like
durations (a 60-character sentence is 3 s).
"""

from __future__ import annotations

import struct

SAMPLE_RATE = 24000
SAMPLES_PER_CHAR = 1200


def encode_speech(text: str, rate: int = SAMPLE_RATE) -> bytes:
    n = max(1, SAMPLES_PER_CHAR * rate // SAMPLE_RATE)
    out = bytearray()
    for ch in text:
        v = ord(ch) if ord(ch) < 128 else ord("?")
        out += struct.pack("<h", v * 16) * n
    return bytes(out)


def decode_speech(pcm: bytes, rate: int = SAMPLE_RATE) -> str:
    """The text in audio made by :func:`encode_speech` (samples must be whole characters)."""
    n = max(1, SAMPLES_PER_CHAR * rate // SAMPLE_RATE)
    count = len(pcm) // 2
    chars = []
    for i in range(n // 2, count, n):
        (v,) = struct.unpack_from("<h", pcm, 2 * i)
        chars.append(chr(max(0, v) // 16))
    return "".join(chars)


def seconds(text: str) -> float:
    return len(text) * SAMPLES_PER_CHAR / SAMPLE_RATE
