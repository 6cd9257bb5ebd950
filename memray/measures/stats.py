"""Closed-form statistics used by the measures: Gaussian KL and the rate bound it gives, KS normality, 1-D Wasserstein."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import stats


def kl_to_standard_normal(mu: torch.Tensor, log_var: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per row: 1/2 (mu^2 + sigma^2 - log sigma^2 - 1), mean or sum over entries."""
    terms = 0.5 * (mu.square() + log_var.exp() - log_var - 1)
    terms = terms.flatten(1)
    return terms.mean(1) if reduce == "mean" else terms.sum(1)


def standard_noise_rate_bound(kl_nats: float, rate_under_q: float = 1.0) -> float:
    """Lower bound on P(A) under N(0, I) from P(A) under q and KL(q || N(0, I)) in nats.

    Data processing on the indicator of A: KL >= q(A) log(q(A) / p(A)) + (1 - q(A)) log(1 - q(A))
    >= q(A) log(q(A) / p(A)) - 1/e, so p(A) >= q(A) exp(-(KL + 1/e) / q(A)).
    """
    return rate_under_q * math.exp(-(kl_nats + 1 / math.e) / rate_under_q)


def ks_normality_pvalues(samples: torch.Tensor) -> np.ndarray:
    """Kolmogorov-Smirnov p-value of each row's entries against N(0, 1) (rows: samples)."""
    rows = samples.detach().flatten(1).double().cpu().numpy()
    return np.array([stats.kstest(row, "norm").pvalue for row in rows])


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W1 between the empirical distributions in the rows of a and b (equal sample counts)."""
    if a.shape != b.shape:
        raise ValueError(f"W1 with common random numbers needs equal sample counts, got {a.shape} and {b.shape}")
    return (a.sort(dim=-1).values - b.sort(dim=-1).values).abs().mean(dim=-1)
