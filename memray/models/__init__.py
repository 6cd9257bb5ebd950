"""Load a diffusers checkpoint into the adapter of its family."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memray.config import PRECISIONS
from memray.models.adapter import DiffusionAdapter, ModelCapabilityError, Prediction
from memray.models.loading import (
    CheckpointError,
    model_fingerprint,
    model_slug,
    pipeline_class_name,
    require_safe_weights,
    resolve_checkpoint,
)


@dataclass
class LoadedModel:
    """An adapter plus the identity of the checkpoint it came from."""

    adapter: DiffusionAdapter
    ref: str
    slug: str
    fingerprint: str
    # The model nulls of the configurations audited so far (memray.auditing.runner.model_null_bank)
    # and their UNet forwards: generated once per loaded model, shared by every batch.
    null_banks: dict = field(default_factory=dict, repr=False)
    null_bank_costs: dict = field(default_factory=dict, repr=False)


def load_model(
    ref: str,
    *,
    device: str | None = None,
    precision: str = "fp32",
    allow_pickle: bool = False,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Resolve `ref` (directory, fsspec URL or hub id), check its weights are safe, build its adapter."""
    from diffusers import SchedulerMixin

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if autocast_dtype(precision) is not None and torch.device(device).type == "cpu":
        raise ValueError(f"{precision} autocast is for GPUs; use precision='fp32' on CPU")
    path = resolve_checkpoint(ref, cache_dir=cache_dir)
    require_safe_weights(path, allow_pickle=allow_pickle)
    adapter = adapter_class(path).load(
        path,
        scheduler=_load_scheduler(path, SchedulerMixin),
        allow_pickle=allow_pickle,
        device=device,
        autocast_dtype=autocast_dtype(precision),
    )
    fingerprint = model_fingerprint(path)
    return LoadedModel(adapter=adapter, ref=ref, slug=model_slug(ref, fingerprint), fingerprint=fingerprint)


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype a precision (memray.config.PRECISIONS) autocasts the networks to; None for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return None if PRECISIONS[precision] is None else getattr(torch, PRECISIONS[precision])


def adapter_classes() -> tuple[type[DiffusionAdapter], ...]:
    """Every family memray supports, one adapter each."""
    from memray.models.ddpm import PixelDDPMAdapter
    from memray.models.ldm import LatentDiffusionAdapter
    from memray.models.sd import StableDiffusionAdapter
    from memray.models.sd3 import StableDiffusion3Adapter
    from memray.models.sdxl import StableDiffusionXLAdapter

    return (
        StableDiffusionAdapter,
        StableDiffusionXLAdapter,
        StableDiffusion3Adapter,
        LatentDiffusionAdapter,
        PixelDDPMAdapter,
    )


def supported_pipelines() -> list[str]:
    """The diffusers pipeline classes memray can audit."""
    return sorted(p for family in adapter_classes() for p in family.pipelines)


def adapter_class(path) -> type[DiffusionAdapter]:
    """The adapter family of a local checkpoint, from its pipeline class name (nothing is loaded)."""
    pipeline = pipeline_class_name(path)
    for family in adapter_classes():
        if pipeline in family.pipelines:
            return family
    raise CheckpointError(
        f"{path}: pipeline {pipeline!r} has no memray adapter yet; memray audits the pipelines "
        f"{', '.join(supported_pipelines())}"
    )


def _load_scheduler(path, scheduler_base):
    """The checkpoint's own scheduler class, looked up by name in diffusers (never arbitrary code)."""
    import json

    import diffusers

    config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    cls = getattr(diffusers, config.get("_class_name", ""), None)
    if not (isinstance(cls, type) and issubclass(cls, scheduler_base)):
        raise CheckpointError(f"{path}: unknown scheduler class {config.get('_class_name')!r}")
    return cls.from_pretrained(path / "scheduler")


__all__ = [
    "CheckpointError",
    "DiffusionAdapter",
    "adapter_class",
    "adapter_classes",
    "LoadedModel",
    "ModelCapabilityError",
    "Prediction",
    "load_model",
    "supported_pipelines",
]
