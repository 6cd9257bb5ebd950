"""PNG figures: replicas next to their target, the two error distributions, score distributions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from memray.data.images import image_row_png

UNCOND_LABEL = 'unconditional  L(x0, eps, "")'
COND_LABEL = "inverted prompt  L(x0, eps, e*)"


def save_image_row(images: list[torch.Tensor], path: str | Path, *, scale: int = 1) -> Path:
    """Save images (3, H, W) in [-1, 1] side by side, with a 2-pixel white gap, upscaled by `scale`."""
    path = Path(path)
    path.write_bytes(image_row_png(images, height=max(img.shape[-2] for img in images) * scale))
    return path


def _figure(width: float, height: float) -> Figure:
    """A matplotlib Figure with no pyplot state, so plots are safe in any process or thread."""
    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def error_histogram_png(err_uncond: np.ndarray, err_cond: np.ndarray, *, title: str = "") -> bytes:
    """Histogram of L(x0, eps, "") against L(x0, eps, e*) on the same noises (paper figure 14), as PNG."""
    fig = _figure(6, 3.5)
    ax = fig.subplots()
    bins = np.histogram_bin_edges(np.concatenate([err_uncond, err_cond]), bins=50)
    ax.hist(err_uncond, bins=bins, alpha=0.6, label=UNCOND_LABEL)
    ax.hist(err_cond, bins=bins, alpha=0.6, label=COND_LABEL)
    ax.set_xlabel("z0-prediction error")
    ax.set_ylabel("noises")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _png(fig)


def save_error_distributions(
    err_uncond: np.ndarray, err_cond: np.ndarray, path: str | Path, *, title: str = ""
) -> Path:
    """Save the figure-14 histogram of the two error distributions to `path`."""
    path = Path(path)
    path.write_bytes(error_histogram_png(err_uncond, err_cond, title=title))
    return path


def error_cdfs_png(uncond_quantiles: list[float], cond_quantiles: list[float], *, title: str = "") -> bytes:
    """The two error distributions of figure 14 as step CDFs drawn through their stored quantiles, as PNG."""
    fig = _figure(6.4, 3.4)
    ax = fig.subplots()
    for quantiles, label in [(uncond_quantiles, UNCOND_LABEL), (cond_quantiles, COND_LABEL)]:
        ax.step(quantiles, np.linspace(0, 1, len(quantiles)), where="post", label=label)
    ax.set_xlabel("z0-prediction error")
    ax.set_ylabel("fraction of noises")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _png(fig)


def score_distributions_png(
    kl: list[float],
    censored: int,
    shift_sd: list[float],
    *,
    kl_range: tuple[float, float] | None = None,
    shift_range: tuple[float, float] | None = None,
) -> bytes:
    """One checkpoint's InvMM KL histogram, its censored count as a bar of its own, and its shift histogram."""
    fig = _figure(9, 2.6)
    kl_ax, censored_ax, shift_ax = fig.subplots(1, 3, width_ratios=[4, 1, 4])
    _histogram(kl_ax, kl, kl_range, "InvMM KL (lower = more memorized)", "no image replicated")
    # Censored images have no KL at all: a bar beside the histogram, never a fake value inside it.
    censored_ax.bar([0], [censored], color="0.6", width=0.6)
    censored_ax.set_xticks([0], ["never\nreplicated"], fontsize=8)
    censored_ax.set_xlim(-0.6, 0.6)
    censored_ax.bar_label(censored_ax.containers[0], fontsize=8)
    censored_ax.set_ylim(0, max(1, censored) * 1.2)
    censored_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    censored_ax.tick_params(labelsize=8)
    _histogram(shift_ax, shift_sd, shift_range, "Wasserstein shift (sd)", "no Wasserstein measure")
    return _png(fig)


def _histogram(ax, values: list[float], value_range, xlabel: str, empty: str) -> None:
    if values:
        ax.hist(values, bins=30, range=value_range, color="#3b6ea8")
        ax.xaxis.set_major_locator(MaxNLocator(5))  # tick labels of a narrow range never collide
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts of images
    else:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel("images", fontsize=9)
    ax.tick_params(labelsize=8)
