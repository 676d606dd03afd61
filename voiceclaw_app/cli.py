"""Command line: ``python -m voiceclaw_app.cli SUBCOMMAND``.

``ask "text"`` runs one text turn through the configured providers (env vars),
printing the reply as it streams and the stage timings; ``--speak DIR`` also
writes each chunk's audio. ``doctor`` checks each configured provider and says in
plain words what is wrong.

``transcribe FILE.wav`` prints the transcript and ``speak "text" -o FILE.wav`` writes
spoken audio, with the configured engines: the embedded ones unless
``VOICECLAW_STT=deepgram|deepgram-flux`` / ``VOICECLAW_TTS=openai|deepgram|openai-realtime``
(with their API keys) say
otherwise. They exist to check an install without the web app ("does Whisper load,
does Piper speak?").

``user add|list|passwd|remove`` manage accounts and ``serve-check HOST`` guards
``make run`` (``cli_users.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import wave
from pathlib import Path

from .config import VoiceSettings
from .providers.base import STT, TTS, CancelToken, ProviderError


def _make_stt(settings: VoiceSettings) -> STT:
    from .providers.factory import build_stt
    from .secrets import KeyStore

    return build_stt(settings, KeyStore().load())


def _make_tts(settings: VoiceSettings) -> TTS:
    from .providers.factory import build_tts
    from .secrets import KeyStore

    return build_tts(settings, KeyStore().load())


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
    try:
        stt = _make_stt(settings)
    except ProviderError as exc:
        print(exc.user_message, file=sys.stderr)
        return 1

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
    try:
        tts = _make_tts(settings)
    except ProviderError as exc:
        print(exc.user_message, file=sys.stderr)
        return 1
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


def cmd_ask(args: argparse.Namespace) -> int:
    """One text turn through the configured providers, streamed to the terminal."""
    from .pipeline.audio_store import AudioStore
    from .pipeline.events import AudioReady, LLMToken, StillWorking, TurnDone, TurnError, TurnNotice
    from .pipeline.turn import TurnRunner
    from .providers.factory import build_llm, build_tts
    from .secrets import KeyStore

    settings = VoiceSettings.from_env()
    keys = KeyStore().load()
    out_dir = Path(args.speak) if args.speak else None

    async def run() -> int:
        import tempfile

        from .providers.base import AudioClip

        tts = None
        rc = 0
        try:
            llm = build_llm(settings, keys)
        except ProviderError as exc:
            print(exc.user_message, file=sys.stderr)
            return 1
        # the turn's pieces and the TTS cache go to a scratch folder; DIR gets one WAV per chunk
        with tempfile.TemporaryDirectory(prefix="voiceclaw-ask-") as scratch:
            try:
                tts = build_tts(settings, keys) if out_dir else None
                store = AudioStore(Path(scratch))
                runner = TurnRunner(llm=llm, tts=tts, audio_store=store, settings=settings)
                parts: dict[int, list[AudioClip]] = {}
                await runner.warm()
                async for ev in runner.run(runner.prepare([], "cli"), args.text, speak=out_dir is not None):
                    if isinstance(ev, LLMToken):
                        print(ev.text, end="", flush=True)
                    elif isinstance(ev, StillWorking):
                        print(f"\n[still working after {ev.waited_ms / 1000:.1f} s]", file=sys.stderr)
                    elif isinstance(ev, TurnNotice):
                        print(f"\n[{ev.message}]", file=sys.stderr)
                    elif isinstance(ev, AudioReady):
                        path = store.path_for(ev.audio_id)
                        if path is not None:
                            parts.setdefault(ev.seq, []).append(AudioClip.from_wav(path.read_bytes()))
                    elif isinstance(ev, (TurnDone, TurnError)):
                        print()
                        if isinstance(ev, TurnError):
                            print(f"Error: {ev.message}", file=sys.stderr)
                            rc = 1
                        stages = ", ".join(f"{k} {v:.0f} ms" for k, v in ev.marks.stages().items())
                        print(f"timings: {stages}", file=sys.stderr)
                if out_dir is not None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    for n, seq in enumerate(sorted(parts), start=1):
                        clips = parts[seq]
                        whole = AudioClip.from_pcm16(b"".join(c.pcm16() for c in clips), clips[0].sample_rate)
                        target = out_dir / f"chunk-{n:02d}.wav"
                        target.write_bytes(whole.wav)
                        print(f"[audio {n}: {target} ({whole.duration_ms / 1000:.2f} s)]", file=sys.stderr)
            except ProviderError as exc:  # e.g. EngineUnavailable from build_llm/build_tts
                print(exc.user_message, file=sys.stderr)
                rc = 1
            finally:
                await llm.aclose()
                if tts is not None:
                    await tts.aclose()
        return rc

    try:
        return asyncio.run(run())
    except ProviderError as exc:
        print(exc.user_message, file=sys.stderr)
        return 1


def tempfile_dir() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="voiceclaw-ask-")


def _configured(provider):
    """The configured provider itself, not a fallback wrapper's stand-in."""
    return getattr(provider, "primary", provider)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Check every configured provider; exit 1 if any is not usable."""
    from .pipeline.diagnostics import check_llm, check_stt, check_tts
    from .providers.factory import build_llm, build_stt, build_tts
    from .secrets import KeyStore

    from .config import env_headers_problem

    settings = VoiceSettings.from_env()
    problems = settings.problems()
    headers_problem = env_headers_problem()
    if headers_problem:
        problems = {**problems, "llm_headers": headers_problem}
    for field_name, message in problems.items():
        print(f"settings: {field_name}: {message}")
    retiring = settings.tts_retirement_warning()
    if retiring:
        print(f"TTS: WARNING - {retiring}")
    keys = KeyStore().load()

    async def run() -> bool:
        ok = not problems
        checks = [
            ("LLM", lambda: check_llm(build_llm(settings, keys), settings.llm_model_voice, headers=settings.llm_headers)),
            # check the configured service itself, not the embedded voice that would stand in for it
            ("TTS", lambda: check_tts(_configured(build_tts(settings, keys)), settings.tts_voice, settings.tts_speed)),
            ("STT", lambda: check_stt(build_stt(settings, keys), settings.stt_language)),
        ]
        if settings.stt_provider == "deepgram-flux":
            from .pipeline.diagnostics import check_listener
            from .providers.deepgram_flux import FluxListener

            checks.append(("STT live (Flux)", lambda: check_listener(FluxListener.from_settings(settings, keys))))
        for label, make in checks:
            try:
                result = await make()
            except ProviderError as exc:
                print(f"{label}: FAIL - {exc.user_message}")
                ok = False
                continue
            timing = f" (connect {result.connect_ms:.0f} ms)" if result.connect_ms is not None else ""
            print(f"{label} [{result.provider}]: {'ok' if result.ok else 'FAIL'} - {result.message}{timing}")
            ok = ok and result.ok
        return ok

    return 0 if asyncio.run(run()) else 1


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

    p = sub.add_parser("ask", help="run one text turn through the configured providers")
    p.add_argument("text")
    p.add_argument("--speak", metavar="DIR", default=None, help="also write each chunk's audio (WAV) into DIR")
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser("doctor", help="check each configured provider and explain what is wrong")
    p.set_defaults(func=cmd_doctor)

    from .cli_users import add_parsers

    add_parsers(sub)  # user add/list/passwd/remove, serve-check
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
