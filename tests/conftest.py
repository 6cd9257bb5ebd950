"""Shared fixtures: tiny real checkpoints saved with save_pretrained and loaded back through load_model."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from memray.config import AuditConfig, preset_config
from memray.models import load_model
from memray.models.tiny import build_tiny_ddpm, build_tiny_ldm, build_tiny_sd, build_tiny_sd3, build_tiny_sdxl


@pytest.fixture(scope="session", autouse=True)
def one_cpu_thread():
    """Tiny networks run fastest on one thread, and do not stall behind other processes' threads."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_budgets() -> AuditConfig:
    """The smoke preset: the smallest budgets that still run every step of every measure."""
    return preset_config("smoke")


def tiny_flags(**changes) -> list[str]:
    """Command-line flags that give tiny_budgets().replace(**changes): the same budgets for the CLI and jobs."""
    flags = ["--preset", "smoke"]
    for section, settings in changes.items():
        items = settings.items() if isinstance(settings, dict) else [(None, settings)]
        for key, value in items:
            flags += ["--set", f"{section if key is None else f'{section}.{key}'}={json.dumps(value)}"]
    return flags


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for a module's in-process runs (test_distributed's reaches its loopback S3 server)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny epsilon-prediction Stable Diffusion checkpoint directory."""
    return build_tiny_sd(tmp_path_factory.mktemp("ckpt") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """The tiny SD checkpoint loaded through the real loading path."""
    return load_model(str(tiny_sd_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_ddpm_dir(tmp_path_factory):
    """A tiny unconditional pixel DDPM checkpoint directory."""
    return build_tiny_ddpm(tmp_path_factory.mktemp("ckpt") / "tiny-ddpm")


@pytest.fixture(scope="session")
def tiny_ddpm(tiny_ddpm_dir):
    """The tiny DDPM checkpoint loaded through the real loading path."""
    return load_model(str(tiny_ddpm_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_family_dirs(tmp_path_factory):
    """Tiny checkpoint directories of the families beyond SD 1.x/2.x and pixel DDPM."""
    root = tmp_path_factory.mktemp("families")
    return {
        "ldm": build_tiny_ldm(root / "tiny-ldm"),
        "sdxl": build_tiny_sdxl(root / "tiny-sdxl"),
        "sd3": build_tiny_sd3(root / "tiny-sd3"),
    }


@pytest.fixture(scope="session")
def tiny_families(tiny_family_dirs):
    """Those checkpoints loaded through the real loading path, by family."""
    return {family: load_model(str(path), device="cpu") for family, path in tiny_family_dirs.items()}


def threshold_targets(model, similarity, z0: torch.Tensor):
    """Targets whose bar is the similarity's threshold alone (no nulls): checks decided by the threshold."""
    from memray.measures.similarity import Targets

    with torch.no_grad():
        features = similarity.features(model, z0)
    nan = torch.full((len(z0),), torch.nan, device=z0.device)
    return Targets(features, nan, nan, torch.full_like(nan, float(similarity.threshold)), nan)


def png_bytes(seed: int, size=(40, 48), mode="RGB") -> bytes:
    """A deterministic noisy PNG image, encoded."""
    rs = np.random.RandomState(seed)
    array = (rs.rand(size[0], size[1], 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()
