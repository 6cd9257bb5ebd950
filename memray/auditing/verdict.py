"""From scores to a verdict, with the rule that decided it (stored next to the verdict).

In order (docs/science.md, "verdict"):
1. The model replicates the image from the empty prompt and N(0, I) noise in at least
   `uncond_rate_min` of its samples: memorized, the most severe kind (no prompt needed). It
   also voids the Wasserstein shift, which presumes a safe unconditional model.
2. InvMM ran: replicated close enough to N(0, I) that plain noise under the found prompt must
   replicate the image in at least `invmm_rate_min` of samples (the KL bound below) is memorized,
   replicated only further away is inconclusive, never replicated within the budget is not
   memorized unless the Wasserstein shift says the inverted prompt moves the error far outside
   the safe model's.
3. Without InvMM, the Wasserstein shift decides by Chebyshev's bound.
"""

from __future__ import annotations

from memray.catalog.schema import AuditRow
from memray.measures.stats import standard_noise_rate_bound


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
        if row.invmm_replicated and row.invmm_kl_nats is None:
            return "inconclusive", "InvMM replicated but its KL is not finite"
        if row.invmm_replicated:
            # every check sample replicated: q(A) ~ 1 under the found noise distribution
            bound = standard_noise_rate_bound(row.invmm_kl_nats)
            relation = ">=" if bound >= rule.invmm_rate_min else "<"
            text = (
                f"InvMM replicated at KL {row.invmm_kl_nats:.3g} nats: N(0, I) noise under its prompt "
                f"replicates in >= {bound:.3g} of samples, {relation} {rule.invmm_rate_min:g}"
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
    return "inconclusive", "neither InvMM nor the Wasserstein measure ran"
