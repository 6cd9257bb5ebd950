"""Network output -> (eps_hat, z0_hat) for each diffusers `prediction_type`.

With z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps (docs/science.md, notation):
  epsilon:      z0_hat = (z_t - sqrt(1-abar_t) eps_hat) / sqrt(abar_t)
  v_prediction: z0_hat = sqrt(abar_t) z_t - sqrt(1-abar_t) v_hat,  eps_hat = sqrt(1-abar_t) z_t + sqrt(abar_t) v_hat
  sample:       z0_hat = output,  eps_hat = (z_t - sqrt(abar_t) z0_hat) / sqrt(1-abar_t)
Flow matching (SD 3.x) has its own forward process x_t = (1 - sigma) z0 + sigma eps and predicts the
velocity v = dx_t/dsigma = eps - z0; solving the two for z0 and eps:
  z0_hat = x_t - sigma v_hat,  eps_hat = x_t + (1 - sigma) v_hat
Getting this wrong silently breaks every measure on SD 2.x or 3.x, so it lives in one place.
"""

from __future__ import annotations

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _per_sample(abar_t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return abar_t.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def noisy_sample(z0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """Forward process: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps."""
    a = _per_sample(abar_t, z0)
    return a.sqrt() * z0 + (1 - a).sqrt() * eps


def eps_and_z0(output: torch.Tensor, z_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str):
    """Convert a network output at (z_t, t) into the noise and clean-sample predictions."""
    a = _per_sample(abar_t, z_t)
    sqrt_a, sqrt_1ma = a.sqrt(), (1 - a).sqrt()
    if prediction_type == "epsilon":
        eps_hat = output
        z0_hat = (z_t - sqrt_1ma * output) / sqrt_a
    elif prediction_type == "v_prediction":
        z0_hat = sqrt_a * z_t - sqrt_1ma * output
        eps_hat = sqrt_1ma * z_t + sqrt_a * output
    elif prediction_type == "sample":
        z0_hat = output
        eps_hat = (z_t - sqrt_a * output) / sqrt_1ma
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")
    return eps_hat, z0_hat


def flow_noisy_sample(z0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Flow-matching forward process: x_t = (1 - sigma) z0 + sigma eps."""
    s = _per_sample(sigma, z0)
    return (1 - s) * z0 + s * eps


def flow_eps_and_z0(velocity: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor):
    """A velocity prediction v = eps - z0 at (x_t, sigma) as (eps_hat, z0_hat)."""
    s = _per_sample(sigma, x_t)
    return x_t + (1 - s) * velocity, x_t - s * velocity
