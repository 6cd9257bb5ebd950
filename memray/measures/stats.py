"""Closed-form statistics used by the measures: Gaussian KL and the rate bounds it gives, binomial
confidence limits, KS normality, 1-D Wasserstein."""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import optimize, stats


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


def binary_entropy(q: float) -> float:
    """H(q) = -q log q - (1 - q) log(1 - q) in nats (0 at q = 0 and q = 1)."""
    return float(stats.entropy([q, 1 - q]))


def binary_kl(q: float, p: float) -> float:
    """d(q || p) = q log(q / p) + (1 - q) log((1 - q) / (1 - p)) in nats: KL of Bernoulli(q) from Bernoulli(p)."""
    return float(stats.entropy([q, 1 - q], [p, 1 - p]))


def rate_lower_bound(kl_nats: float, rate_under_q: float) -> float:
    """The smallest p(A) under N(0, I) that data processing allows, given q(A) and KL(q || N(0, I)).

    Data processing on the indicator of A: KL >= d(q(A) || p(A)), and d(q || p) falls as p rises
    towards q, so p(A) >= the p <= q(A) where d(q(A) || p) = KL. Its closed-form relaxation is
    exp(-(KL + H(q)) / q) (drop (1 - q) log(1 / (1 - p)) >= 0); at q = 1 both are exp(-KL).
    The bound rises with q(A), so a lower confidence limit of q(A) gives a bound that holds with
    that confidence.
    """
    q, kl = float(rate_under_q), max(float(kl_nats), 0.0)
    if not (q > 0 and math.isfinite(kl)):
        return 0.0
    if q >= 1:
        return math.exp(-kl)
    if kl == 0:
        return q
    # Solve in log p: below the relaxation's exponent minus q, d(q || p) > KL (see the docstring).
    low = -(kl + binary_entropy(q)) / q - 1.0
    excess = lambda log_p: q * (math.log(q) - log_p) + (1 - q) * (math.log1p(-q) - math.log1p(-math.exp(log_p))) - kl  # noqa: E731
    return math.exp(optimize.brentq(excess, low, math.log(q), xtol=1e-12))


def clopper_pearson_lower(successes: int, trials: int, confidence: float) -> float:
    """One-sided Clopper-Pearson lower limit of a binomial rate: P(rate >= it) >= confidence."""
    if successes <= 0:
        return 0.0
    return float(stats.beta.ppf(1 - confidence, successes, trials - successes + 1))


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided Clopper-Pearson interval of a binomial rate (equal tails)."""
    alpha = 1 - confidence
    low = 0.0 if successes <= 0 else float(stats.beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes >= trials else float(stats.beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def counted_rate_bound(kl_nats: float, replicas: int, samples: int, confidence: float) -> float:
    """Lower confidence bound on how often N(0, I) noise replicates, from k of n samples of q replicating.

    The data-processing bound (rate_lower_bound) at the Clopper-Pearson lower limit of q(A): it
    holds with probability >= `confidence` over the n samples.
    """
    return rate_lower_bound(kl_nats, clopper_pearson_lower(replicas, samples, confidence))


def ks_normality_pvalues(samples: torch.Tensor) -> np.ndarray:
    """Kolmogorov-Smirnov p-value of each row's entries against N(0, 1) (rows: samples)."""
    rows = samples.detach().flatten(1).double().cpu().numpy()
    return np.array([stats.kstest(row, "norm").pvalue for row in rows])


def wasserstein_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact W1 between the empirical distributions in the rows of a and b (equal sample counts)."""
    if a.shape != b.shape:
        raise ValueError(f"W1 with common random numbers needs equal sample counts, got {a.shape} and {b.shape}")
    return (a.sort(dim=-1).values - b.sort(dim=-1).values).abs().mean(dim=-1)
