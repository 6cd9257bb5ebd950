"""From scores to a verdict, with the rule that decided it (stored next to the verdict).

In order (docs/science.md, "the verdict"):
1. The model replicates the image from the empty prompt and N(0, I) noise in at least
   `uncond_rate_min` of its samples: memorized, the most severe kind (no prompt needed). It
   also voids the Wasserstein shift, which presumes a safe unconditional model.
2. InvMM ran: replicated close enough to N(0, I) that plain noise under the found prompt must
   replicate the image in at least `invmm_rate_min` of samples (invmm_rate_bound) is memorized,
   replicated only further away is inconclusive, never replicated within the budget is not
   memorized unless the Wasserstein shift says the inverted prompt moves the error far outside
   the safe model's.
3. Only the start-check screen ran (stage 1 of the cascade): replicated from N(0, I) under the
   caption often enough is memorized; flagged is inconclusive until InvMM runs; cleared is not
   memorized (the cascade's calibration sample states how often that misses).
4. Otherwise the Wasserstein shift decides by Chebyshev's bound.
"""

from __future__ import annotations

from memray.catalog.schema import AuditRow
from memray.measures.stats import clopper_pearson_lower, counted_rate_bound, standard_noise_rate_bound


def invmm_rate_bound(row: AuditRow, rule) -> float | None:
    """Lower bound on how often N(0, I) noise under InvMM's prompt replicates the image; None unless replicated.

    Counting (`rule.evidence = "count"`): the data-processing bound at the Clopper-Pearson lower
    limit of invmm_replicas of invmm_samples. The reference ("all", and rows without counts): every
    check sample replicated, so q(A) is taken as 1.
    """
    if not row.invmm_replicated or row.invmm_kl_nats is None:
        return None
    if rule.evidence == "count" and row.invmm_samples:
        return counted_rate_bound(row.invmm_kl_nats, row.invmm_replicas, row.invmm_samples, rule.confidence)
    return standard_noise_rate_bound(row.invmm_kl_nats)


def screen_rate_bound(row: AuditRow, rule) -> float | None:
    """Lower bound on how often the caption replicates the image from N(0, I), from the start check's count.

    At N(0, I) itself there is no KL to pay: the Clopper-Pearson limit bounds the rate directly.
    Under the reference's all-K evidence, all counted samples must replicate (then taken as rate 1).
    """
    if not row.screen_samples:
        return None
    if rule.evidence == "count":
        return clopper_pearson_lower(row.screen_replicas, row.screen_samples, rule.confidence)
    return 1.0 if row.screen_replicas == row.screen_samples else 0.0


def decide(row: AuditRow, rule) -> tuple[str, str]:
    """(verdict, rule text) for a row whose measures have run; `rule` is a VerdictConfig."""
    rate = row.uncond_replication_rate
    if rate is not None and rate > 0 and rate >= rule.uncond_rate_min:
        return (
            "memorized",
            f"the empty prompt replicates it in {rate:.1%} of the model's samples from N(0, I) "
            f">= {rule.uncond_rate_min:.1%} (no prompt needed)",
        )
    shift = row.wasserstein_shift_sd if not rate else None  # a model that replicates it unprompted is not safe
    if row.invmm_replicated is not None:
        return _decide_invmm(row, rule, shift)
    if row.screen_samples:
        return _decide_screen(row, rule)
    if rate:
        return (
            "inconclusive",
            f"the empty prompt replicates it in {rate:.1%} of samples: the M4 shift presumes it never does",
        )
    if shift is not None:
        if shift >= rule.shift_sd_memorized:
            return (
                "memorized",
                f"error shift {shift:.3g} sd >= {rule.shift_sd_memorized} (P <= {1 / rule.shift_sd_memorized**2:.2%} under the safe model)",
            )
        if shift <= rule.shift_sd_clear:
            return "not_memorized", f"error shift {shift:.3g} sd <= {rule.shift_sd_clear}"
        return "inconclusive", f"error shift {shift:.3g} sd between {rule.shift_sd_clear} and {rule.shift_sd_memorized}"
    return "inconclusive", "neither InvMM, the screen nor the Wasserstein measure ran"


def _decide_invmm(row: AuditRow, rule, shift) -> tuple[str, str]:
    if row.invmm_replicated and row.invmm_kl_nats is None:
        return "inconclusive", "InvMM replicated but its KL is not finite"
    if row.invmm_replicated:
        bound = invmm_rate_bound(row, rule)
        relation = ">=" if bound >= rule.invmm_rate_min else "<"
        counted, confidence = "", ""
        if rule.evidence == "count" and row.invmm_samples:
            counted = f", {row.invmm_replicas} of {row.invmm_samples} fresh samples replicating"
            confidence = f" ({rule.confidence:.0%} confidence)"
        text = (
            f"InvMM replicated at KL {row.invmm_kl_nats:.3g} nats{counted}: N(0, I) noise under its prompt "
            f"replicates in >= {bound:.3g} of samples{confidence}, {relation} {rule.invmm_rate_min:g}"
        )
        return ("memorized" if relation == ">=" else "inconclusive"), text
    if shift is not None and shift >= rule.shift_sd_memorized:
        return (
            "inconclusive",
            f"InvMM never replicated, but the error shift is {shift:.3g} sd >= {rule.shift_sd_memorized}",
        )
    if row.invmm_stop_reason == "early_stop":
        return "not_memorized", (
            f"InvMM stopped early at {row.invmm_steps} steps: its checks stayed too far under the bar "
            "to replicate within the budget (the calibrated early stop; censored)"
        )
    return "not_memorized", f"InvMM never replicated in {row.invmm_steps} steps"


def _decide_screen(row: AuditRow, rule) -> tuple[str, str]:
    bound = screen_rate_bound(row, rule)
    prompt = "its caption" if row.caption else "the empty prompt"
    progress = "no" if row.screen_progress is None else f"{row.screen_progress:.2f}"
    if row.screen_replicas and bound >= rule.invmm_rate_min:
        return "memorized", (
            f"{prompt} replicates it from N(0, I) noise in {row.screen_replicas} of {row.screen_samples} start "
            f"samples: in >= {bound:.3g} of samples ({rule.confidence:.0%} confidence) >= {rule.invmm_rate_min:g}"
        )
    if row.screen_flagged:
        return "inconclusive", (
            f"flagged by the screen (progress {progress}, {row.screen_replicas} of "
            f"{row.screen_samples} start samples replicating): InvMM decides (memray confirm)"
        )
    return "not_memorized", (
        f"cleared by the screen: its closest start sample covered {progress} of the way to its bar"
    )
