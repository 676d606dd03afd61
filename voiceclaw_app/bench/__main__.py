"""``python -m voiceclaw_app.bench SCENARIO [--json] [--runs N]``: one JSON object per run.

Scenarios: ``pipeline`` (text turns against local protocol servers), ``local``
(embedded engines, voice to first audio), ``cloud`` (Deepgram/LLM/TTS protocol
servers with the guide's latency profile; ``--tts``/``--stt`` pick the protocols,
``--via-ws`` drives the running app's ``/ws/voice``), ``browser`` (true V2V in
Chromium; ``--people N`` talk at once), ``stt`` (the embedded recognizer beside
faster-whisper's standard path, unseen voices), ``turns`` (end-of-turn decisions:
cut-offs on hesitations, dead air), ``load`` (``--sessions N --minutes M --workers W``:
N simulated users against a Redis + PostgreSQL + Caddy cluster of W workers).

``local`` also takes ``--silence-ms MS``, ``--no-speculative``, ``--no-prefill``,
``--turn-detection``, ``--fixtures`` and ``-v`` (the same flags as
``python -m voiceclaw_app.bench.local``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import os
import sys

#: scenario -> (module, function)
SCENARIOS = {
    "pipeline": ("pipeline", "run_pipeline"),
    "local": ("local", "run_local"),
    "cloud": ("cloud", "run_cloud"),
    "browser": ("browser", "run_browser"),
    "stt": ("stt", "run_stt"),
    "turns": ("turns", "run_turns"),
    "load": ("load", "run_load"),
}


def _scenario(name: str, via_ws: bool = False):
    module, fn = ("cloud_ws", "run_cloud_ws") if name == "cloud" and via_ws else SCENARIOS[name]
    return getattr(importlib.import_module(f".{module}", __package__), fn)


def _only(parser: argparse.ArgumentParser, given: bool, scenario: str, allowed: tuple[str, ...], flags: str) -> None:
    if given and scenario not in allowed:
        parser.error(f"{flags} apply to the {' and '.join(allowed)} scenario{'s' if len(allowed) > 1 else ''} only")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceclaw_app.bench", description=__doc__)
    parser.add_argument("scenario", choices=list(SCENARIOS))
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--runs", type=int, default=None, help="number of turns (scenario default otherwise)")
    parser.add_argument("--via-ws", action="store_true", help="cloud: drive the running app's /ws/voice instead of the pipeline directly")
    parser.add_argument("--tts", choices=["openai", "deepgram", "openai-realtime"], default=None, help="cloud, browser: the TTS protocol (cloud's default: openai, /v1/audio/speech; browser: the embedded engines unless --tts/--stt)")
    parser.add_argument("--stt", choices=["deepgram", "flux"], default=None, help="cloud, browser: Deepgram v1 listen (default) or Flux (listen v2)")
    parser.add_argument("--people", type=int, default=None, help="browser: how many people (browsers, accounts) talk at once")
    local = parser.add_argument_group("local scenario")
    local.add_argument("--silence-ms", type=int, default=None, help="local: vad_silence_ms (end-of-turn silence wait)")
    local.add_argument("--no-speculative", action="store_true", help="local: no work before the end of turn is decided")
    local.add_argument("--no-prefill", action="store_true", help="local: no LLM prefill while the user speaks")
    local.add_argument("--turn-detection", choices=["smart_turn", "silence"], default=None, help="local: end-of-turn mode (default: the settings')")
    local.add_argument("--fixtures", choices=["default", "unseen"], default="default", help="local, browser: tests/fixtures (default) or the unseen set's questions")
    local.add_argument("-v", "--verbose", action="store_true", help="local, stt, turns: print each run as it finishes")
    load = parser.add_argument_group("load scenario")
    load.add_argument("--sessions", type=int, default=None, help="load: simulated users (default 50)")
    load.add_argument("--minutes", type=float, default=None, help="load: how long they talk (default 5)")
    load.add_argument("--workers", type=int, default=None, help="load: backend workers behind the proxy (default 3)")
    load.add_argument("--harness-processes", type=int, default=None, help="load: processes the simulated users are spread over (default 1)")
    load.add_argument("--idle", action="store_true", default=None, help="load: nobody speaks; what the open microphones alone cost (cpu_pct)")
    args = parser.parse_args(argv)
    s = args.scenario
    load_flags = {k: v for k, v in {"sessions": args.sessions, "minutes": args.minutes, "workers": args.workers, "harness_processes": args.harness_processes, "idle": args.idle}.items() if v is not None}
    _only(parser, bool(load_flags), s, ("load",), "--sessions, --minutes, --workers, --harness-processes and --idle")
    _only(parser, args.silence_ms is not None or args.no_speculative or args.no_prefill or args.turn_detection is not None, s, ("local",), "--silence-ms, --no-speculative, --no-prefill and --turn-detection")
    _only(parser, args.fixtures != "default", s, ("local", "browser"), "--fixtures")
    _only(parser, args.verbose, s, ("local", "stt", "turns"), "-v")
    _only(parser, bool(args.tts or args.stt), s, ("cloud", "browser"), "--tts and --stt")
    _only(parser, args.people is not None, s, ("browser",), "--people")
    _only(parser, args.via_ws, s, ("cloud",), "--via-ws")
    # The protocol test servers live in tests/; make the repo root importable.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr)
    fn = _scenario(s, args.via_ws)
    kwargs: dict = {"runs": args.runs} if args.runs is not None and s != "load" else {}
    if s == "load":
        kwargs.update(load_flags)
    if s in ("cloud", "browser"):
        kwargs.update({k: v for k, v in (("tts", args.tts), ("stt", args.stt)) if v})
    if s == "browser" and args.people is not None:
        kwargs["people"] = args.people
    if s == "browser" and args.fixtures != "default":
        kwargs["fixtures"] = args.fixtures
    if s == "local":
        kwargs.update(silence_ms=args.silence_ms, speculative=False if args.no_speculative else None, prefill=not args.no_prefill, verbose=args.verbose)
        if args.turn_detection is not None:
            kwargs["turn_detection"] = args.turn_detection
        if args.fixtures != "default":
            kwargs["fixtures"] = args.fixtures
    elif s in ("stt", "turns"):
        kwargs["verbose"] = args.verbose
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if not result.get("errors") else 1


if __name__ == "__main__":
    raise SystemExit(main())
