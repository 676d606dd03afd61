"""Stop speaking a long reply at a chunk (sentence) end; the screen keeps the rest."""

from __future__ import annotations

from .chunker import Chunk

REST_ON_SCREEN = "The rest is on screen."


class SpokenLengthLimiter:
    """Admits chunks until ``max_chars`` of speech, then one notice and silence.

    The first chunk is always spoken, even when it alone is over the limit: a reply
    that says nothing at all would sound broken.
    """

    def __init__(self, max_chars: int, notice: str = REST_ON_SCREEN):
        self.max_chars = max_chars
        self.notice = notice
        self.spoken_chars = 0
        self.truncated = False
        self._admitted = 0

    def admit(self, chunk: Chunk) -> list[Chunk]:
        if self.truncated:
            return []
        if not chunk.speech:
            return [chunk]
        if self._admitted and self.spoken_chars + len(chunk.speech) > self.max_chars:
            self.truncated = True
            return [Chunk(chunk.seq, self.notice, self.notice, chunk.start, chunk.decided_at, notice=True)]
        self._admitted += 1
        self.spoken_chars += len(chunk.speech) + 1
        return [chunk]
