"""M1. z0-prediction error: L(x0, eps, e) = E_t || z0 - z0_hat(z_t, t, phi(e)) ||^2.

E_t is estimated on uniformly spaced timesteps (paper: 50 of 1000). For epsilon models this
equals E_t (1 - abar_t) / abar_t || eps - eps_hat ||^2. Squared norms are means over entries,
so values compare across resolutions; the scale does not change any ranking or optimum.
"""

from __future__ import annotations

import torch


def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|| a - b ||^2 as a mean over each sample's entries: (n, ...) -> (n,)."""
    return (a - b).square().flatten(1).mean(1)


def z0_prediction_error(model, z0, eps, cond, timesteps, owner) -> torch.Tensor:
    """L for each of n (z0, eps, cond) samples, averaged over the shared timesteps: returns (n,)."""
    total = torch.zeros(z0.shape[0], device=z0.device)
    for t in timesteps:
        t_n = t.expand(z0.shape[0])
        pred = model.predict(model.noisy_sample(z0, eps, t_n), t_n, cond, owner)
        total = total + squared_error(pred.z0, z0)
    return total / len(timesteps)


def sampled_z0_error(model, z0, eps, t, cond, owner) -> torch.Tensor:
    """Single-timestep estimate of L with per-sample t (the stochastic loss the inversions minimise)."""
    pred = model.predict(model.noisy_sample(z0, eps, t), t, cond, owner)
    return squared_error(pred.z0, z0)
