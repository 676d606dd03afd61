"""Shared fixtures: a private data dir per test session, so tests never touch ./data."""

from __future__ import annotations

import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="voiceclaw-test-")
os.environ.setdefault("VOICECLAW_DATA_DIR", _tmp)
# A stray OPENAI_BASE_URL must never redirect our clients (they take explicit URLs).
os.environ["OPENAI_BASE_URL"] = "http://127.0.0.1:9/never-used"
