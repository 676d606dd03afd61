"""API keys: env vars as defaults, keys entered in the UI stored encrypted on disk.

Keys are never settings fields, never in Reflex state (it is pickled to disk/Redis),
never logged and never sent back to the browser: the page only learns "set / not
set". A key typed on the settings page is encrypted with Fernet under a key derived
from the server secret (``VOICECLAW_SECRET``, else a random one generated once into
``<data_dir>/.secret`` with mode 0600) and written to ``<data_dir>/keys.enc``.

Each key is bound to the address it was saved for (the LLM base URL, the TTS base
URL, the Deepgram URL): :meth:`ProviderKeys.only_for` blanks every key whose address
is not the one a client is about to call, and the provider factory applies it to
every client it builds. So changing ``llm_base_url`` never sends the stored key to
the new address; the settings page asks for the key again. Keys from environment
variables are bound to the addresses from the environment.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from cryptography.fernet import Fernet, InvalidToken

from .config import data_dir

#: name -> env var that provides the default
KEY_ENV = {
    "llm_api_key": "VOICECLAW_LLM_API_KEY",
    "deepgram_api_key": "DEEPGRAM_API_KEY",
    "openai_api_key": "OPENAI_API_KEY",
}

#: name -> env var holding the address an environment key belongs to (and its default)
KEY_URL_ENV = {
    "llm_api_key": ("VOICECLAW_LLM_BASE_URL", ""),
    "deepgram_api_key": ("VOICECLAW_DEEPGRAM_URL", "https://api.deepgram.com"),
    "openai_api_key": ("VOICECLAW_TTS_BASE_URL", "https://api.openai.com/v1"),
}

_lock = threading.RLock()  # re-entrant: set() holds it while _read()/_fernet() take it again


class Secret(str):
    """A str that never shows its value in repr() or f-string debugging."""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return "Secret('***')" if self else "Secret('')"


def env_key_url(name: str) -> str:
    """The address from the environment that key ``name`` goes to (TTS and Deepgram
    addresses are set only by environment variables; their defaults are the real
    services, as in ``providers/openai_tts.py`` and ``providers/deepgram_stt.py``)."""
    url_env, default = KEY_URL_ENV[name]
    return os.environ.get(url_env, "").strip() or default


def normalize_url(url: str | None) -> str:
    """The form two addresses are compared in: trimmed, no trailing slash, scheme and
    host lower-cased (``HTTP://Gateway:18789/v1/`` is ``http://gateway:18789/v1``)."""
    u = (url or "").strip().rstrip("/")
    if "://" in u:
        scheme, rest = u.split("://", 1)
        host, sep, path = rest.partition("/")
        u = f"{scheme.lower()}://{host.lower()}{sep}{path}"
    return u


@dataclass(frozen=True)
class ProviderKeys:
    llm_api_key: Secret = Secret("")
    deepgram_api_key: Secret = Secret("")
    openai_api_key: Secret = Secret("")
    #: name -> the (normalized) address the key was saved for
    urls: Mapping[str, str] = field(default_factory=dict, compare=False)

    def status(self) -> dict[str, bool]:
        """What the page may know: whether each key is set."""
        return {name: bool(getattr(self, name)) for name in KEY_ENV}

    def bound_to(self, name: str, url: str) -> bool:
        """The key ``name`` is set and was saved for ``url``."""
        return bool(getattr(self, name)) and self.urls.get(name) == normalize_url(url)

    def only_for(self, targets: Mapping[str, str]) -> "ProviderKeys":
        """These keys with every key blanked whose saved address is not its target's
        (``targets``: name -> the address the client will call)."""
        kept = {name: (getattr(self, name) if self.bound_to(name, targets.get(name, "")) else Secret("")) for name in KEY_ENV}
        return ProviderKeys(**kept, urls=self.urls)


def server_secret(root: Path | None = None) -> bytes:
    """``VOICECLAW_SECRET``, else a random secret generated once into ``<data>/.secret``
    (mode 0600). Shared by every worker (same data dir); keys derived from it encrypt
    the key store and sign audio URLs."""
    secret = os.environ.get("VOICECLAW_SECRET", "").encode()
    if secret:
        return secret
    path = Path(root) if root is not None else data_dir()
    path = path / ".secret"
    with _lock:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.urlsafe_b64encode(os.urandom(32)))
    return path.read_bytes().strip()


def derived_key(purpose: str, root: Path | None = None) -> bytes:
    """A key for one purpose (e.g. ``"audio-url"``), cheap to derive (HMAC-SHA256)."""
    return hmac.new(server_secret(root), f"voiceclaw-{purpose}-v1".encode(), hashlib.sha256).digest()


def _fernet(root: Path) -> Fernet:
    key = hashlib.pbkdf2_hmac("sha256", server_secret(root), b"voiceclaw-keys-v1", 100_000)
    return Fernet(base64.urlsafe_b64encode(key))


class KeyStore:
    """Encrypted key file; env vars fill in what the file does not set."""

    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root is not None else data_dir()
        self.path = self.root / "keys.enc"

    def _read(self) -> dict[str, dict[str, str | None]]:
        """name -> {"value", "url"}; a key stored before keys were bound has url None."""
        if not self.path.exists():
            return {}
        try:
            raw = _fernet(self.root).decrypt(self.path.read_bytes())
            data = json.loads(raw)
        except (InvalidToken, ValueError):
            # Server secret changed or file damaged: fall back to env vars, say nothing secret.
            return {}
        out: dict[str, dict[str, str | None]] = {}
        for k, v in data.items():
            if k not in KEY_ENV:
                continue
            if isinstance(v, dict) and v.get("value"):
                out[k] = {"value": str(v["value"]), "url": normalize_url(v.get("url"))}
            elif isinstance(v, str) and v:
                out[k] = {"value": v, "url": None}
        return out

    def load(self) -> ProviderKeys:
        """Stored keys over env keys, each with the address it belongs to (an
        unbound legacy key has none, so :meth:`ProviderKeys.only_for` drops it until
        :meth:`bind_legacy` ran)."""
        stored = self._read()
        values: dict[str, Secret] = {}
        urls: dict[str, str] = {}
        for name, env in KEY_ENV.items():
            entry = stored.get(name)
            if entry is not None:
                values[name] = Secret(entry["value"] or "")
                if entry["url"] is not None:
                    urls[name] = entry["url"]
            else:
                values[name] = Secret(os.environ.get(env, ""))
                urls[name] = normalize_url(env_key_url(name))
        return ProviderKeys(**values, urls=urls)

    def set(self, name: str, value: str | None, url: str | None = None) -> None:
        """Store (or with an empty value, forget) a key entered in the UI, bound to
        ``url``: the address it will be sent to, and the only one."""
        if name not in KEY_ENV:
            raise KeyError(name)
        with _lock:
            data = self._read()
            if value:
                data[name] = {"value": value.strip(), "url": normalize_url(url)}
            else:
                data.pop(name, None)
            self._write(data)

    def bind_legacy(self, targets: Mapping[str, str]) -> int:
        """Keys stored before binding existed are bound to the addresses configured now
        (``targets``: name -> address); run once at startup. Returns how many."""
        with _lock:
            data = self._read()
            legacy = [k for k, v in data.items() if v["url"] is None]
            for k in legacy:
                data[k]["url"] = normalize_url(targets.get(k, ""))
            if legacy:
                self._write(data)
            return len(legacy)

    def _write(self, data: dict) -> None:
        token = _fernet(self.root).encrypt(json.dumps(data).encode())
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(token)
        os.replace(tmp, self.path)
