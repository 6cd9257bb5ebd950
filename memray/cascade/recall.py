"""How many memorized images did the screen miss? The recall of a cascade run, with its interval.

The run's screened images split into the flagged (every one confirmed by InvMM: their memorized
count M_F is known) and the cleared. Cleared images are known exactly where stage 2 confirmed
them on request (`memray confirm --top`), and otherwise estimated from the calibration sample: in
stratum h, a simple random sample of n_h of its N_h images (selection.py; what is left of it
stays a simple random sample of what is left of the stratum when requested images leave it), so
the m_h memorized among them are hypergeometric in the stratum's unknown count M_h. The exact (Clopper-Pearson-style) hypergeometric interval of M_h
inverts the two one-sided tests; strata are joined by Bonferroni (each at level alpha / H), which
keeps the joint coverage at least 1 - alpha.

    recall = M_F / (M_F + M_T + sum_h M_h)      (M_T: memorized among cleared images confirmed on request)

Point estimate at M_h = N_h m_h / n_h; its interval maps the ends of sum_h M_h (recall falls as
misses rise). With no memorized image found anywhere the recall is undefined: the run says so
and states the most misses the sample allows.
"""

from __future__ import annotations

from dataclasses import dataclass

from scipy import stats


@dataclass(frozen=True)
class Stratum:
    """Cleared images of one calibration rate: N of them, n confirmed at random, m of those memorized."""

    population: int
    sampled: int
    memorized: int
    rate: float  # each image's chance to be sampled (n / N at selection)


@dataclass(frozen=True)
class RecallEstimate:
    """The screen's recall in a run: point, interval (None where undefined) and the misses behind it."""

    found: int  # memorized among the flagged images stage 2 confirmed
    missed_known: int  # memorized among cleared images confirmed on request
    missed: float  # estimated memorized among the cleared images nobody confirmed
    missed_low: int
    missed_high: int
    recall: float | None
    recall_low: float | None
    recall_high: float | None
    confidence: float

    def statement(self) -> str:
        """One sentence a report can print."""
        level = f"{self.confidence:.0%}"
        if self.missed != self.missed:
            return f"the calibration sample is empty, so the screen's recall cannot be stated ({self.found} found)"
        if self.recall is None:
            return (
                f"no memorized image found, so the screen's recall cannot be stated; at most {self.missed_high} "
                f"memorized images among the unconfirmed cleared ones ({level})"
            )
        return (
            f"recall {self.recall:.3f} ({level} interval {self.recall_low:.3f}-{self.recall_high:.3f}): "
            f"{self.found} memorized found by the screen, {self.missed_known} missed and found on request, "
            f"about {self.missed:.1f} missed among the unconfirmed cleared ones ({self.missed_low}-{self.missed_high})"
        )


def hypergeometric_interval(population: int, sampled: int, memorized: int, confidence: float) -> tuple[int, int]:
    """Exact two-sided interval of the memorized count M of a population, from a uniform sample of it.

    M_low is the smallest M with P(X >= m | M) > alpha / 2, M_high the largest with
    P(X <= m | M) > alpha / 2, X ~ Hypergeometric(population, M, sampled); both tails are monotone
    in M, so bisection finds them.
    """
    if not 0 <= memorized <= sampled <= population:
        raise ValueError(f"need 0 <= memorized <= sampled <= population, got {memorized}, {sampled}, {population}")
    tail = (1 - confidence) / 2
    lowest, highest = memorized, population - (sampled - memorized)  # what the sample itself rules out

    def first(test, lo: int, hi: int) -> int:
        """The smallest M in [lo, hi] where test(M) holds (test is monotone: False... then True...)."""
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if test(mid) else (mid + 1, hi)
        return lo

    low = first(lambda m: stats.hypergeom.sf(memorized - 1, population, m, sampled) > tail, lowest, highest)
    high = first(
        lambda m: m > highest or stats.hypergeom.cdf(memorized, population, m, sampled) <= tail, lowest, highest + 1
    )
    return low, high - 1


def screen_recall(found: int, missed_known: int, strata: list[Stratum], confidence: float = 0.95) -> RecallEstimate:
    """The screen's recall from the confirmed flagged images, the cleared ones confirmed on request,
    and the calibration strata of the remaining cleared images (module docstring)."""
    each = 1 - (1 - confidence) / max(len(strata), 1)  # Bonferroni over strata
    missed, low, high = 0.0, 0, 0
    for s in strata:
        if s.sampled == 0:  # nothing sampled: any number of its images may be memorized
            missed, high = (float("nan") if s.population else missed), high + s.population
            continue
        lo, hi = hypergeometric_interval(s.population, s.sampled, s.memorized, each)
        low, high = low + lo, high + hi
        missed += s.population * s.memorized / s.sampled
    if found + missed_known + sum(s.memorized for s in strata) == 0 or missed != missed:
        return RecallEstimate(found, missed_known, missed, low, high, None, None, None, confidence)

    def recall(misses: float) -> float:
        return found / (found + missed_known + misses) if found else 0.0

    return RecallEstimate(found, missed_known, missed, low, high, recall(missed), recall(high), recall(low), confidence)
