"""PNG figures: generated replicas next to the target, and the two error distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    return ((pixels.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_image_row(images: list[torch.Tensor], path: str | Path, *, scale: int = 1) -> Path:
    """Save images (3, H, W) in [-1, 1] side by side, with a 2-pixel white gap, upscaled by `scale`."""
    tiles = [to_uint8(img) for img in images]
    h = max(t.shape[0] for t in tiles)
    gap = np.full((h, 2, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for t in tiles for part in (t, gap)][:-1], axis=1)
    image = Image.fromarray(row)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    image.save(path)
    return Path(path)


def save_error_distributions(
    err_uncond: np.ndarray, err_cond: np.ndarray, path: str | Path, *, title: str = ""
) -> Path:
    """Histogram of L(x0, eps, "") against L(x0, eps, e*) on the same noises (paper figure 14)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    bins = np.histogram_bin_edges(np.concatenate([err_uncond, err_cond]), bins=50)
    ax.hist(err_uncond, bins=bins, alpha=0.6, label='unconditional  L(x0, eps, "")')
    ax.hist(err_cond, bins=bins, alpha=0.6, label="inverted prompt  L(x0, eps, e*)")
    ax.set_xlabel("z0-prediction error")
    ax.set_ylabel("noises")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
