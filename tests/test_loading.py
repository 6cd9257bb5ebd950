"""Checkpoint resolution, vetting, fingerprinting and loading, on real tiny pipelines and real filesystems."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from memray.models.loading import (
    CheckpointError,
    load_component,
    model_fingerprint,
    model_label,
    model_slug,
    pipeline_class_name,
    require_safe_weights,
    resolve_checkpoint,
)
from memray.models.tiny import build_tiny_ddpm, build_tiny_sd

UNET_WEIGHTS = Path("unet/diffusion_pytorch_model.safetensors")
TEXT_ENCODER_WEIGHTS = Path("text_encoder/model.safetensors")


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny") / "sd")


@pytest.fixture
def sd_copy(sd_dir, tmp_path) -> Path:
    """A private copy of the tiny pipeline that a test may modify."""
    return Path(shutil.copytree(sd_dir, tmp_path / "sd-copy"))


@pytest.fixture
def memory_url(sd_dir):
    """The tiny pipeline uploaded to fsspec's in-process memory filesystem, removed afterwards."""
    url = f"memory://ckpt-{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    fs.put(str(sd_dir), url, recursive=True)
    yield url
    if fs.exists(url):
        fs.rm(url, recursive=True)


def pickle_component(checkpoint: Path, weights: Path, pickle_name: str) -> None:
    """Rewrite one component's safetensors weights as a torch pickle, as old checkpoints ship them."""
    safetensors_file = checkpoint / weights
    torch.save(load_file(safetensors_file), safetensors_file.with_name(pickle_name))
    safetensors_file.unlink()


def test_local_directory_resolves_to_itself(sd_dir):
    assert resolve_checkpoint(str(sd_dir)) == sd_dir


def test_file_url_resolves_to_the_directory_without_copying(sd_dir, tmp_path):
    resolved = resolve_checkpoint(sd_dir.as_uri(), cache_dir=tmp_path / "cache")
    assert resolved == sd_dir
    assert not (tmp_path / "cache").exists()


def test_remote_url_is_copied_into_the_cache_and_loads(memory_url, tmp_path):
    cache = tmp_path / "cache"
    resolved = resolve_checkpoint(memory_url, cache_dir=cache)
    assert resolved.parent == cache
    assert (resolved / "model_index.json").is_file()
    # Only the finished copy is left: the temporary sibling was renamed into place.
    assert [p.name for p in cache.iterdir()] == [resolved.name]

    unet = load_component(resolved, "unet", UNet2DConditionModel, allow_pickle=False)
    assert isinstance(unet, UNet2DConditionModel)


def test_remote_url_reuses_the_cache_on_second_resolve(memory_url, tmp_path):
    cache = tmp_path / "cache"
    first = resolve_checkpoint(memory_url, cache_dir=cache)
    mtimes = {p: p.stat().st_mtime_ns for p in first.rglob("*")}
    fsspec.filesystem("memory").rm(memory_url, recursive=True)

    second = resolve_checkpoint(memory_url, cache_dir=cache)
    assert second == first
    assert {p: p.stat().st_mtime_ns for p in second.rglob("*")} == mtimes


def test_remote_cache_location_comes_from_memray_cache(memory_url, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMRAY_CACHE", str(tmp_path / "env-cache"))
    assert resolve_checkpoint(memory_url).parent == tmp_path / "env-cache"


def test_remote_url_copy_matches_the_source(sd_dir, memory_url, tmp_path):
    assert model_fingerprint(resolve_checkpoint(memory_url, cache_dir=tmp_path)) == model_fingerprint(sd_dir)


def test_remote_url_without_model_index_is_refused_before_copying(memory_url, tmp_path):
    fsspec.filesystem("memory").rm(f"{memory_url}/model_index.json")
    with pytest.raises(CheckpointError, match="model_index.json"):
        resolve_checkpoint(memory_url, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_missing_remote_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(f"memory://absent-{uuid.uuid4().hex}", cache_dir=tmp_path)


def test_missing_local_directory():
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint("/nonexistent/dir")


def test_directory_without_model_index(sd_copy):
    (sd_copy / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="model_index.json.*diffusers"):
        resolve_checkpoint(str(sd_copy))


def test_single_file_checkpoint_is_refused_with_a_hint(sd_dir):
    with pytest.raises(CheckpointError, match="single file"):
        resolve_checkpoint(str(sd_dir / UNET_WEIGHTS))


def test_safetensors_checkpoint_passes_the_pickle_check(sd_dir):
    require_safe_weights(sd_dir, allow_pickle=False)


def test_pickle_only_component_needs_allow_pickle(sd_copy):
    pickle_component(sd_copy, UNET_WEIGHTS, "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"'unet'.*diffusion_pytorch_model\.bin.*allow_pickle=True"):
        require_safe_weights(sd_copy, allow_pickle=False)

    require_safe_weights(sd_copy, allow_pickle=True)
    unet = load_component(sd_copy, "unet", UNet2DConditionModel, allow_pickle=True)
    reference = torch.load(sd_copy / "unet/diffusion_pytorch_model.bin")
    name, tensor = next(iter(reference.items()))
    assert torch.equal(unet.state_dict()[name], tensor)


def test_pickle_only_transformers_component_loads_with_allow_pickle(sd_copy):
    pickle_component(sd_copy, TEXT_ENCODER_WEIGHTS, "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="'text_encoder'"):
        require_safe_weights(sd_copy, allow_pickle=False)
    text_encoder = load_component(sd_copy, "text_encoder", CLIPTextModel, allow_pickle=True)
    assert isinstance(text_encoder, CLIPTextModel)


def test_allow_pickle_still_loads_safetensors_only_components(sd_dir):
    unet = load_component(sd_dir, "unet", UNet2DConditionModel, allow_pickle=True)
    text_encoder = load_component(sd_dir, "text_encoder", CLIPTextModel, allow_pickle=True)
    assert isinstance(unet, UNet2DConditionModel)
    assert isinstance(text_encoder, CLIPTextModel)


def test_loading_without_allow_pickle_refuses_pickles(sd_copy):
    pickle_component(sd_copy, UNET_WEIGHTS, "diffusion_pytorch_model.bin")
    with pytest.raises(OSError):
        load_component(sd_copy, "unet", UNet2DConditionModel, allow_pickle=False)


def test_fingerprint_is_stable_across_copies(sd_dir, sd_copy):
    assert model_fingerprint(sd_copy) == model_fingerprint(sd_dir)
    assert len(model_fingerprint(sd_dir)) == 64


def test_fingerprint_changes_when_one_weight_changes(sd_dir, sd_copy):
    weights = load_file(sd_copy / UNET_WEIGHTS)
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, sd_copy / UNET_WEIGHTS, metadata={"format": "pt"})
    assert model_fingerprint(sd_copy) != model_fingerprint(sd_dir)


def test_fingerprint_changes_when_a_config_changes(sd_dir, sd_copy):
    config = sd_copy / "scheduler/scheduler_config.json"
    config.write_text(config.read_text().replace('"epsilon"', '"v_prediction"'))
    assert model_fingerprint(sd_copy) != model_fingerprint(sd_dir)


@pytest.mark.parametrize(
    ("ref", "label"),
    [
        ("/ckpt/sd-v1-4/", "sd-v1-4"),
        ("s3://b/models/ckpt-0042", "ckpt-0042"),
        ("CompVis/stable-diffusion-v1-4", "stable-diffusion-v1-4"),
        ("memory://ckpt", "ckpt"),
        ("file:///data/My Model=v2", "my-model-v2"),
        ("gs://bucket/run/step_100.final/", "step_100.final"),
        ("./.hidden", "hidden"),
        ("/", "model"),
    ],
)
def test_model_slug_is_the_folder_name_then_the_fingerprint(ref, label):
    assert model_label(ref) == label
    assert model_slug(ref, "0123456789abcdef" * 4) == f"{label}-01234567"


def test_pipeline_class_name(sd_dir, tmp_path):
    assert pipeline_class_name(sd_dir) == "StableDiffusionPipeline"
    assert pipeline_class_name(build_tiny_ddpm(tmp_path / "ddpm")) == "DDPMPipeline"


def test_loaded_modules_are_frozen_and_in_eval_mode(sd_dir):
    for name, cls in [("unet", UNet2DConditionModel), ("vae", AutoencoderKL), ("text_encoder", CLIPTextModel)]:
        module = load_component(sd_dir, name, cls, allow_pickle=False)
        assert not module.training, name
        assert all(not p.requires_grad for p in module.parameters()), name


def test_non_module_components_load(sd_dir):
    tokenizer = load_component(sd_dir, "tokenizer", CLIPTokenizer, allow_pickle=False)
    scheduler = load_component(sd_dir, "scheduler", DDIMScheduler, allow_pickle=False)
    assert tokenizer("a red circle").input_ids
    assert scheduler.config.prediction_type == "epsilon"


def test_dtype_is_applied(sd_dir):
    unet = load_component(sd_dir, "unet", UNet2DConditionModel, allow_pickle=False, dtype=torch.bfloat16)
    text_encoder = load_component(sd_dir, "text_encoder", CLIPTextModel, allow_pickle=False, dtype=torch.bfloat16)
    assert {p.dtype for p in unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in text_encoder.parameters()} == {torch.bfloat16}


def test_missing_component_folder(sd_dir):
    with pytest.raises(CheckpointError, match="'controlnet'"):
        load_component(sd_dir, "controlnet", UNet2DConditionModel, allow_pickle=False)
