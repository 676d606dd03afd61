"""``python -m voiceclaw_app.bench SCENARIO [--json] [--runs N]``: one JSON object per run.

``local`` also takes ``--silence-ms MS``, ``--no-speculative``, ``--no-prefill`` and ``-v``
(the same flags as ``python -m voiceclaw_app.bench.local``).

Scenarios: ``pipeline`` (text turns against local protocol servers), ``local``
(embedded engines, voice to first audio), ``cloud`` (Deepgram/LLM/TTS protocol
servers with the guide's latency profile), ``browser`` (true V2V in Chromium).
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import logging
import os
import sys


def _scenario(name: str):
    if name == "pipeline":
        from .pipeline import run_pipeline

        return run_pipeline
    if name == "local":
        from .local import run_local

        return run_local
    if name == "cloud":
        from .cloud import run_cloud

        return run_cloud
    if name == "browser":
        from .browser import run_browser

        return run_browser
    raise SystemExit(f"unknown scenario {name!r} (pipeline, local, cloud, browser)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceclaw_app.bench", description=__doc__)
    parser.add_argument("scenario", choices=["pipeline", "local", "cloud", "browser"])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--runs", type=int, default=None, help="number of turns (scenario default otherwise)")
    parser.add_argument("--via-ws", action="store_true", help="cloud: drive the running app's /ws/voice instead of the pipeline directly")
    parser.add_argument("--tts", choices=["openai", "deepgram", "openai-realtime"], default=None, help="cloud, browser: the TTS protocol (cloud's default: openai, /v1/audio/speech; browser: the embedded engines unless --tts/--stt)")
    parser.add_argument("--stt", choices=["deepgram", "flux"], default=None, help="cloud, browser: Deepgram v1 listen (default) or Flux (listen v2)")
    local = parser.add_argument_group("local scenario")
    local.add_argument("--silence-ms", type=int, default=None, help="local: vad_silence_ms (end-of-turn silence wait)")
    local.add_argument("--no-speculative", action="store_true", help="local: no work before the end of turn is decided")
    local.add_argument("--no-prefill", action="store_true", help="local: no LLM prefill while the user speaks")
    local.add_argument("-v", "--verbose", action="store_true", help="local: print each run as it finishes")
    args = parser.parse_args(argv)
    local_flags = args.silence_ms is not None or args.no_speculative or args.no_prefill or args.verbose
    if local_flags and args.scenario != "local":
        parser.error("--silence-ms, --no-speculative, --no-prefill and -v apply to the local scenario only")
    if (args.tts or args.stt) and args.scenario not in ("cloud", "browser"):
        parser.error("--tts and --stt apply to the cloud and browser scenarios only")
    # The protocol test servers live in tests/; make the repo root importable.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if root not in sys.path:
        sys.path.insert(0, root)
    logging.basicConfig(level=logging.WARNING if args.json else logging.INFO, stream=sys.stderr)
    if args.scenario == "cloud" and args.via_ws:
        from .cloud_ws import run_cloud_ws as fn
    else:
        fn = _scenario(args.scenario)
    kwargs = {"runs": args.runs} if args.runs is not None else {}
    if args.scenario in ("cloud", "browser"):
        kwargs.update({k: v for k, v in (("tts", args.tts), ("stt", args.stt)) if v})
    if args.scenario == "local":
        kwargs.update(silence_ms=args.silence_ms, speculative=False if args.no_speculative else None, prefill=not args.no_prefill, verbose=args.verbose)
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if not result.get("errors") else 1


if __name__ == "__main__":
    raise SystemExit(main())
