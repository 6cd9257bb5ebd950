"""Gaussian KL and its rate bound, KS normality and 1-D Wasserstein against torch.distributions, scipy and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from memray.measures.stats import (
    binary_entropy,
    binary_kl,
    clopper_pearson,
    clopper_pearson_lower,
    counted_rate_bound,
    kl_to_standard_normal,
    ks_normality_pvalues,
    rate_lower_bound,
    standard_noise_rate_bound,
    wasserstein_1d,
)

# -- KL(N(mu, sigma^2) || N(0, I)) ------------------------------------------------------------


def reference_kl(mu, log_var):
    """Elementwise KL from torch.distributions: (B, ...) -> (B, ...)."""
    q = torch.distributions.Normal(mu, torch.exp(0.5 * log_var))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    return torch.distributions.kl_divergence(q, p)


@pytest.mark.parametrize("shape", [(3, 7), (2, 4, 5, 6)])
def test_kl_mean_and_sum_match_torch_distributions(shape):
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5
    log_var = torch.randn(shape, generator=gen, dtype=torch.float64)
    elementwise = reference_kl(mu, log_var).reshape(shape[0], -1)
    torch.testing.assert_close(kl_to_standard_normal(mu, log_var), elementwise.mean(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        kl_to_standard_normal(mu, log_var, reduce="mean"), elementwise.mean(1), rtol=1e-12, atol=1e-12
    )
    torch.testing.assert_close(
        kl_to_standard_normal(mu, log_var, reduce="sum"), elementwise.sum(1), rtol=1e-12, atol=1e-12
    )


def test_kl_is_zero_exactly_at_the_standard_normal_and_positive_elsewhere():
    zeros = torch.zeros(2, 3, 4)
    assert torch.equal(kl_to_standard_normal(zeros, zeros), torch.zeros(2))
    # One entry moved: mean over 12 entries of 1/2 mu^2.
    mu = zeros.clone()
    mu[1, 0, 0] = 2.0
    torch.testing.assert_close(kl_to_standard_normal(mu, zeros), torch.tensor([0.0, 0.5 * 4 / 12]))
    torch.testing.assert_close(kl_to_standard_normal(mu, zeros, reduce="sum"), torch.tensor([0.0, 2.0]))
    # sigma^2 = e: 1/2 (e - 1 - 1) per entry.
    torch.testing.assert_close(kl_to_standard_normal(zeros, torch.ones(2, 3, 4)), torch.full((2,), 0.5 * (np.e - 2)))


def test_kl_gradients_match_torch_distributions():
    gen = torch.Generator().manual_seed(1)
    mu = torch.randn(2, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    log_var = torch.randn(2, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    g_mu, g_lv = torch.autograd.grad(kl_to_standard_normal(mu, log_var).sum(), (mu, log_var))
    r_mu, r_lv = torch.autograd.grad(reference_kl(mu, log_var).mean(1).sum(), (mu, log_var))
    torch.testing.assert_close(g_mu, r_mu)
    torch.testing.assert_close(g_lv, r_lv)


# -- the rate bound: from a replicating noise distribution q to N(0, I) ----------------------------


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("edge", [-3.0, -1.0, 0.0, 1.0, 2.5])
def test_rate_bound_holds_for_a_shifted_gaussian_and_a_half_space(shift, edge):
    # q = N(shift e1, I), A = {x1 > edge}: KL = shift^2 / 2, q(A) = sf(edge - shift), p(A) = sf(edge)
    kl = shift**2 / 2
    assert kl == pytest.approx(kl_to_standard_normal(torch.tensor([[shift]]), torch.zeros(1, 1), "sum").item())
    q_a, p_a = stats.norm.sf(edge - shift), stats.norm.sf(edge)
    assert standard_noise_rate_bound(kl, q_a) <= p_a


def test_rate_bound_is_tight_in_the_exponent_where_q_always_replicates():
    # q(A) = 1: KL >= log 1/p(A); the bound gives up only the factor e^(-1/e) for q(A) < 1 estimated as 1
    for kl in [0.0, 1.0, 6.0]:
        assert standard_noise_rate_bound(kl) == pytest.approx(np.exp(-kl - 1 / np.e))
    assert standard_noise_rate_bound(np.log(1000) - 1 / np.e) == pytest.approx(1e-3)


# -- the counting bound: q(A) from k of n samples, then data processing --------------------------


def test_binary_entropy_and_kl_match_their_closed_forms():
    for q in [0.0, 0.1, 0.5, 0.93, 1.0]:
        expected = -sum(x * np.log(x) for x in (q, 1 - q) if x > 0)
        assert binary_entropy(q) == pytest.approx(expected, abs=1e-12)
        for p in [0.01, 0.3, 0.99]:
            terms = [a * np.log(a / b) for a, b in ((q, p), (1 - q, 1 - p)) if a > 0]
            assert binary_kl(q, p) == pytest.approx(sum(terms), abs=1e-12)


@pytest.mark.parametrize("q", [0.02, 0.25, 0.5, 0.75, 0.97])
@pytest.mark.parametrize("kl", [0.0, 0.05, 1.0, 6.0, 40.0])
def test_rate_bound_solves_the_binary_kl_and_beats_its_closed_form_relaxation(q, kl):
    p = rate_lower_bound(kl, q)
    relaxation = np.exp(-(kl + binary_entropy(q)) / q)  # the closed form (the p >= exp(-(KL + H(q)) / q))
    assert relaxation <= p * (1 + 1e-9) and p <= q
    if p > 1e-300:
        assert binary_kl(q, p) == pytest.approx(kl, rel=1e-7, abs=1e-9)  # the data-processing inequality is tight
    assert rate_lower_bound(kl, q) <= rate_lower_bound(kl, min(1.0, q + 0.01))  # rises with q(A)
    assert rate_lower_bound(kl + 0.5, q) <= p  # falls with KL


def test_rate_bound_at_q_one_is_exp_minus_kl_and_the_reference_pays_one_over_e():
    for kl in [0.0, 2.0, 6.5]:
        assert rate_lower_bound(kl, 1.0) == pytest.approx(np.exp(-kl))
        assert standard_noise_rate_bound(kl) <= rate_lower_bound(kl, 1.0)
    assert rate_lower_bound(3.0, 0.0) == 0.0 and rate_lower_bound(float("nan"), 0.5) == 0.0


@pytest.mark.parametrize("shift", [0.0, 0.5, 1.5, 3.0])
@pytest.mark.parametrize("edge", [-1.0, 0.0, 1.0, 2.5])
def test_exact_rate_bound_holds_for_a_shifted_gaussian_and_a_half_space(shift, edge):
    q_a, p_a = stats.norm.sf(edge - shift), stats.norm.sf(edge)
    assert rate_lower_bound(shift**2 / 2, q_a) <= p_a * (1 + 1e-9)


@pytest.mark.parametrize(("k", "n"), [(0, 4), (1, 4), (3, 4), (4, 4), (12, 16), (16, 16), (0, 50), (37, 200)])
def test_clopper_pearson_matches_scipy(k, n):
    interval = stats.binomtest(k, n).proportion_ci(confidence_level=0.9, method="exact")
    low, high = clopper_pearson(k, n, 0.9)
    assert low == pytest.approx(interval.low, abs=1e-10) and high == pytest.approx(interval.high, abs=1e-10)
    # the one-sided 95% limit is the lower end of the two-sided 90% interval
    assert clopper_pearson_lower(k, n, 0.95) == pytest.approx(interval.low, abs=1e-10)
    if k == n:
        assert clopper_pearson_lower(k, n, 0.95) == pytest.approx(0.05 ** (1 / n))  # closed form at k = n


@pytest.mark.parametrize("n", [4, 16, 64])
def test_clopper_pearson_lower_limit_covers_at_its_confidence_exactly(n):
    """Exact coverage P(lower(k) <= q) over k ~ Binomial(n, q), for rates across (0, 1)."""
    lower = np.array([clopper_pearson_lower(k, n, 0.95) for k in range(n + 1)])
    coverage = [stats.binom.pmf(np.arange(n + 1), n, q)[lower <= q].sum() for q in np.linspace(0.01, 0.99, 99)]
    assert min(coverage) >= 0.95 - 1e-9
    assert min(coverage) < 0.97  # attained, not a trivially wide limit


def test_counted_bound_covers_the_true_rate_at_its_confidence():
    # q = N(shift e1, I), A = {x1 > edge}: q(A) and p(A) in closed form; n samples of q counted
    rs = np.random.default_rng(0)
    shift, edge, n, confidence = 1.0, 0.5, 16, 0.9
    q_a, p_a = stats.norm.sf(edge - shift), stats.norm.sf(edge)
    kl = shift**2 / 2
    draws = 4000
    k = rs.binomial(n, q_a, size=draws)
    held = np.mean([counted_rate_bound(kl, int(x), n, confidence) <= p_a for x in k])
    assert held >= confidence
    # and it is a real bound, not a trivial one: usually well above zero
    assert np.median([counted_rate_bound(kl, int(x), n, confidence) for x in k[:200]]) > p_a / 10


# -- KS normality ----------------------------------------------------------------------------


def test_ks_pvalues_match_scipy_per_row_and_flatten_each_sample():
    gen = torch.Generator().manual_seed(2)
    samples = torch.randn(5, 2, 6, 7, generator=gen) * torch.tensor([1.0, 1.0, 1.3, 0.8, 1.0]).reshape(-1, 1, 1, 1)
    samples[4] += 0.3
    p = ks_normality_pvalues(samples)
    assert isinstance(p, np.ndarray) and p.shape == (5,)
    rows = samples.double().numpy().reshape(5, -1)
    expected = np.array([stats.kstest(row, stats.norm.cdf).pvalue for row in rows])
    np.testing.assert_allclose(p, expected, rtol=1e-10)
    # The one-sample KS statistic by hand for row 0, and scipy's exact distribution of it.
    x = np.sort(rows[0])
    n = len(x)
    cdf = stats.norm.cdf(x)
    d = max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max())
    np.testing.assert_allclose(p[0], stats.kstwo.sf(d, n), rtol=1e-6)


def test_ks_accepts_gradient_carrying_inputs():
    x = torch.randn(2, 50, requires_grad=True)
    assert ks_normality_pvalues(x * 1.0).shape == (2,)


def test_ks_standard_normal_rows_are_mostly_accepted():
    gen = torch.Generator().manual_seed(3)
    p = ks_normality_pvalues(torch.randn(60, 400, generator=gen))
    # Under the null p is uniform: about 95% exceed 0.05; 80% is far below any plausible draw.
    assert (p > 0.05).mean() >= 0.8
    assert 0.3 < p.mean() < 0.7


def test_ks_shifted_rows_are_rejected():
    gen = torch.Generator().manual_seed(4)
    p = ks_normality_pvalues(torch.randn(8, 2000, generator=gen) + 0.5)
    assert (p < 1e-6).all()


# -- exact 1-D Wasserstein ---------------------------------------------------------------------


def test_wasserstein_matches_scipy_on_random_rows():
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(6, 300, generator=gen, dtype=torch.float64)
    b = torch.randn(6, 300, generator=gen, dtype=torch.float64).exp() * torch.arange(1, 7).reshape(-1, 1) - 1
    w = wasserstein_1d(a, b)
    assert w.shape == (6,)
    expected = [stats.wasserstein_distance(a[i].numpy(), b[i].numpy()) for i in range(6)]
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_wasserstein_is_symmetric_and_zero_on_permutations():
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(3, 100, generator=gen)
    b = a[:, torch.randperm(100, generator=gen)]
    assert torch.equal(wasserstein_1d(a, b), torch.zeros(3))
    c = torch.rand(3, 100, generator=gen)
    torch.testing.assert_close(wasserstein_1d(a, c), wasserstein_1d(c, a))


@pytest.mark.parametrize("shift", [0.0, 0.25, -1.5, 3.0])
def test_wasserstein_of_shifted_common_noise_is_the_mean_difference(shift):
    """W1(N(m1, s), N(m2, s)) = |m1 - m2|; with common noise the empirical W1 is exactly that."""
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(4, 1000, generator=gen, dtype=torch.float64)
    m1, s = 0.7, torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64).reshape(-1, 1)
    a = m1 + s * noise
    b = (m1 + shift) + s * noise
    torch.testing.assert_close(
        wasserstein_1d(a, b), torch.full((4,), abs(shift), dtype=torch.float64), rtol=1e-12, atol=1e-12
    )


def test_wasserstein_of_independent_large_samples_approaches_the_closed_form():
    gen = torch.Generator().manual_seed(8)
    a = torch.randn(2, 20000, generator=gen, dtype=torch.float64)
    b = torch.randn(2, 20000, generator=gen, dtype=torch.float64) + torch.tensor([[0.0], [0.8]], dtype=torch.float64)
    w = wasserstein_1d(a, b)
    assert w[0] < 0.05
    assert abs(w[1] - 0.8) < 0.05


@pytest.mark.parametrize("shapes", [((2, 10), (2, 11)), ((2, 10), (3, 10)), ((10,), (2, 10))])
def test_wasserstein_refuses_unequal_shapes(shapes):
    with pytest.raises(ValueError):
        wasserstein_1d(torch.zeros(shapes[0]), torch.zeros(shapes[1]))
