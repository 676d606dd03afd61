"""Command line: ``python -m voiceclaw_app.cli SUBCOMMAND``.

``transcribe FILE.wav`` prints the transcript and ``speak "text" -o FILE.wav`` writes
spoken audio, with the configured engines: the embedded ones unless
``VOICECLAW_STT=deepgram`` / ``VOICECLAW_TTS=openai`` (with their API keys) say
otherwise. They exist to check an install without the web app ("does Whisper load,
does Piper speak?").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import wave
from pathlib import Path

from .config import VoiceSettings
from .providers.base import STT, TTS, CancelToken, ProviderError


def _make_stt(settings: VoiceSettings) -> STT:
    if settings.stt_provider == "deepgram":
        from .providers.deepgram_stt import DeepgramSTT

        key = os.environ.get("DEEPGRAM_API_KEY", "")
        if key:
            return DeepgramSTT(api_key=key, url=os.environ.get("VOICECLAW_DEEPGRAM_URL") or None)
        print("DEEPGRAM_API_KEY is not set: using the embedded Whisper engine.", file=sys.stderr)
    from .providers.local_stt import LocalWhisperSTT

    return LocalWhisperSTT()


def _make_tts(settings: VoiceSettings) -> TTS:
    if settings.tts_provider == "openai":
        from .providers.openai_tts import OpenAITTS

        key = os.environ.get("OPENAI_API_KEY", "")
        if key:
            return OpenAITTS(base_url=os.environ.get("VOICECLAW_TTS_BASE_URL") or None, api_key=key, model=settings.tts_model)
        print("OPENAI_API_KEY is not set: using the embedded Piper engine.", file=sys.stderr)
    from .providers.local_tts import LocalPiperTTS

    return LocalPiperTTS()


def read_wav(path: Path) -> tuple[bytes, int]:
    """PCM16 mono of a WAV file, and its rate (stereo is averaged to mono)."""
    import numpy as np

    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        rate, channels = w.getframerate(), w.getnchannels()
        data = w.readframes(w.getnframes())
    if channels > 1:
        pcm = np.frombuffer(data[: len(data) - len(data) % (2 * channels)], dtype="<i2").reshape(-1, channels)
        data = pcm.mean(axis=1).astype("<i2").tobytes()
    return data, rate


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Print the transcript of a WAV file (any rate, mono or stereo, 16-bit)."""
    settings = VoiceSettings.from_env()
    try:
        pcm, rate = read_wav(Path(args.file))
    except (OSError, EOFError, ValueError, wave.Error) as exc:
        print(f"Cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    stt = _make_stt(settings)

    async def run() -> str:
        try:
            result = await stt.transcribe(pcm, sample_rate=rate, language=args.language or settings.stt_language, cancel=CancelToken())
            return result.text
        finally:
            await stt.aclose()

    try:
        text = asyncio.run(run())
    except ProviderError as exc:
        print(exc.user_message, file=sys.stderr)
        return 1
    print(text)
    return 0


def cmd_speak(args: argparse.Namespace) -> int:
    """Synthesize ``text`` to a WAV file."""
    settings = VoiceSettings.from_env()
    tts = _make_tts(settings)
    speed = args.speed if args.speed is not None else settings.tts_speed

    async def run():
        try:
            return await tts.synthesize(args.text, voice=settings.tts_voice, speed=speed, cancel=CancelToken())
        finally:
            await tts.aclose()

    try:
        clip = asyncio.run(run())
    except ProviderError as exc:
        print(exc.user_message, file=sys.stderr)
        return 1
    Path(args.output).write_bytes(clip.wav)
    print(f"{args.output}: {clip.duration_ms / 1000:.2f} s at {clip.sample_rate} Hz")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m voiceclaw_app.cli", description="VoiceClaw command line tools.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("transcribe", help="print the transcript of a WAV file")
    p.add_argument("file", help="a 16-bit PCM WAV file (any sample rate)")
    p.add_argument("--language", default=None, help="language code (default: the stt_language setting)")
    p.set_defaults(func=cmd_transcribe)

    p = sub.add_parser("speak", help="write spoken audio for a text to a WAV file")
    p.add_argument("text")
    p.add_argument("-o", "--output", required=True, help="the WAV file to write")
    p.add_argument("--speed", type=float, default=None, help="speech speed (default: the tts_speed setting)")
    p.set_defaults(func=cmd_speak)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
