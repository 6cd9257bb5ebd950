"""M4. The memorization measure M(x0) = W1( L(x0, eps, "") , L(x0, eps, e*) ), eps ~ N(0, I).

Both error distributions use the SAME noises (common random numbers), and W1 is the exact
1-D distance between the empirical distributions (not the paper's 2000-bin histogram).
Chebyshev: a shift of the conditional errors by k standard deviations of the unconditional
ones has probability at most 1/k^2 under the safe (unconditional) model; `shift_sd` is that k.

W1 is unsigned and in the units of the image's own error level, so it ranks images by how hard
they are to denoise as much as by memorisation. The signed, normalised shift
    shift_relative = 1 - mean L(x0, eps, e*) / mean L(x0, eps, "")
is the share of the unconditional error that the prompt removes: 0 for a prompt that does not
help, negative for one that hurts (not evidence of anything). Both shifts presume a safe
unconditional model; where it replicates the image itself (uncond_replication) they are void.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memray.measures import rng
from memray.measures.settings import WassersteinConfig
from memray.measures.stats import wasserstein_1d
from memray.measures.z0_error import z0_prediction_error


@dataclass
class WassersteinResult:
    """Per image: W1, the two error distributions' means, the Chebyshev shift, and the samples."""

    w1: np.ndarray
    err_uncond_mean: np.ndarray
    err_cond_mean: np.ndarray
    shift_sd: np.ndarray
    shift_relative: np.ndarray
    err_uncond: np.ndarray  # (B, noises)
    err_cond: np.ndarray  # (B, noises)


@torch.no_grad()
def error_distributions(model, z0, cond, generators, owner, config: WassersteinConfig):
    """L(x0, eps, "") and L(x0, eps, e) on the same per-image noises: two (B, noises) tensors."""
    batch, n = z0.shape[0], config.noises
    eps = rng.randn_per_image(generators, (n, *z0.shape[1:])).flatten(0, 1)
    z0_n, owner_n = z0.repeat_interleave(n, 0), owner.repeat_interleave(n)
    timesteps = model.measure_timesteps(config.timesteps)
    uncond = z0_prediction_error(model, z0_n, eps, model.empty_condition(batch * n), timesteps, owner_n)
    cond_err = z0_prediction_error(model, z0_n, eps, cond.repeat_interleave(n, 0), timesteps, owner_n)
    return uncond.reshape(batch, n), cond_err.reshape(batch, n)


def memorization_wasserstein(model, z0, cond, generators, owner, config: WassersteinConfig) -> WassersteinResult:
    """M(x0) for B images given each one's inverted prompt conditioning cond (B, L, D)."""
    uncond, cond_err = error_distributions(model, z0, cond, generators, owner, config)
    shift = (uncond.mean(1) - cond_err.mean(1)) / uncond.std(1).clamp_min(1e-12)
    return WassersteinResult(
        w1=wasserstein_1d(uncond, cond_err).cpu().numpy(),
        err_uncond_mean=uncond.mean(1).cpu().numpy(),
        err_cond_mean=cond_err.mean(1).cpu().numpy(),
        shift_sd=shift.cpu().numpy(),
        shift_relative=(1 - cond_err.mean(1) / uncond.mean(1).clamp_min(1e-12)).cpu().numpy(),
        err_uncond=uncond.cpu().numpy(),
        err_cond=cond_err.cpu().numpy(),
    )
