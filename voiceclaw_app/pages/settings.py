"""``/settings``: one field per setting name (ids = setting names), presets, keys, tests, preview.

Every user sees their own voice preferences (``USER_PREF_FIELDS``); the rest (providers,
addresses, keys, presets, connection tests) only an admin sees and can save.
"""

import reflex as rx

from ..components.layout import page
from ..config import STT_PROVIDERS, TTS_PROVIDERS, USER_PREF_FIELDS
from ..states.settings import KEY_NAMES, SettingsState

CHOICES = {
    "llm_history_mode": ["auto", "server", "client"],
    "stt_provider": list(STT_PROVIDERS),
    "tts_provider": list(TTS_PROVIDERS),
    "input_mode": ["hands_free", "push_to_talk"],
    "turn_detection": ["smart_turn", "silence"],
    "speculative": ["on", "off"],
    "fallback_to_local": ["on", "off"],
}

FIELDS = [
    ("Assistant", [
        ("assistant_name", "Assistant name", "text", ""),
        ("system_prompt", "Voice-mode system prompt", "textarea", "Short prompts answer faster."),
    ]),
    ("Language model", [
        ("llm_base_url", "LLM base URL", "text", "Empty: the embedded local model. Gateway: http://gateway:18789/v1"),
        ("llm_model_voice", "Model for voice", "text", "Gateway: openclaw:<agentId> (a lean 'voice' agent)"),
        ("llm_model_text", "Model for typed, muted turns", "text", ""),
        ("llm_headers", "Extra headers (JSON)", "text", 'e.g. {"x-openclaw-agent-id": "voice"}'),
        ("llm_history_mode", "History kept by", "select", "auto: server for gateway models (openclaw:<id>), client otherwise; server: the gateway keeps it (sends `user`); client: sent each turn"),
        ("llm_history_turns", "History turns sent", "number", ""),
        ("llm_read_timeout_s", "First-token timeout (s)", "number", ""),
    ]),
    ("Speech", [
        ("stt_provider", "Speech-to-text", "select", ""),
        ("stt_language", "Language", "text", ""),
        ("tts_provider", "Text-to-speech", "select", ""),
        ("tts_model", "TTS model", "text", "openai: tts-1 / gpt-4o-mini-tts (retiring 2027-01-06); deepgram: aura-2-thalia-en; openai-realtime: gpt-realtime-2.1-mini"),
        ("tts_voice", "Voice", "text", "Empty: the provider's default"),
        ("tts_speed", "Speed", "number", "0.25-4.0"),
        ("first_chunk_min_words", "Words before the first spoken chunk", "number", ""),
        ("tts_parallel", "Parallel syntheses", "number", ""),
        ("max_spoken_chars", "Longest spoken reply (characters)", "number", "The rest stays on screen"),
    ]),
    ("Turn taking", [
        ("input_mode", "Input mode", "select", ""),
        ("turn_detection", "End of turn", "select", "smart_turn: a model hears whether the sentence is finished; silence: a fixed wait"),
        ("turn_max_wait_ms", "Longest wait at an unfinished sentence (ms)", "number", "smart_turn only"),
        ("vad_silence_ms", "Silence that ends a turn (ms)", "number", "silence mode"),
        ("vad_min_speech_ms", "Minimum speech (ms)", "number", ""),
        ("eot_threshold", "Flux end-of-turn confidence", "number", "deepgram-flux: 0.5-0.9"),
        ("eager_eot_threshold", "Flux early-start confidence", "number", "0: off; else 0.3-0.9, not above the end-of-turn confidence"),
        ("eot_timeout_ms", "Flux end-of-turn timeout (ms)", "number", "500-10000"),
        ("max_utterance_s", "Longest utterance (s)", "number", ""),
        ("speculative", "Start work at a short pause", "select", ""),
        ("fallback_to_local", "Fall back to the embedded engines", "select", ""),
    ]),
]

KEY_LABELS = {"llm_api_key": "LLM / gateway token", "deepgram_api_key": "Deepgram API key", "openai_api_key": "OpenAI API key (TTS)"}


def field_input(name: str, kind: str) -> rx.Component:
    # the form's current values are kept in state (preview and tests use them unsaved):
    # selects on change, text when the field loses focus (not the whole form per keystroke)
    common = dict(name=name, id=name, default_value=SettingsState.values[name])
    on_blur = dict(on_blur=lambda v: SettingsState.set_field(name, v))
    if kind == "textarea":
        return rx.el.textarea(rows=4, style={"width": "100%"}, **common, **on_blur)
    if kind == "select":
        return rx.el.select(*[rx.el.option(c, value=c) for c in CHOICES[name]], on_change=lambda v: SettingsState.set_field(name, v), **common)
    common.update(on_blur)
    if kind == "number":
        return rx.el.input(type="text", inputmode="decimal", style={"width": "10em"}, **common)
    return rx.el.input(type="text", style={"width": "100%"}, **common)


def field_row(name: str, label: str, kind: str, hint: str) -> rx.Component:
    return rx.box(
        rx.el.label(label, html_for=name, style={"fontWeight": 600, "display": "block"}),
        field_input(name, kind),
        rx.cond(hint != "", rx.text(hint, size="1", color="gray")),
        rx.cond(SettingsState.errors.contains(name), rx.text(SettingsState.errors[name], id=f"error-{name}", color="red", size="2", class_name="vc-field-error")),
        margin_y="0.5em",
    )


def key_row(name: str) -> rx.Component:
    return rx.box(
        rx.el.label(KEY_LABELS[name], html_for=name, style={"fontWeight": 600, "display": "block"}),
        rx.hstack(
            rx.el.input(type="password", name=name, id=name, autocomplete="off", placeholder="enter a new key to replace", default_value=""),
            rx.badge(SettingsState.key_status[name], id=f"key-status-{name}"),
            rx.button("Remove", type="button", size="1", variant="soft", on_click=SettingsState.clear_key(name)),
            align="center",
        ),
        margin_y="0.5em",
    )


def test_row(provider: str, label: str) -> rx.Component:
    return rx.hstack(
        rx.button(f"Test {label}", type="button", id=f"test-{provider}", variant="soft", on_click=SettingsState.test_connection(provider)),
        rx.text(SettingsState.test_results.get(provider, ""), id=f"test-result-{provider}", size="2"),
        align="center",
    )


def _admin_only(c: rx.Component) -> rx.Component:
    return rx.cond(SettingsState.is_admin, c)


def _section(title: str, fields: list) -> rx.Component:
    rows = [field_row(*f) if f[0] in USER_PREF_FIELDS else _admin_only(field_row(*f)) for f in fields]
    heading = rx.heading(title, size="3", margin_top="1em")
    if not any(f[0] in USER_PREF_FIELDS for f in fields):
        heading = _admin_only(heading)
    return rx.box(heading, *rows)


def settings_page() -> rx.Component:
    sections = [_section(title, fields) for title, fields in FIELDS]
    return page(
        rx.cond(
            SettingsState.is_admin,
            rx.fragment(),
            rx.text("Your own voice preferences. The providers and keys are set by an admin.", id="settings-user-note", size="2", color="gray", margin_top="1em"),
        ),
        _admin_only(rx.hstack(
            rx.text("Preset:", weight="bold"),
            rx.button("Fastest", id="preset-fastest", variant="soft", on_click=SettingsState.apply_preset("fastest")),
            rx.button("Balanced", id="preset-balanced", variant="soft", on_click=SettingsState.apply_preset("balanced")),
            rx.button("Best quality", id="preset-best_quality", variant="soft", on_click=SettingsState.apply_preset("best_quality")),
            align="center",
            margin_top="1em",
        )),
        rx.cond(SettingsState.message != "", rx.callout(SettingsState.message, id="settings-message", margin_top="0.8em")),
        rx.cond(SettingsState.tts_warning != "", rx.callout(SettingsState.tts_warning, id="tts-retiring-warning", color_scheme="orange", margin_top="0.8em")),
        rx.form(
            *sections,
            _admin_only(rx.box(
                rx.heading("API keys", size="3", margin_top="1em"),
                rx.text("Keys are stored encrypted on the server and never shown again: only set / not set. "
                        "A key is sent only to the address it was saved for: after changing an address, enter its key again.", size="1", color="gray"),
                *[key_row(k) for k in KEY_NAMES],
            )),
            rx.button("Save", type="submit", id="save-settings", size="3", margin_top="1em"),
            on_submit=SettingsState.save,
            reset_on_submit=False,
            key=SettingsState.form_version.to_string(),
            id="settings-form",
        ),
        _admin_only(rx.box(
            rx.heading("Connections", size="3", margin_top="1.5em"),
            rx.vstack(test_row("llm", "LLM"), test_row("stt", "speech-to-text"), test_row("tts", "text-to-speech")),
        )),
        rx.heading("Voice preview", size="3", margin_top="1.5em"),
        rx.hstack(
            rx.button("Preview voice", id="preview-voice", variant="soft", on_click=SettingsState.preview_voice),
            rx.cond(SettingsState.preview_url != "", rx.el.audio(src=SettingsState.preview_url, auto_play=True, controls=True, id="preview-audio")),
            rx.cond(SettingsState.preview_error != "", rx.text(SettingsState.preview_error, color="red", size="2")),
            align="center",
        ),
        title="Settings",
    )
