"""Text transforms between the LLM and TTS, each a small class with one job (Pipecat-style).

- :class:`~.chunker.SpeechChunker` cuts the token stream into speakable chunks.
- :class:`~.speakable.SpeechFormatter` turns a chunk's original text into what TTS reads.
- :class:`~.limiter.SpokenLengthLimiter` stops speaking long replies at a sentence end.
"""

from .chunker import Chunk, SpeechChunker, chunk_text
from .limiter import SpokenLengthLimiter
from .speakable import SpeechFormatter

__all__ = ["Chunk", "SpeechChunker", "SpeechFormatter", "SpokenLengthLimiter", "chunk_text"]
