"""Semantic end of turn: Pipecat's Smart Turn v3.2 scores whether the speaker is done.

A fixed silence wait either cuts off a person who pauses mid-sentence ("remind me to
buy ... milk and eggs") or makes a finished question wait. Smart Turn v3.2 (the
default end-of-turn model of Pipecat, BSD-2) looks at the turn's audio (its last
8 s: intonation, the words' shape) and says complete / incomplete; the listener
asks it at each short pause (:mod:`.local_listener`).

What comes from the ``pipecat-ai`` wheel, unchanged: the ONNX model
(``pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx``) and its
numpy-only Whisper feature code (``_whisper_features.compute_whisper_log_mel_features``).
:meth:`SmartTurnV3.score_sync` does what ``LocalSmartTurnAnalyzerV3._predict_endpoint``
does with them (keep the last 8 s, zero-pad at the front, features, one ONNX run,
probability > 0.5 = complete). Why not import that class: importing any ``pipecat``
module runs ``pipecat/__init__.py``, which on Python < 3.12 replaces
``asyncio.wait_for`` process-wide with the ``wait_for2`` package's and logs a banner
through loguru; and the package's full dependency set would downgrade protobuf here.
So ``pipecat-ai`` is installed with ``--no-deps`` (Makefile) and its two files are
loaded by path, without running the package's ``__init__``; onnxruntime is already
installed for Piper.

Cost: ~10-30 ms per call on one thread; each call runs on this analyzer's own
worker thread (never the event loop, never queued behind Whisper in the default
executor).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.metadata
import importlib.util
import threading
import time
from pathlib import Path
from types import ModuleType

import numpy as np

from ..pipeline.text.words import STRANDABLE, ends_unfinished, last_word
from .base import EngineUnavailable, TurnAnalyzer, TurnVerdict

SAMPLE_RATE = 16000
#: the model's window: the turn's last 8 s
WINDOW_S = 8
PACKAGE = "pipecat-ai"
MODEL_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
FEATURES_FILE = "pipecat/audio/turn/smart_turn/_whisper_features.py"


def _package_file(relative: str) -> Path:
    """A file of the installed ``pipecat-ai`` distribution, found without importing it."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError as exc:
        raise EngineUnavailable(
            "The end-of-turn model (Smart Turn) is missing: run `make setup` (it installs the Python package 'pipecat-ai' without its dependencies).",
            detail=str(exc),
        ) from exc
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise EngineUnavailable(f"The end-of-turn model file {relative} is missing: reinstall the Python package '{PACKAGE}'.", detail=str(path))
    return path


def _load_features() -> ModuleType:
    path = _package_file(FEATURES_FILE)
    spec = importlib.util.spec_from_file_location("voiceclaw_smart_turn_features", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def last_window(audio: np.ndarray, seconds: int = WINDOW_S) -> np.ndarray:
    """The last ``seconds`` of ``audio``, zero-padded at the front to exactly that length."""
    n = seconds * SAMPLE_RATE
    if audio.size >= n:
        return audio[-n:]
    return np.pad(audio, (n - audio.size, 0))


class SmartTurnV3(TurnAnalyzer):
    """Smart Turn v3.2 on onnxruntime, CPU, one thread; load once (the engines registry keeps one)."""

    name = "smart-turn-v3.2"

    def __init__(self, *, model_path: Path | None = None, cpu_threads: int = 1, threshold: float = 0.5) -> None:
        self.model_path = model_path
        self.cpu_threads = cpu_threads
        self.threshold = threshold
        self._session = None
        self._features: ModuleType | None = None
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime as ort

            path = self.model_path or _package_file(MODEL_FILE)
            so = ort.SessionOptions()
            so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            so.inter_op_num_threads = 1
            so.intra_op_num_threads = self.cpu_threads
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            try:
                features = _load_features()
                session = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
            except EngineUnavailable:
                raise
            except Exception as exc:  # a damaged file: onnxruntime's own error type
                raise EngineUnavailable(f"The end-of-turn model could not load: reinstall the Python package '{PACKAGE}'.", detail=str(exc)) from exc
            self._features, self._session = features, session

    @property
    def loaded(self) -> bool:
        return self._session is not None

    def _warm_sync(self) -> None:
        self.load()
        self.score_sync(np.zeros(SAMPLE_RATE, dtype="<i2").tobytes())

    def score_sync(self, pcm16: bytes) -> TurnVerdict:
        """Blocking: is the turn in ``pcm16`` (16 kHz mono, the whole utterance so far) over?"""
        self.load()
        t0 = time.perf_counter()
        usable = len(pcm16) - len(pcm16) % 2
        audio = np.frombuffer(pcm16[:usable], dtype="<i2").astype(np.float32) / 32768.0
        mel = self._features.compute_whisper_log_mel_features(last_window(audio), do_normalize=True)  # type: ignore[union-attr]
        out = self._session.run(None, {"input_features": mel[None]})  # type: ignore[union-attr]
        p = float(np.asarray(out[0]).reshape(-1)[0])
        return TurnVerdict(complete=p > self.threshold, probability=p, ms=(time.perf_counter() - t0) * 1000.0)

    async def score(self, pcm16: bytes) -> TurnVerdict:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="smart-turn")
        return await asyncio.get_running_loop().run_in_executor(self._executor, self.score_sync, pcm16)


class PauseJudge:
    """Combines the sound's verdict (Smart Turn) with the words' (:mod:`.text_turn`).

    Why the words lead: Smart Turn judges from the sound alone, and speech whose
    intonation does not carry the cues it learned (synthetic voices, a flat speaker,
    a language it knows less) gets near-random scores: on the unseen set it called
    15 of 16 unfinished fragments complete. The words of the same pause are
    transcribed anyway (the preemptive turn needs them), so: a transcript that ends
    on a word no sentence ends on ("the", "and") is unfinished; otherwise the words'
    model decides where it is clear (below :data:`WORDS_NO`: unfinished, from
    :data:`WORDS_YES`: finished) and the sound decides in between ("Yes", "Hello",
    where only the voice says whether more is coming), except on a preposition
    ("...leave from?") or after a doubted last word, where only clear words end it.
    Whisper's closing ``.``/``?`` is not trusted: it follows the same sound, so a
    fragment spoken with a falling pitch comes back as "Remind me to buy."
    With ``use_words=False`` the sound decides alone (``bench turns`` measures both).
    """

    #: the words' probability of a whole request below which the turn goes on, and from which it ends
    WORDS_NO = 0.02
    WORDS_YES = 0.1
    #: a last word the recognizer gives less than this is not trusted at a pause (see
    #: :meth:`trusted_words`)
    LAST_WORD_MIN_P = 0.6

    def __init__(self, *, use_words: bool = True) -> None:
        self.use_words = use_words

    def trusted_words(self, text: str, word_probabilities: tuple[float, ...] | None) -> str:
        """The pause's transcript without the last words the recognizer doubts.

        Cut at a mid-sentence pause, Whisper completes the fragment with a word that
        was never said ("Turn on the lights in *there*.", "Find me a recipe for *it*.")
        and the words' model rightly reads the made-up sentence as finished: the
        turn was cut off. Whisper's own probability of that word is low (measured on
        the unseen set: 0.15-0.54 for the made-up words; 0.83-1.0 for the last words
        of 20 of 24 complete questions, the other 4 garbled anyway), so below
        :data:`LAST_WORD_MIN_P` the words are judged without it: "Turn on the lights
        in" is unfinished. A made-up ending may be several words, each doubted
        ("What is the *Papiore shohan*?" for "What is the population of"): the whole
        trailing run below the threshold is left out, never a word before a trusted
        one. ``word_probabilities`` are the recognizer's, one per word of ``text``
        from the end (its word split may differ at the start: only the end is read);
        ``None`` (not known) keeps the text as it is."""
        words = text.split()
        drop = 0
        for p in reversed(word_probabilities or ()):
            if drop >= len(words) or p >= self.LAST_WORD_MIN_P:
                break
            drop += 1
        return " ".join(words[: len(words) - drop]) if drop else text

    def words_may_end(self, text: str, words: TurnVerdict | None) -> bool:
        """The words alone do not keep the turn open (so its last word is worth checking)."""
        return bool(text.strip()) and not ends_unfinished(text) and words is not None and words.probability >= self.WORDS_NO

    @staticmethod
    def clear_words_only(text: str, doubted: bool = False) -> bool:
        """Only clear words (from :data:`WORDS_YES`) end the turn, the sound breaks no tie:
        after a doubted last word, or on a preposition a question may end on ("Where
        is it from?" ends; "Find me a recipe for" does not: its words score ~0.001)."""
        return doubted or last_word(text) in STRANDABLE

    def needs_sound(self, text: str = "", words: TurnVerdict | None = None, *, doubted: bool = False) -> bool:
        """Whether the verdict depends on the sound: without the words, or where they
        leave it open (between :data:`WORDS_NO` and :data:`WORDS_YES`, no doubted last
        word). Elsewhere the sound is not scored at all: Smart Turn's ~60-100 ms on a
        core would only slow the pause's transcription beside it."""
        if not self.use_words:
            return True
        return self.words_may_end(text, words) and words is not None and words.probability < self.WORDS_YES and not self.clear_words_only(text, doubted)

    def complete(self, sound: TurnVerdict | None, text: str = "", words: TurnVerdict | None = None, *, doubted: bool = False, untrimmed: TurnVerdict | None = None) -> bool:
        """``sound``: Smart Turn's verdict, ``None`` when :meth:`needs_sound` said it was
        not needed (then it does not count). ``doubted``: the transcript's last word was
        left out (:meth:`trusted_words`): the recognizer was completing a fragment, so
        only clear words end the turn (the sound, near random on voices it does not
        know, does not break that tie). ``untrimmed``: the words' verdict *with* the
        doubted ending; it must be clear too. A doubted word is either made up (then
        the words without it decide) or said (then the words with it do): only a
        request finished both ways ends the turn. "Send a message to my sister
        *saying hard*." (0.027) without its doubted ending read finished (0.17) and
        the rest of the sentence became a turn of its own (``bench turns``, 2026-12-07)."""
        if doubted and untrimmed is not None and untrimmed.probability < self.WORDS_YES:
            return False
        words_end = self.use_words and self.words_may_end(text, words) and words is not None and words.probability >= self.WORDS_YES
        return words_end or (self.needs_sound(text, words, doubted=doubted) and sound is not None and sound.complete)
