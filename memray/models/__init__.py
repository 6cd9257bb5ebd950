"""Load a diffusers checkpoint into the adapter of its family."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memray.models.adapter import DiffusionAdapter, ModelCapabilityError, Prediction
from memray.models.loading import (
    CheckpointError,
    load_component,
    model_fingerprint,
    model_slug,
    pipeline_class_name,
    require_safe_weights,
    resolve_checkpoint,
)

SD_PIPELINES = {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
DDPM_PIPELINES = {"DDPMPipeline", "DDIMPipeline"}
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    """An adapter plus the identity of the checkpoint it came from."""

    adapter: DiffusionAdapter
    ref: str
    slug: str
    fingerprint: str


def load_model(
    ref: str,
    *,
    device: str | None = None,
    precision: str = "fp32",
    allow_pickle: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Resolve `ref` (directory, fsspec URL or hub id), check its weights are safe, build its adapter."""
    from diffusers import AutoencoderKL, SchedulerMixin, UNet2DConditionModel, UNet2DModel
    from transformers import AutoTokenizer, CLIPTextModel

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    if PRECISIONS[precision] is not None and torch.device(device).type == "cpu":
        raise ValueError(f"{precision} autocast is for GPUs; use precision='fp32' on CPU")
    path = resolve_checkpoint(ref, cache_dir=cache_dir)
    require_safe_weights(path, allow_pickle=allow_pickle)
    pipeline = pipeline_class_name(path)
    scheduler = _load_scheduler(path, SchedulerMixin)
    common = dict(device=device, autocast_dtype=PRECISIONS[precision])
    if pipeline in SD_PIPELINES:
        from memray.models.sd import StableDiffusionAdapter

        adapter = StableDiffusionAdapter(
            unet=load_component(path, "unet", UNet2DConditionModel, allow_pickle=allow_pickle),
            vae=load_component(path, "vae", AutoencoderKL, allow_pickle=allow_pickle),
            text_encoder=load_component(path, "text_encoder", CLIPTextModel, allow_pickle=allow_pickle),
            tokenizer=load_component(path, "tokenizer", AutoTokenizer, allow_pickle=allow_pickle),
            scheduler=scheduler,
            **common,
        )
    elif pipeline in DDPM_PIPELINES:
        from memray.models.ddpm import PixelDDPMAdapter

        adapter = PixelDDPMAdapter(
            unet=load_component(path, "unet", UNet2DModel, allow_pickle=allow_pickle), scheduler=scheduler, **common
        )
    else:
        supported = sorted(SD_PIPELINES | DDPM_PIPELINES)
        raise CheckpointError(f"{ref}: pipeline {pipeline!r} has no memray adapter yet (supported: {supported})")
    return LoadedModel(adapter=adapter, ref=ref, slug=model_slug(ref), fingerprint=model_fingerprint(path))


def _load_scheduler(path, scheduler_base):
    """The checkpoint's own scheduler class, looked up by name in diffusers (never arbitrary code)."""
    import json

    import diffusers

    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, scheduler_base)):
        raise CheckpointError(f"{path}: unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_pretrained(path / "scheduler")


__all__ = ["CheckpointError", "DiffusionAdapter", "LoadedModel", "ModelCapabilityError", "Prediction", "load_model"]
