"""From scores to a verdict, with the rule that decided it (stored next to the verdict).

InvMM decides when it ran: replicated with a near-standard noise distribution is memorized;
never replicated within the budget is not memorized, unless the Wasserstein shift says the
inverted prompt moves the error distribution far outside the safe model's (then inconclusive).
Without InvMM, the Wasserstein shift decides by Chebyshev's bound.
"""

from __future__ import annotations

from memray.catalog.schema import AuditRow


def decide(row: AuditRow, rule) -> tuple[str, str]:
    """(verdict, rule text) for a row whose measures have run; `rule` is a VerdictConfig."""
    shift = row.wasserstein_shift_sd
    if row.invmm_replicated is not None:
        if row.invmm_replicated and row.invmm_kl is not None and row.invmm_kl <= rule.invmm_kl_max:
            return "memorized", f"InvMM replicated at KL {row.invmm_kl:.4g} <= {rule.invmm_kl_max}"
        if row.invmm_replicated and row.invmm_kl is None:
            return "inconclusive", "InvMM replicated but its KL is not finite"
        if row.invmm_replicated:
            return "inconclusive", f"InvMM replicated only at KL {row.invmm_kl:.4g} > {rule.invmm_kl_max}"
        if shift is not None and shift >= rule.shift_sd_memorized:
            return (
                "inconclusive",
                f"InvMM never replicated, but the error shift is {shift:.3g} sd >= {rule.shift_sd_memorized}",
            )
        return "not_memorized", f"InvMM never replicated in {row.invmm_steps} steps"
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
