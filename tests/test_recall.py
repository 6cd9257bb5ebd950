"""The cascade's recall estimate: the exact hypergeometric interval against its definition, and the
coverage of the recall interval on simulated cascade runs (uniform and stratified calibration)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from memray.cascade.recall import Stratum, hypergeometric_interval, screen_recall


@pytest.mark.parametrize(
    ("population", "sampled", "memorized"), [(60, 10, 0), (60, 10, 2), (60, 60, 5), (200, 7, 7), (500, 25, 1)]
)
def test_hypergeometric_interval_is_the_set_of_counts_neither_tail_rejects(population, sampled, memorized):
    tail = 0.025
    accepted = [
        m
        for m in range(population + 1)
        if memorized <= m <= population - (sampled - memorized)
        and stats.hypergeom.sf(memorized - 1, population, m, sampled) > tail
        and stats.hypergeom.cdf(memorized, population, m, sampled) > tail
    ]
    assert hypergeometric_interval(population, sampled, memorized, 0.95) == (min(accepted), max(accepted))


def test_a_census_knows_the_count_exactly():
    assert hypergeometric_interval(40, 40, 3, 0.95) == (3, 3)
    estimate = screen_recall(4, 1, [Stratum(30, 30, 1, 1.0)])
    assert estimate.recall == estimate.recall_low == estimate.recall_high == pytest.approx(4 / 6)


def simulate_run(rs, flagged_memorized, cleared, cleared_memorized, rates):
    """One cascade run: cleared images split into strata of the given rates, each a simple random sample."""
    bounds = np.linspace(0, cleared, len(rates) + 1).astype(int)
    memorized = np.zeros(cleared, dtype=bool)
    memorized[rs.choice(cleared, cleared_memorized, replace=False)] = True
    strata = []
    for (start, stop), rate in zip(zip(bounds[:-1], bounds[1:]), rates):
        size = int(np.ceil(rate * (stop - start)))
        picked = start + rs.choice(stop - start, size, replace=False)
        strata.append(Stratum(stop - start, size, int(memorized[picked].sum()), rate))
    return screen_recall(flagged_memorized, 0, strata)


@pytest.mark.parametrize(
    ("flagged_memorized", "cleared", "cleared_memorized", "rates"),
    [
        (8, 2000, 2, [0.05]),  # rare misses, a 5% sample
        (3, 500, 6, [0.1]),  # a weak screen
        (10, 3000, 4, [0.2, 0.02]),  # stratified: a dense band near the threshold, a sparse rest
        (0, 1000, 3, [0.1]),  # the screen found nothing: recall 0
    ],
)
def test_the_recall_interval_covers_the_true_recall_in_simulated_runs(
    flagged_memorized, cleared, cleared_memorized, rates
):
    rs = np.random.default_rng(1)
    truth = flagged_memorized / (flagged_memorized + cleared_memorized)
    runs = [simulate_run(rs, flagged_memorized, cleared, cleared_memorized, rates) for _ in range(400)]
    stated = [r for r in runs if r.recall is not None]
    covered = np.mean([r.recall_low - 1e-12 <= truth <= r.recall_high + 1e-12 for r in stated])
    assert covered >= 0.95, covered
    # not a vacuous interval: it excludes recall 1 in most runs where the sample saw a miss
    saw_a_miss = [r for r in stated if r.missed_low > 0]
    assert saw_a_miss and all(r.recall_high < 1 for r in saw_a_miss)


def test_without_any_memorized_image_the_run_says_it_cannot_state_recall():
    estimate = screen_recall(0, 0, [Stratum(1000, 30, 0, 0.03)])
    assert estimate.recall is None and estimate.missed_low == 0 and estimate.missed_high > 0
    assert "cannot be stated" in estimate.statement() and str(estimate.missed_high) in estimate.statement()
    empty = screen_recall(5, 0, [Stratum(1000, 0, 0, 0.0)])
    assert empty.recall is None and "calibration sample is empty" in empty.statement()
