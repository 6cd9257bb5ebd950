"""The measures an audit can run, and the catalog columns each one fills: declared here, once.

Torch-free, so the configuration (memray.config) can name and check measures without loading a
model's libraries. How each measure runs on a batch of images is in run_measures.py (RUNS, by the
same names); the columns are the catalog's (memray.catalog.schema.AuditRow: run_measures.py checks
that at import), and a measure that fills a column it does not declare here is an error, not a silently
dropped value.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    """A measure the audit can run."""

    name: str
    label: str  # how an error row names it
    columns: tuple[str, ...]
    needs_prompt: bool = False  # conditional models only
    needs: tuple[str, ...] = ()  # measures that must run before it
    replication: bool = False  # compares generations with the target: needs the replication bar
    after_verdict: bool = False  # what it does depends on the verdict
    # True: it keeps at most `slots` images in flight itself (continuous batching); False: the runner
    # hands it the batch in chunks of `slots` images
    slotted: bool = False


REGISTRY: dict[str, Measure] = {
    m.name: m
    for m in (
        Measure(
            "uncond_replication",
            "the unconditional replication rate",
            ("uncond_replication_rate",),
            replication=True,
        ),
        Measure(
            "invmm",
            "InvMM",
            (
                "invmm_replicated",
                "invmm_kl",
                "invmm_kl_nats",
                "invmm_steps",
                "invmm_similarity",
                "invmm_guidance",
                "invmm_prompt",
                "invmm_prompt_init",
                "invmm_prompt_replicated",
                "invmm_stop_reason",
                "invmm_replicas",
                "invmm_samples",
            ),
            replication=True,
            slotted=True,
        ),
        Measure(
            "start_check",
            "the start check",
            (
                "screen_similarity",
                "screen_progress",
                "screen_replicas",
                "screen_samples",
                "screen_guidance",
                "screen_flagged",
            ),
            replication=True,
        ),
        Measure("z0_error", "the z0-prediction error", ("z0_error",)),
        Measure(
            "noise_inversion",
            "noise inversion",
            (
                "noise_ks_p",
                "noise_kl",
                "noise_mu_mean",
                "noise_sigma2_mean",
                "noise_error",
                "noise_ks_p_unregularized",
                "noise_error_unregularized",
            ),
        ),
        Measure(
            "prompt_inversion",
            "soft prompt inversion",
            ("soft_prompt_error", "soft_prompt_norm"),
            needs_prompt=True,
        ),
        Measure(
            "wasserstein",
            "the Wasserstein measure",
            (
                "wasserstein",
                "wasserstein_shift_sd",
                "err_shift_relative",
                "err_uncond_mean",
                "err_cond_mean",
                "err_uncond_quantiles",
                "err_cond_quantiles",
            ),
            needs_prompt=True,
            needs=("prompt_inversion",),
        ),
        Measure(
            "wen",
            "the caption screen",
            ("wen_score", "wen_tokens", "one_step_confidence"),
            needs_prompt=True,
        ),
        Measure(
            "hard_prompt",
            "hard prompt inversion",
            ("hard_prompt", "hard_prompt_error", "hard_prompt_replicated"),
            needs_prompt=True,
            replication=True,
            after_verdict=True,
        ),
    )
}
