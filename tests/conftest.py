"""Shared fixtures: a private data dir per test session, so tests never touch ./data."""

from __future__ import annotations

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="voiceclaw-test-")
os.environ.setdefault("VOICECLAW_DATA_DIR", _tmp)
# A stray OPENAI_BASE_URL must never redirect our clients (they take explicit URLs).
os.environ["OPENAI_BASE_URL"] = "http://127.0.0.1:9/never-used"
# ...but share the models assembled by `make setup` (copying 150 MB per run is waste).
os.environ.setdefault("VOICECLAW_MODEL_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "models"))
