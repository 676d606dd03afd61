"""Benchmarks: ``python -m voiceclaw_app.bench SCENARIO --json``."""
