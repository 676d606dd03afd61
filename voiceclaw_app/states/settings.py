"""Settings page state: the form, validation messages, key status, tests, preview.

API keys never enter this state (it is pickled to disk/Redis): a key typed in the
form goes straight from the submit event to the encrypted key store, and the page
only learns "set / not set / saved for another address".

Roles: every user saves their own voice preferences (``USER_PREF_FIELDS``); only an
admin saves the rest (providers, addresses, prompt: the global row), keys, presets,
and runs the connection tests. A key is stored bound to the address it is for; after
the address changes the page asks for the key again.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any
from urllib.parse import urlparse

import reflex as rx

from ..config import PRESETS, USER_PREF_FIELDS, SettingsError, VoiceSettings, retiring_tts_warning
from ..db import repo
from ..providers.factory import key_targets
from ..secrets import KEY_ENV, ProviderKeys
from . import services
from ..server.auth import sign_stored_url
from .auth import require_admin, require_user

KEY_NAMES = list(KEY_ENV)


def to_form(settings: VoiceSettings) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in settings.to_dict().items():
        if isinstance(v, bool):
            out[k] = "on" if v else "off"
        elif isinstance(v, dict):
            out[k] = json.dumps(v) if v else ""
        else:
            out[k] = str(v)
    return out


class SettingsState(rx.State):
    values: dict[str, str] = {}
    errors: dict[str, str] = {}
    message: str = ""
    key_status: dict[str, str] = {}
    test_results: dict[str, str] = {}
    form_version: int = 0
    preview_url: str = ""
    preview_error: str = ""
    #: the page shows provider fields, keys, presets and tests only to admins
    is_admin: bool = False

    @rx.var
    def tts_warning(self) -> str:
        """The retiring-model warning for the TTS provider and model the form shows."""
        return retiring_tts_warning(self.values.get("tts_provider", ""), self.values.get("tts_model", "")) or ""

    async def _reload(self, user) -> None:
        settings = await asyncio.to_thread(repo.load_settings, user.id)
        self.is_admin = user.is_admin
        self.values = to_form(settings) if user.is_admin else {k: v for k, v in to_form(settings).items() if k in USER_PREF_FIELDS}
        if user.is_admin:
            keys = await asyncio.to_thread(services.key_store().load)
            self.key_status = key_status(keys, settings)
        else:
            self.key_status = {}
        self.form_version += 1

    @rx.event
    async def on_load(self):
        user = await require_user(self)
        if user is None:
            return
        self.errors = {}
        self.message = ""
        await self._reload(user)

    @rx.event
    async def save(self, form: dict):
        user = await require_user(self)
        if user is None:
            return
        form = dict(form or {}) if isinstance(form, dict) else {}
        keys = {k: str(form.pop(k, "") or "").strip() for k in KEY_NAMES}
        if user.is_admin:
            for k in ("speculative", "fallback_to_local"):
                form[k] = "on" if form.get(k) in ("on", True, "true") else "off"
        else:  # a user saves only their own voice preferences
            form = {k: v for k, v in form.items() if k in USER_PREF_FIELDS}
            keys = {}
        current = await asyncio.to_thread(repo.load_settings, user.id)
        try:
            settings = VoiceSettings.from_dict(form, base=current)
        except SettingsError as exc:
            self.errors = dict(exc.errors)
            self.message = f"Not saved: {len(exc.errors)} field(s) need attention."
            return
        if user.is_admin:
            await asyncio.to_thread(repo.save_settings, settings)
            # a provider switched to an embedded engine warms it now, not at the next turn
            await asyncio.to_thread(services.start_engine_warmup, settings)
        await asyncio.to_thread(repo.save_user_prefs, user.id, settings)
        store = services.key_store()
        targets = key_targets(settings)
        for name, value in keys.items():
            if value:  # bound to the address it is for: it is never sent anywhere else
                await asyncio.to_thread(store.set, name, value, targets[name])
        self.errors = {}
        self.message = "Saved. The next turn uses these settings."
        if user.is_admin:
            stale = [n for n, st in key_status(await asyncio.to_thread(store.load), settings).items() if st == KEY_ELSEWHERE]
            if stale:
                self.message += " The address changed: enter the key again for " + ", ".join(n.replace("_", " ") for n in stale) + " (a key is only sent to the address it was saved for)."
        await self._reload(user)

    @rx.event
    async def set_field(self, name: str, value: str):
        """A form field changed (not saved): preview and connection tests use it.
        Key fields never come here (keys go from the submit straight to the key store)."""
        if await require_user(self) is None:
            return
        if not isinstance(name, str) or name in KEY_NAMES or name not in self.values:
            return
        self.values = {**self.values, name: str(value if value is not None else "")}

    async def _form_settings(self, user_id: int) -> VoiceSettings | None:
        """(background handlers) The settings as the form shows them now (unsaved),
        or None with the field messages set."""
        async with self:
            values = dict(self.values)
        current = await asyncio.to_thread(repo.load_settings, user_id)
        try:
            return form_settings(values, current)
        except SettingsError as exc:
            async with self:
                self.errors = dict(exc.errors)
            return None

    @rx.event
    async def apply_preset(self, name: str):
        user = await require_admin(self)
        if user is None or name not in PRESETS:
            return
        current = await asyncio.to_thread(repo.load_settings, user.id)
        try:
            settings = VoiceSettings.from_dict(PRESETS[name], base=current)
        except SettingsError as exc:
            self.errors = dict(exc.errors)
            return
        await asyncio.to_thread(repo.save_settings, settings)
        await asyncio.to_thread(repo.save_user_prefs, user.id, settings)
        self.errors = {}
        self.message = f"Preset '{name.replace('_', ' ')}' applied and saved."
        await self._reload(user)

    @rx.event
    async def clear_key(self, name: str):
        user = await require_admin(self)
        if user is not None and name in KEY_NAMES:
            await asyncio.to_thread(services.key_store().set, name, None)
            self.message = "Key removed (an environment variable may still provide one)."
            await self._reload(user)

    @rx.event(background=True)
    async def test_connection(self, provider: str):
        user = await require_admin(self)  # the tests use the stored keys
        if user is None:
            return
        async with self:
            self.test_results = {**self.test_results, provider: "testing…"}
        settings = await self._form_settings(user.id)
        if settings is None:
            async with self:
                self.test_results = {**self.test_results, provider: "Failed: fix the fields marked in the form first."}
            return
        result = await _test_provider(provider, settings)
        async with self:
            self.test_results = {**self.test_results, provider: result}

    @rx.event(background=True)
    async def preview_voice(self):
        user = await require_user(self)
        if user is None:
            return
        async with self:
            self.preview_error = ""
            self.preview_url = ""
        settings = await self._form_settings(user.id)
        if settings is None:
            async with self:
                self.preview_error = "Fix the fields marked in the form first."
            return
        try:
            url = await _preview(settings, user.id)
        except Exception as exc:
            async with self:
                self.preview_error = getattr(exc, "user_message", None) or f"Preview failed: {exc}"
            return
        async with self:
            self.preview_url = url


async def _tcp_connect_ms(url: str) -> float:
    p = urlparse(url)
    host = p.hostname or "localhost"
    port = p.port or (443 if p.scheme == "https" else 80)
    t0 = time.perf_counter()
    _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=p.scheme == "https"), timeout=5)
    writer.close()
    return (time.perf_counter() - t0) * 1000


def form_settings(values: dict[str, str], base: VoiceSettings) -> VoiceSettings:
    """The form's current (unsaved) values over the saved settings; raises SettingsError."""
    form = {k: v for k, v in (values or {}).items() if k not in KEY_NAMES}
    for k in ("speculative", "fallback_to_local"):
        if k in form:
            form[k] = "on" if form[k] in ("on", True, "true") else "off"
    return VoiceSettings.from_dict(form, base=base)


async def _test_provider(provider: str, settings: VoiceSettings | None = None) -> str:
    """The "test connection" buttons: reachability, key, connect and first-token times
    (the same checks as ``python -m voiceclaw_app.cli doctor``), for the form's
    current values (``settings``; default: the saved ones). Keys stay server-side."""
    from ..pipeline.diagnostics import check_llm, check_tts
    from ..providers import factory
    from ..providers.base import ProviderError

    if settings is None:
        settings = await services.load_settings()
    keys, note = await _keys_for(settings)
    try:
        if provider == "llm" and note:
            return f"Not tested: {note}"
        if provider in ("llm", "tts"):
            if provider == "llm":
                llm = await asyncio.to_thread(factory.build_llm, settings, keys)
                result = await check_llm(llm, settings.llm_model_voice, timeout_s=min(30, settings.llm_read_timeout_s), headers=settings.llm_headers)
            else:
                tts = await asyncio.to_thread(factory.build_tts, settings, keys)
                result = await check_tts(getattr(tts, "primary", tts), settings.tts_voice, settings.tts_speed)
            timing = f" (connect {result.connect_ms:.0f} ms)" if result.connect_ms is not None else ""
            return f"{'OK' if result.ok else 'Failed'}: {result.message}{timing}"
        if provider == "stt":
            if settings.stt_provider == "deepgram":
                import os

                url = os.environ.get("VOICECLAW_DEEPGRAM_URL", "https://api.deepgram.com")
                ms = await _tcp_connect_ms(url.replace("wss://", "https://").replace("ws://", "http://"))
                listener = await services.build_listener(settings)
                await listener.aclose()
                return f"OK: Deepgram reachable, connect {ms:.0f} ms, key {'set' if keys.deepgram_api_key else 'not set'}"
            listener = await services.build_listener(settings)
            await listener.aclose()
            return "OK: embedded speech recognition ready"
        return "Unknown provider."
    except ProviderError as exc:
        return f"Failed: {exc.user_message}"
    except (OSError, asyncio.TimeoutError) as exc:
        return f"Failed: not reachable ({type(exc).__name__})."
    except Exception as exc:
        return f"Failed: {type(exc).__name__}: {str(exc)[:200]}"


async def _keys_for(settings: VoiceSettings) -> tuple[ProviderKeys, str]:
    """The stored keys for a test with the form's (maybe unsaved) values, and a note
    when the LLM key belongs to another address. The factory drops such a key anyway
    (each key goes only to the address it was saved for); the note says why the
    test did not run instead of reporting the refusal of a keyless request."""
    keys = await asyncio.to_thread(services.key_store().load)
    target = settings.llm_base_url
    if keys.llm_api_key and not keys.bound_to("llm_api_key", target):
        return keys, "the stored API key is only sent to the address it was saved for: save the new address and enter the key again."
    return keys, ""


KEY_SET, KEY_UNSET, KEY_ELSEWHERE = "set", "not set", "saved for another address"


def key_status(keys: ProviderKeys, settings: VoiceSettings) -> dict[str, str]:
    """What the page may know of each key: set (for the address configured now), not
    set, or saved for another address (the address changed: enter it again)."""
    targets = key_targets(settings)
    out = {}
    for name, present in keys.status().items():
        if not present:
            out[name] = KEY_UNSET
        else:
            out[name] = KEY_SET if keys.bound_to(name, targets[name]) else KEY_ELSEWHERE
    return out


async def _preview(settings: VoiceSettings, user_id: int) -> str:
    from ..providers.base import CancelToken
    from ..providers import factory

    keys = await asyncio.to_thread(services.key_store().load)
    tts = await asyncio.to_thread(factory.build_tts, settings, keys)
    if tts is None:
        raise RuntimeError("Speech output is off (no TTS configured).")
    text = f"Hi, I'm {settings.assistant_name}. This is how I sound at this speed."
    clip = await tts.synthesize(text, voice=settings.tts_voice, speed=settings.tts_speed, cancel=CancelToken())
    stored = await asyncio.to_thread(services.audio_store().save, clip)
    return sign_stored_url(stored.url, user_id)
