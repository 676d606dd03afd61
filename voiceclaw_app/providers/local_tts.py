"""Embedded text-to-speech: Piper with the ``en_US-joe-medium`` voice (22,050 Hz WAV).

Piper's own loader opens an onnxruntime session with default options, which uses
every core; here the session is built with ``intra_op_num_threads`` capped
(default 1, ``VOICECLAW_TTS_THREADS``) so a synthesis does not starve llama.cpp,
which keeps generating the next clause meanwhile. Calls run in a worker thread
and are serialized (one espeak phonemizer per process, and two parallel syntheses
on two cores only slow each other down).

``speed`` maps to Piper's ``length_scale`` (phoneme duration): speed 2.0 ->
length_scale 0.5.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import numpy as np

from .base import TTS, AudioClip, CancelToken, EngineUnavailable, ProviderError, TTSCapabilities
from .local_models import PIPER_PACKAGE, PIPER_VOICE, piper_voice_files
from .local_stt import env_threads

SAMPLE_RATE = 22050
#: silence between Piper's sentences inside one chunk
SENTENCE_GAP_S = 0.12


class LocalPiperTTS(TTS):
    """Piper TTS, one voice loaded once per instance (the engines registry keeps one)."""

    name = "local-piper"
    capabilities = TTSCapabilities(streaming=False, sample_rate=SAMPLE_RATE)

    def __init__(self, *, threads: int | None = None, voice_dir: Path | None = None) -> None:
        self.threads = threads or env_threads("VOICECLAW_TTS_THREADS", 1)
        self._voice_dir = voice_dir
        self._voice = None
        self._warmed = False
        self._load_lock = threading.Lock()
        self._call_lock = threading.Lock()

    # ------------------------------------------------------------ lifecycle
    def load(self) -> None:
        with self._load_lock:
            if self._voice is not None:
                return
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig

            onnx_path, cfg_path = piper_voice_files(self._voice_dir)
            opts = onnxruntime.SessionOptions()
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
            opts.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
            try:
                session = onnxruntime.InferenceSession(str(onnx_path), sess_options=opts, providers=["CPUExecutionProvider"])
                config = PiperConfig.from_dict(json.loads(cfg_path.read_text(encoding="utf-8")))
            except Exception as exc:  # onnxruntime raises its own Fail/InvalidProtobuf types
                raise EngineUnavailable(
                    f"The text-to-speech voice could not load: reinstall the Python package '{PIPER_PACKAGE}'.",
                    detail=str(exc),
                ) from exc
            self._voice = PiperVoice(session=session, config=config)

    @property
    def loaded(self) -> bool:
        return self._voice is not None

    async def warm(self) -> None:
        """Load and run one synthesis, once: the pipeline calls this at every speech start."""
        if self._warmed:
            return
        await asyncio.to_thread(self._warm_sync)

    def _warm_sync(self) -> None:
        self.load()
        if self._warmed:
            return
        self.synthesize_sync("Ready.", speed=1.0)  # first onnxruntime run allocates its arenas
        self._warmed = True

    def cache_identity(self, voice: str, speed: float) -> tuple[str, str, float]:
        return (self.name, voice or PIPER_VOICE, round(speed, 3))

    # ------------------------------------------------------------ synthesis
    async def synthesize(self, text: str, *, voice: str = "", speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        return await asyncio.to_thread(self.synthesize_sync, text, speed=speed, cancel=cancel)

    def synthesize_sync(self, text: str, *, speed: float = 1.0, cancel: CancelToken | None = None) -> AudioClip:
        """Blocking synthesis of one chunk to a 22,050 Hz mono PCM16 WAV clip."""
        from piper.config import SynthesisConfig

        self.load()
        speed = speed if speed and speed > 0 else 1.0
        length_scale = float(np.clip(1.0 / speed, 0.25, 4.0))
        config = SynthesisConfig(length_scale=length_scale)
        pieces: list[np.ndarray] = []
        gap = np.zeros(int(SENTENCE_GAP_S * SAMPLE_RATE), dtype=np.int16)
        with self._call_lock:
            try:
                for chunk in self._voice.synthesize(text, syn_config=config):
                    if cancel is not None and cancel.cancelled:
                        break
                    if pieces:
                        pieces.append(gap)
                    pieces.append(chunk.audio_int16_array)
            except Exception as exc:
                raise ProviderError("The local voice could not speak this text.", detail=repr(exc)) from exc
        pcm = np.concatenate(pieces).astype("<i2").tobytes() if pieces else b""
        return AudioClip.from_pcm16(pcm, SAMPLE_RATE)
