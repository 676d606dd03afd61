"""``python -m voiceclaw_app.bench SCENARIO [--json] [--runs N]``: one JSON object per run.

``local`` also takes ``--silence-ms MS``, ``--no-speculative``, ``--no-prefill`` and ``-v``
(the same flags as ``python -m voiceclaw_app.bench.local``).

Scenarios: ``pipeline`` (text turns against local protocol servers), ``local``
(embedded engines, voice to first audio), ``cloud`` (Deepgram/LLM/TTS protocol
servers with the guide's latency profile), ``browser`` (true V2V in Chromium),
``load`` (``--sessions N --minutes M --workers W``: N simulated users against a
Redis + PostgreSQL + Caddy cluster of W workers).
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
    if name == "load":
        from .load import run_load

        return run_load
    raise SystemExit(f"unknown scenario {name!r} (pipeline, local, cloud, browser, load)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m voiceclaw_app.bench", description=__doc__)
    parser.add_argument("scenario", choices=["pipeline", "local", "cloud", "browser", "load"])
    parser.add_argument("--json", action="store_true", help="print only the JSON object")
    parser.add_argument("--runs", type=int, default=None, help="number of turns (scenario default otherwise)")
    parser.add_argument("--via-ws", action="store_true", help="cloud: drive the running app's /ws/voice instead of the pipeline directly")
    parser.add_argument("--people", type=int, default=None, help="browser: how many people (browsers, identities) talk at once")
    local = parser.add_argument_group("local scenario")
    local.add_argument("--silence-ms", type=int, default=None, help="local: vad_silence_ms (end-of-turn silence wait)")
    local.add_argument("--no-speculative", action="store_true", help="local: no work before the end of turn is decided")
    local.add_argument("--no-prefill", action="store_true", help="local: no LLM prefill while the user speaks")
    local.add_argument("-v", "--verbose", action="store_true", help="local: print each run as it finishes")
    load = parser.add_argument_group("load scenario")
    load.add_argument("--sessions", type=int, default=None, help="load: simulated users (default 50)")
    load.add_argument("--minutes", type=float, default=None, help="load: how long they talk (default 5)")
    load.add_argument("--workers", type=int, default=None, help="load: backend workers behind the proxy (default 3)")
    args = parser.parse_args(argv)
    load_flags = {k: v for k, v in {"sessions": args.sessions, "minutes": args.minutes, "workers": args.workers}.items() if v is not None}
    if load_flags and args.scenario != "load":
        parser.error("--sessions, --minutes and --workers apply to the load scenario only")
    local_flags = args.silence_ms is not None or args.no_speculative or args.no_prefill or args.verbose
    if local_flags and args.scenario != "local":
        parser.error("--silence-ms, --no-speculative, --no-prefill and -v apply to the local scenario only")
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
    if args.people is not None:
        if args.scenario != "browser":
            parser.error("--people applies to the browser scenario only")
        kwargs["people"] = args.people
    if args.scenario == "load":
        kwargs = load_flags
    if args.scenario == "local":
        kwargs.update(silence_ms=args.silence_ms, speculative=False if args.no_speculative else None, prefill=not args.no_prefill, verbose=args.verbose)
    result = fn(**kwargs)
    if inspect.isawaitable(result):
        result = asyncio.run(result)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if not result.get("errors") else 1


if __name__ == "__main__":
    raise SystemExit(main())
