"""Find, vet, fingerprint and load diffusers checkpoints, from local disk, any fsspec URL or the Hub.

Everything here runs at start-up, so failures are raised as `CheckpointError` with a message
that says what is wrong with the checkpoint and how to fix it, before any GPU work is scheduled.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shutil
import tempfile
from pathlib import Path

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem

from memray.errors import CheckpointError

MODEL_INDEX = "model_index.json"
DEFAULT_CACHE_DIR = Path("~/.cache/memray/checkpoints")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
FINGERPRINT_SUFFIXES = (*WEIGHT_SUFFIXES, ".json", ".txt")
CHUNK_BYTES = 1 << 20

# A diffusers repo keeps each component in its own folder. Restricting the download to those
# folders skips the multi-GB single-file checkpoint some repos also keep at the root, and the
# ignore list skips precision/EMA variants (name.fp16.safetensors) that load_component never reads.
HUB_ALLOW_PATTERNS = [MODEL_INDEX, "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
HUB_IGNORE_PATTERNS = ["*/*.*.safetensors"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# The demo model with planted memorization, shipped in the package (jobs/train_demo_model.py).
DEMO_REF = "demo"
DEMO_MODEL = Path(__file__).resolve().parents[1] / "demo_assets" / "model"

LAYOUT_HINT = (
    "A diffusers checkpoint is a directory written by `Pipeline.save_pretrained()`: a "
    "model_index.json at the top naming the pipeline class and its components, and one folder "
    "per component (unet/, vae/, text_encoder/, tokenizer/, scheduler/, ...) holding its "
    "config and weights."
)


def resolve_checkpoint(ref: str, *, cache_dir: str | Path | None = None) -> Path:
    """Return a local diffusers pipeline directory for a local path, fsspec URL, Hub repo id, or
    `demo` (the shipped demo model, unless a folder of that name is here)."""
    if ref == DEMO_REF and not Path(ref).exists():
        return _require_pipeline_dir(DEMO_MODEL, ref)
    if "://" in ref:
        fs, remote = fsspec.core.url_to_fs(ref)
        if isinstance(fs, LocalFileSystem):
            return _require_pipeline_dir(Path(remote), ref)
        return _cached_copy(fs, remote, ref, _cache_root(cache_dir))
    local = Path(ref).expanduser()
    if local.exists() or not HUB_ID.match(ref):
        return _require_pipeline_dir(local, ref)
    return _require_pipeline_dir(_hub_snapshot(ref), ref)


def _require_pipeline_dir(path: Path, ref: str) -> Path:
    if path.is_file():
        raise CheckpointError(
            f"{ref!r} is a single file, not a diffusers checkpoint directory; convert single-file "
            f"checkpoints with diffusers' `Pipeline.from_single_file(...).save_pretrained(dir)`. {LAYOUT_HINT}"
        )
    if not path.is_dir():
        raise CheckpointError(f"no such checkpoint directory: {ref!r}. {LAYOUT_HINT}")
    if not (path / MODEL_INDEX).is_file():
        raise CheckpointError(f"{ref!r} has no {MODEL_INDEX}, so it is not a diffusers pipeline. {LAYOUT_HINT}")
    return path


def _cache_root(cache_dir: str | Path | None) -> Path:
    root = cache_dir or os.environ.get("MEMRAY_CACHE") or DEFAULT_CACHE_DIR
    return Path(root).expanduser()


def _cached_copy(fs, remote: str, ref: str, cache_root: Path) -> Path:
    # Keyed by URL alone: a checkpoint that changes in place under the same URL is not re-fetched,
    # but model_fingerprint() hashes what was actually copied, so results are never mislabelled.
    target = cache_root / f"{model_label(ref)}-{hashlib.sha256(ref.encode()).hexdigest()[:16]}"
    if target.is_dir():
        return target
    root = remote.rstrip("/")
    if not fs.isdir(root):
        raise CheckpointError(f"no such checkpoint directory: {ref!r}. {LAYOUT_HINT}")
    if not fs.isfile(f"{root}/{MODEL_INDEX}"):
        raise CheckpointError(f"{ref!r} has no {MODEL_INDEX}, so it is not a diffusers pipeline. {LAYOUT_HINT}")
    cache_root.mkdir(parents=True, exist_ok=True)
    # Copy beside the target and rename when done: the rename is atomic, so `target` only ever
    # exists complete, and a crash leaves a dot-prefixed partial that is never mistaken for it.
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_root))
    try:
        for path in fs.find(root):
            local = partial / posixpath.relpath(path, root)
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(path, str(local))
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    try:
        os.rename(partial, target)
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        # Another process may have finished the same copy first; its result is as good as ours.
        if not target.is_dir():
            raise
    return target


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(repo_id=repo_id, allow_patterns=HUB_ALLOW_PATTERNS, ignore_patterns=HUB_IGNORE_PATTERNS)
        )
    except OSError as err:
        raise CheckpointError(
            f"{repo_id!r} is not a local directory and could not be fetched from the Hugging Face Hub: {err}"
        ) from err


def _read_model_index(path: Path) -> dict:
    try:
        index = json.loads((path / MODEL_INDEX).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"{path / MODEL_INDEX} is not readable JSON: {error}. {LAYOUT_HINT}") from error
    if not isinstance(index, dict):
        raise CheckpointError(f"{path / MODEL_INDEX} is not a JSON object. {LAYOUT_HINT}")
    return index


def pipeline_class_name(path: Path) -> str:
    """The diffusers pipeline class named in the checkpoint's model_index.json."""
    index = _read_model_index(path)
    if "_class_name" not in index:
        raise CheckpointError(f"{path / MODEL_INDEX} has no _class_name. {LAYOUT_HINT}")
    return index["_class_name"]


def component_class_name(path: Path, name: str) -> str | None:
    """The class model_index.json names for a component (None where the component is absent)."""
    entry = _read_model_index(path).get(name)
    if not (isinstance(entry, list) and len(entry) == 2):
        return None
    return entry[1]


def pipeline_setting(path: Path, key: str, default):
    """A pipeline option model_index.json records (e.g. SDXL's force_zeros_for_empty_prompt), or the default."""
    return _read_model_index(path).get(key, default)


def require_safe_weights(path: Path, *, allow_pickle: bool) -> None:
    """Refuse components whose only weights are pickles (unless pickle loading is explicitly allowed)
    and safetensors files whose header does not describe a whole file (truncated, corrupt)."""
    from safetensors import SafetensorError, safe_open

    for name in _read_model_index(path):
        folder = path / name
        if name.startswith("_") or not folder.is_dir():
            continue
        weights = [f for f in sorted(folder.rglob("*")) if f.suffix in WEIGHT_SUFFIXES and f.is_file()]
        for file in (f for f in weights if f.suffix == ".safetensors"):
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except (SafetensorError, OSError) as error:
                raise CheckpointError(f"{file} is not a whole safetensors file ({error}); copy it again") from error
        pickles = [f for f in weights if f.suffix in PICKLE_SUFFIXES]
        if not allow_pickle and pickles and len(pickles) == len(weights):
            raise CheckpointError(
                f"component {name!r} of {path} has only pickle weights ({pickles[0].name}); pickle "
                "checkpoints can execute arbitrary code when loaded. Convert them to safetensors, or "
                "pass allow_pickle=True (--allow-pickle on the command line) if you trust the source."
            )


def model_fingerprint(path: Path) -> str:
    """A sha256 over the content of the checkpoint's weights and configs, independent of where it lives."""
    files = [f for f in path.rglob("*") if f.suffix in FINGERPRINT_SUFFIXES and f.is_file()]
    digest = hashlib.sha256()
    for rel, file in sorted((f.relative_to(path).as_posix(), f) for f in files):
        digest.update(rel.encode() + b"\0" + _file_sha256(file))
    return digest.hexdigest()


def _file_sha256(file: Path) -> bytes:
    digest = hashlib.sha256()
    with file.open("rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.digest()


def model_label(ref: str) -> str:
    """The checkpoint's folder name, safe in file names and Hive partition values."""
    parts = [p for p in ref.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    label = re.sub(r"[^a-z0-9._-]", "-", parts[-1].lower()) if parts else ""
    # A leading dot would make the name a hidden file, which dataset readers silently skip.
    return label.lstrip(".") or "model"


def model_slug(ref: str, fingerprint: str) -> str:
    """The model's name in the catalog (the partition key): its folder name as a label, then the first
    8 hex digits of its fingerprint, which decide: two checkpoints in folders of the same name stay apart."""
    return f"{model_label(ref)}-{fingerprint[:8]}"


def load_component(path: Path, name: str, cls, *, allow_pickle: bool, dtype: torch.dtype | None = None):
    """Load one pipeline component from a local checkpoint, frozen and in eval mode for weight modules."""
    folder = path / name
    if not folder.is_dir():
        raise CheckpointError(f"{path} has no {name!r} component folder. {LAYOUT_HINT}")
    if not issubclass(cls, torch.nn.Module):
        # Tokenizers, schedulers and feature extractors carry no weights to vet or cast.
        return cls.from_pretrained(folder, local_files_only=True)
    # True refuses pickles outright; None prefers safetensors and falls back to pickles.
    # (False would make diffusers skip safetensors and fail on a safetensors-only folder.)
    safetensors_policy = None if allow_pickle else True
    dtype_kwargs = {"dtype": dtype} if dtype is not None else {}
    # transformers draws a bar per tensor loaded into every actor's log; memray shows its own progress
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=safetensors_policy, **dtype_kwargs)
    model.eval()
    model.requires_grad_(False)
    return model
