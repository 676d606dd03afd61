"""Voice-mode settings: one validated record, env vars as defaults.

This module is a leaf: the pipeline, the providers and the Reflex states all read
settings through :class:`VoiceSettings`, and it imports nothing of theirs. The
names are the contract in ``shared/docs/contracts.md``; the settings page has one
field per name and the database stores one row of them.

API keys are *not* settings: they live in :mod:`voiceclaw_app.secrets` so they never
travel with the settings record into Reflex state, logs or the browser.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

#: ``auto`` (the default): ``server`` for gateway models, ``client`` for any other
HistoryMode = Literal["auto", "server", "client"]
InputMode = Literal["push_to_talk", "hands_free"]
TurnDetection = Literal["smart_turn", "silence"]

DEFAULT_SYSTEM_PROMPT = (
    "You are Atlas, a personal AI assistant. Keep responses conversational and "
    "concise for voice: one to three short sentences, no lists or markdown."
)


STT_PROVIDERS = ("local", "deepgram", "deepgram-flux")
TTS_PROVIDERS = ("local", "openai", "deepgram", "openai-realtime")
#: the model a provider gets when ``VOICECLAW_TTS_MODEL`` is not set
DEFAULT_TTS_MODELS = {"openai": "gpt-4o-mini-tts", "deepgram": "aura-2-thalia-en", "openai-realtime": "gpt-realtime-2.1-mini"}
#: OpenAI's /v1/audio/speech models and the day they stop answering
RETIRING_TTS_MODELS = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
RETIREMENT_DATE = "2027-01-06"


def retiring_tts_warning(tts_provider: str, tts_model: str, base_url: str | None = None) -> str | None:
    """The one sentence ``doctor``, the settings page and the startup log show when the
    configured voice is an OpenAI speech model that shuts down on 2027-01-06; None otherwise.

    Only for OpenAI's own service: a compatible server (Kokoro, openedai-speech) that
    reuses the names keeps working. ``base_url`` defaults to ``VOICECLAW_TTS_BASE_URL``."""
    if tts_provider != "openai" or tts_model.strip() not in RETIRING_TTS_MODELS:
        return None
    base = base_url if base_url is not None else os.environ.get("VOICECLAW_TTS_BASE_URL", "")
    if base.strip() and "api.openai.com" not in base:
        return None
    return (f"The TTS model {tts_model.strip()!r} is retired by OpenAI on {RETIREMENT_DATE}: speech stops working then. "
            "Switch to VOICECLAW_TTS=openai-realtime (model gpt-realtime-2.1-mini, same OpenAI key) or "
            "VOICECLAW_TTS=deepgram (Aura, e.g. aura-2-thalia-en, with the Deepgram key), or point "
            "VOICECLAW_TTS_BASE_URL at a compatible speech server.")


class SettingsError(ValueError):
    """Raised with a per-field dict of messages a person can act on."""

    def __init__(self, errors: dict[str, str]):
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))


def data_dir() -> Path:
    """Where the database, audio and model caches live (``VOICECLAW_DATA_DIR``)."""
    path = Path(os.environ.get("VOICECLAW_DATA_DIR", "data")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


log = logging.getLogger("voiceclaw.config")


def is_gateway_model(model: str) -> bool:
    """OpenClaw gateway model names: ``openclaw``, ``openclaw:<id>``, ``openclaw/<id>``, ``agent:<id>``."""
    m = model.strip()
    return m == "openclaw" or m.startswith(("openclaw:", "openclaw/", "agent:"))


def _env(name: str, default: str) -> str:
    value = os.environ.get(name)
    return default if value is None or value.strip() == "" else value.strip()


def _parse_env_headers() -> tuple[dict[str, str], str | None]:
    """``VOICECLAW_LLM_HEADERS`` as headers, and why it is ignored (None when fine or unset)."""
    raw = os.environ.get("VOICECLAW_LLM_HEADERS", "").strip()
    if not raw:
        return {}, None
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError as exc:
        return {}, f"VOICECLAW_LLM_HEADERS is not valid JSON ({exc.msg} at character {exc.pos}), so no extra headers are sent; write a JSON object such as {{\"x-openclaw-agent-id\": \"voice\"}}."
    if not isinstance(parsed, dict):
        return {}, f"VOICECLAW_LLM_HEADERS must be a JSON object of header names to values (got a {type(parsed).__name__}), so no extra headers are sent."
    return {str(k): str(v) for k, v in parsed.items()}, None


def env_headers_problem() -> str | None:
    """Why ``VOICECLAW_LLM_HEADERS`` is ignored, in plain words; None when it is fine or unset."""
    return _parse_env_headers()[1]


def _env_headers() -> dict[str, str]:
    headers, problem = _parse_env_headers()
    if problem:
        log.warning("%s", problem)
    return headers


#: Settings each user chooses for themselves (stored per user, merged over the global
#: row by ``repo.load_settings(user_id)``); every other field is the admin's.
USER_PREF_FIELDS: tuple[str, ...] = ("tts_voice", "tts_speed", "input_mode", "stt_language", "vad_silence_ms", "max_spoken_chars")


@dataclass
class VoiceSettings:
    """Every voice-mode setting named in the contracts, with its validation rules."""

    assistant_name: str = "Atlas"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    llm_base_url: str = ""  # empty: the embedded local LLM
    llm_model_voice: str = ""
    llm_model_text: str = ""
    llm_headers: dict[str, str] = field(default_factory=dict)
    llm_history_mode: HistoryMode = "auto"
    llm_history_turns: int = 8
    llm_read_timeout_s: float = 30.0
    stt_provider: str = "local"  # local | deepgram | deepgram-flux
    stt_language: str = "en"
    #: Deepgram Flux's end of turn: confidence to end it (0.5-0.9), to start the reply
    #: early (``EagerEndOfTurn``; 0 = off, else 0.3-0.9 and <= eot_threshold), and the
    #: longest silence before it ends anyway
    eot_threshold: float = 0.7
    eager_eot_threshold: float = 0.5
    eot_timeout_ms: int = 5000
    tts_provider: str = "local"  # local | openai | deepgram | openai-realtime
    tts_model: str = "gpt-4o-mini-tts"
    tts_voice: str = ""
    tts_speed: float = 1.0
    first_chunk_min_words: int = 4
    tts_parallel: int = 2
    max_spoken_chars: int = 1200
    vad_silence_ms: int = 500
    vad_min_speech_ms: int = 200
    max_utterance_s: float = 30.0
    input_mode: InputMode = "hands_free"
    #: hands-free end of turn: ``smart_turn`` (a model judges each short pause, up to
    #: ``turn_max_wait_ms`` of silence) or ``silence`` (``vad_silence_ms`` of silence)
    turn_detection: TurnDetection = "smart_turn"
    turn_max_wait_ms: int = 2000
    speculative: bool = True
    fallback_to_local: bool = True

    # ---- construction -------------------------------------------------
    @classmethod
    def from_env(cls) -> "VoiceSettings":
        """Defaults for a deployment, from the ``VOICECLAW_*`` environment variables."""
        voice_model = _env("VOICECLAW_LLM_MODEL", "")
        base = _env("VOICECLAW_LLM_BASE_URL", "")
        s = cls(
            llm_base_url=base,
            llm_model_voice=voice_model,
            llm_model_text=_env("VOICECLAW_LLM_MODEL_TEXT", voice_model),
            llm_headers=_env_headers(),
            stt_provider=_env("VOICECLAW_STT", "local"),
            tts_provider=_env("VOICECLAW_TTS", "local"),
            tts_model=_env("VOICECLAW_TTS_MODEL", DEFAULT_TTS_MODELS.get(_env("VOICECLAW_TTS", "local"), "gpt-4o-mini-tts")),
            tts_voice=_env("VOICECLAW_TTS_VOICE", ""),
        )
        return s

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: "VoiceSettings | None" = None) -> "VoiceSettings":
        """Coerce and validate user input (strings from a form, JSON from the DB).

        Raises :class:`SettingsError` listing every bad field, so a form can show all
        messages at once rather than one per submit.
        """
        current = dataclasses.asdict(base or cls.from_env())
        errors: dict[str, str] = {}
        types = {f.name: f.type for f in fields(cls)}
        for key, raw in data.items():
            if key not in types:
                continue
            try:
                current[key] = _coerce(key, raw, current[key])
            except ValueError as exc:
                errors[key] = str(exc)
        settings = cls(**current)
        errors.update({k: v for k, v in settings.problems().items() if k not in errors})
        if errors:
            raise SettingsError(errors)
        return settings

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "VoiceSettings":
        return dataclasses.replace(self, **changes)

    # ---- validation ---------------------------------------------------
    def problems(self) -> dict[str, str]:
        """Per-field messages for values out of range; empty when valid."""
        p: dict[str, str] = {}
        if not self.assistant_name.strip():
            p["assistant_name"] = "Give the assistant a name."
        elif len(self.assistant_name) > 40:
            p["assistant_name"] = "Keep the name under 40 characters."
        if len(self.system_prompt) > 8000:
            p["system_prompt"] = "The voice prompt is over 8,000 characters; a short prompt answers faster."
        if self.llm_base_url and not self.llm_base_url.startswith(("http://", "https://")):
            p["llm_base_url"] = "The LLM base URL must start with http:// or https:// (e.g. http://gateway:18789/v1)."
        if self.llm_base_url and not self.llm_model_voice.strip():
            p["llm_model_voice"] = "Name the model to use with this endpoint (gateway: openclaw:<agentId>)."
        if self.llm_history_mode not in ("auto", "server", "client"):
            p["llm_history_mode"] = "History mode is 'auto', 'server' or 'client'."
        elif mismatch := self.history_mode_mismatch():
            p["llm_history_mode"] = mismatch
        if not 0 <= self.llm_history_turns <= 100:
            p["llm_history_turns"] = "History turns must be between 0 and 100."
        if not 1 <= self.llm_read_timeout_s <= 600:
            p["llm_read_timeout_s"] = "The read timeout must be between 1 and 600 seconds."
        if self.stt_provider not in STT_PROVIDERS:
            p["stt_provider"] = "Speech-to-text is 'local', 'deepgram' or 'deepgram-flux'."
        if not 0.5 <= self.eot_threshold <= 0.9:
            p["eot_threshold"] = "The end-of-turn confidence must be between 0.5 and 0.9."
        if self.eager_eot_threshold != 0 and not 0.3 <= self.eager_eot_threshold <= 0.9:
            p["eager_eot_threshold"] = "The early-start confidence is 0 (off) or between 0.3 and 0.9."
        elif self.eager_eot_threshold > self.eot_threshold:
            p["eager_eot_threshold"] = "The early-start confidence cannot be above the end-of-turn confidence."
        if not 500 <= self.eot_timeout_ms <= 10_000:
            p["eot_timeout_ms"] = "The end-of-turn timeout must be between 500 and 10,000 ms."
        if self.tts_provider not in TTS_PROVIDERS:
            p["tts_provider"] = "Text-to-speech is 'local', 'openai', 'deepgram' or 'openai-realtime'."
        if not 0.25 <= self.tts_speed <= 4.0:
            p["tts_speed"] = "Speech speed must be between 0.25 and 4.0."
        if not 1 <= self.first_chunk_min_words <= 30:
            p["first_chunk_min_words"] = "The first chunk needs between 1 and 30 words."
        if not 1 <= self.tts_parallel <= 8:
            p["tts_parallel"] = "Parallel syntheses must be between 1 and 8."
        if not 50 <= self.max_spoken_chars <= 100_000:
            p["max_spoken_chars"] = "The spoken length limit must be between 50 and 100,000 characters."
        if not 200 <= self.vad_silence_ms <= 5000:
            p["vad_silence_ms"] = "The end-of-turn silence must be between 200 and 5,000 ms."
        if not 0 <= self.vad_min_speech_ms <= 2000:
            p["vad_min_speech_ms"] = "The minimum speech length must be between 0 and 2,000 ms."
        if not 2 <= self.max_utterance_s <= 300:
            p["max_utterance_s"] = "The maximum utterance must be between 2 and 300 seconds."
        if self.input_mode not in ("push_to_talk", "hands_free"):
            p["input_mode"] = "Input mode is 'push_to_talk' or 'hands_free'."
        if self.turn_detection not in ("smart_turn", "silence"):
            p["turn_detection"] = "End of turn is 'smart_turn' (a model listens for a finished sentence) or 'silence' (a fixed wait)."
        if not 500 <= self.turn_max_wait_ms <= 10000:
            p["turn_max_wait_ms"] = "The longest wait at an unfinished sentence must be between 500 and 10,000 ms."
        return p

    # ---- derived ------------------------------------------------------
    @property
    def uses_local_llm(self) -> bool:
        return not self.llm_base_url.strip()

    def effective_history_mode(self, spoken: bool = True) -> str:
        """``server`` only for a gateway model (``openclaw``, ``openclaw:<id>``,
        ``openclaw/<id>``, ``agent:<id>``) unless the user chose ``client``; any other
        model (OpenAI, Ollama, the local LLM) gets the history from the app, even
        with ``server`` saved, or it would lose the history and the system prompt."""
        if self.uses_local_llm or not is_gateway_model(self.model_for(spoken)):
            return "client"
        return "client" if self.llm_history_mode == "client" else "server"

    def history_mode_mismatch(self) -> str | None:
        """A sentence when ``server`` is saved but a model in use is not a gateway model."""
        if self.llm_history_mode != "server":
            return None
        models = {self.model_for(True), self.model_for(False)}
        bad = sorted(m for m in models if self.uses_local_llm or not is_gateway_model(m))
        if not bad:
            return None
        what = "the built-in local model" if self.uses_local_llm else f"model {bad[0]!r}"
        return (f"History mode 'server' needs an OpenClaw gateway model (openclaw:<agentId>); {what} keeps no "
                "session, so the app sends the history itself (client). Choose 'auto' or 'client'.")

    def tts_retirement_warning(self) -> str | None:
        """See :func:`retiring_tts_warning` (this record's TTS provider and model)."""
        return retiring_tts_warning(self.tts_provider, self.tts_model)

    def model_for(self, spoken: bool) -> str:
        """Voice turns use the (faster) voice model; muted typed turns the text model."""
        if spoken or not self.llm_model_text.strip():
            return self.llm_model_voice
        return self.llm_model_text


def _coerce(key: str, raw: Any, current: Any) -> Any:
    """Turn a form or JSON value into the field's type, with a readable error."""
    if key == "llm_headers":
        if isinstance(raw, dict):
            value = raw
        else:
            text = str(raw or "").strip()
            if not text:
                return {}
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"Extra headers must be a JSON object, e.g. {{\"x-openclaw-agent-id\": \"voice\"}} ({exc.msg}).") from None
        if not isinstance(value, dict) or not all(isinstance(v, (str, int, float)) for v in value.values()):
            raise ValueError("Extra headers must be a JSON object of names to text values.")
        bad = [k for k in value if k.lower() in ("authorization", "content-length", "host")]
        if bad:
            raise ValueError(f"Header {bad[0]!r} cannot be set here (the API key has its own field).")
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(current, bool):
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError("Use on or off.")
    if isinstance(current, int):
        try:
            return int(float(str(raw).strip()))
        except ValueError:
            raise ValueError(f"{raw!r} is not a whole number.") from None
    if isinstance(current, float):
        try:
            value = float(str(raw).strip())
        except ValueError:
            raise ValueError(f"{raw!r} is not a number.") from None
        if value != value:  # NaN
            raise ValueError("Not a number.")
        return value
    if key == "llm_history_mode":
        return str(raw or "").strip().lower() or "auto"
    return str(raw if raw is not None else "").strip() if key != "system_prompt" else str(raw or "")


PRESETS: dict[str, dict[str, Any]] = {
    # The guide's "speed over quality?" question, answered as a switch.
    "fastest": {"first_chunk_min_words": 3, "tts_parallel": 3, "vad_silence_ms": 300, "speculative": True, "llm_history_turns": 4, "max_spoken_chars": 600},
    "balanced": {"first_chunk_min_words": 4, "tts_parallel": 2, "vad_silence_ms": 500, "speculative": True, "llm_history_turns": 8, "max_spoken_chars": 1200},
    "best_quality": {"first_chunk_min_words": 8, "tts_parallel": 2, "vad_silence_ms": 800, "speculative": False, "llm_history_turns": 20, "max_spoken_chars": 3000},
}
