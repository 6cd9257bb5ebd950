"""Shared fixtures: tiny real checkpoints saved with save_pretrained and loaded back through load_model."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from memray.models import load_model
from memray.models.tiny import build_tiny_ddpm, build_tiny_sd


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


def png_bytes(seed: int, size=(40, 48), mode="RGB") -> bytes:
    """A deterministic noisy PNG image, encoded."""
    rs = np.random.RandomState(seed)
    array = (rs.rand(size[0], size[1], 3) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, "PNG")
    return buffer.getvalue()
