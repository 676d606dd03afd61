"""API keys: env vars as defaults, keys entered in the UI stored encrypted on disk.

Keys are never settings fields, never in Reflex state (it is pickled to disk/Redis),
never logged and never sent back to the browser: the page only learns "set / not
set". A key typed on the settings page is encrypted with Fernet under a key derived
from the server secret (``VOICECLAW_SECRET``, else a random one generated once into
``<data_dir>/.secret`` with mode 0600) and written to ``<data_dir>/keys.enc``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from .config import data_dir

#: name -> env var that provides the default
KEY_ENV = {
    "llm_api_key": "VOICECLAW_LLM_API_KEY",
    "deepgram_api_key": "DEEPGRAM_API_KEY",
    "openai_api_key": "OPENAI_API_KEY",
}

_lock = threading.RLock()  # re-entrant: set() holds it while _read()/_fernet() take it again


class Secret(str):
    """A str that never shows its value in repr() or f-string debugging."""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return "Secret('***')" if self else "Secret('')"


@dataclass(frozen=True)
class ProviderKeys:
    llm_api_key: Secret = Secret("")
    deepgram_api_key: Secret = Secret("")
    openai_api_key: Secret = Secret("")

    def status(self) -> dict[str, bool]:
        """What the page may know: whether each key is set."""
        return {name: bool(getattr(self, name)) for name in KEY_ENV}


def _fernet(root: Path) -> Fernet:
    secret = os.environ.get("VOICECLAW_SECRET", "").encode()
    if not secret:
        path = root / ".secret"
        with _lock:
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(base64.urlsafe_b64encode(os.urandom(32)))
        secret = path.read_bytes().strip()
    key = hashlib.pbkdf2_hmac("sha256", secret, b"voiceclaw-keys-v1", 100_000)
    return Fernet(base64.urlsafe_b64encode(key))


class KeyStore:
    """Encrypted key file; env vars fill in what the file does not set."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.path = self.root / "keys.enc"

    def _read(self) -> dict[str, str]:
        if not self.path.exists():
            return {}
        try:
            raw = _fernet(self.root).decrypt(self.path.read_bytes())
            data = json.loads(raw)
            return {k: str(v) for k, v in data.items() if k in KEY_ENV}
        except (InvalidToken, ValueError):
            # Server secret changed or file damaged: fall back to env vars, say nothing secret.
            return {}

    def load(self) -> ProviderKeys:
        stored = self._read()
        values = {name: Secret(stored.get(name) or os.environ.get(env, "")) for name, env in KEY_ENV.items()}
        return ProviderKeys(**values)

    def set(self, name: str, value: str | None) -> None:
        """Store (or with an empty value, forget) a key entered in the UI."""
        if name not in KEY_ENV:
            raise KeyError(name)
        with _lock:
            data = self._read()
            if value:
                data[name] = value.strip()
            else:
                data.pop(name, None)
            token = _fernet(self.root).encrypt(json.dumps(data).encode())
            tmp = self.path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(token)
            os.replace(tmp, self.path)
