"""Catalog schema version 4: one row per (image, model fingerprint, audit config).

This file is the only place that names the columns; `AuditRow` is what the audit layer fills.
Version 2 added the replication bar and its nulls, the readable-prompt evidence of InvMM, the
unconditional replication rate and the relative M4 shift; version 3 why InvMM stopped
(`invmm_stop_reason`); version 4 the counted evidence of InvMM (`invmm_replicas` of
`invmm_samples`, `invmm_rate_bound`), the start-check screen (`screen_*`), Webster's one-step
confidence and the cascade (`stage`, `selected_by`, `phash`, `url`). Files of older versions read with the newer columns NULL (`memray migrate`
rewrites them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pyarrow as pa

SCHEMA_VERSION = 4
VERDICTS = ("memorized", "not_memorized", "inconclusive")


@dataclass
class AuditRow:
    """Every column of a catalog row; None where a measure did not run or does not apply."""

    # identity
    image_id: str
    image_sha256: str | None = None
    source: str | None = None
    source_offset: int | None = None  # the image's bytes inside `source`'s container (tar member): a ranged read
    source_length: int | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    # model and run
    model: str | None = None
    model_ref: str | None = None
    model_fingerprint: str | None = None
    config_hash: str | None = None
    config: str | None = None
    run_id: str | None = None
    audited_at: str | None = None
    schema_version: int = SCHEMA_VERSION
    # M5 InvMM
    invmm_kl: float | None = None  # mean KL per latent entry at success; null when never replicated (censored)
    invmm_kl_nats: float | None = None  # the same KL summed over the latent: what the verdict's bound uses
    invmm_replicated: bool | None = None
    invmm_steps: int | None = None
    invmm_similarity: float | None = None
    invmm_guidance: float | None = None
    invmm_prompt: str | None = None  # the readable prompt: the argmax tokens of the prompt distribution
    invmm_prompt_init: str | None = None  # where the prompt distribution started: "caption" or "zero"
    invmm_prompt_replicated: bool | None = None  # did invmm_prompt replicate on the successful check's noises
    invmm_stop_reason: str | None = None  # "replicated", "budget", "early_stop" (censored by the calibrated rule)
    invmm_replicas: int | None = None  # replicated: how many of invmm_samples noises of its distribution replicated
    invmm_samples: int | None = None  # fresh noises counted at the successful check (the check's K under "all")
    invmm_rate_bound: float | None = None  # lower bound on how often N(0, I) under its prompt replicates (verdict)
    replicas_png: bytes | None = None  # one PNG strip: the target, then replicas from the InvMM distribution
    # the replication bar (similarity.py): max(threshold, null_content + margin, null_model + margin)
    replication_threshold: float | None = None
    null_content_similarity: float | None = None  # the target against itself with its detail removed
    null_model_similarity: float | None = None  # a high quantile against the model's empty-prompt samples
    uncond_replication_rate: float | None = None  # share of those samples that replicate the image
    # M1-M4 (paper v1)
    z0_error: float | None = None
    wasserstein: float | None = None
    wasserstein_shift_sd: float | None = None
    err_shift_relative: float | None = None  # 1 - err_cond_mean / err_uncond_mean
    err_uncond_mean: float | None = None
    err_cond_mean: float | None = None
    err_uncond_quantiles: list[float] | None = None  # 0%, 1%, ..., 100% of the M4 error samples
    err_cond_quantiles: list[float] | None = None
    soft_prompt_error: float | None = None
    soft_prompt_norm: float | None = None
    noise_ks_p: float | None = None  # regularised inversion with the empty prompt
    noise_kl: float | None = None
    noise_mu_mean: float | None = None
    noise_sigma2_mean: float | None = None
    noise_error: float | None = None
    noise_ks_p_unregularized: float | None = None
    noise_error_unregularized: float | None = None
    hard_prompt: str | None = None
    hard_prompt_error: float | None = None
    hard_prompt_replicated: bool | None = None
    # screens: the start check (InvMM's check at N(0, I) under the caption) and the caption screens
    screen_similarity: float | None = None  # the closest start sample
    screen_progress: float | None = None  # (screen_similarity - null) / (bar - null)
    screen_replicas: int | None = None  # how many of screen_samples fresh start noises replicated
    screen_samples: int | None = None
    screen_guidance: float | None = None  # the scale they were counted at
    screen_flagged: bool | None = None  # the screen sends the image to InvMM
    wen_score: float | None = None
    wen_tokens: str | None = None  # JSON [[token, attribution], ...]
    one_step_confidence: float | None = None  # Webster's denoising confidence of the caption
    # the cascade
    stage: str | None = None  # "screen" (stage 1), "confirm" (stage 2) or "full" (every measure on every image)
    selected_by: str | None = None  # stage 2: "screen" (flagged), "calibration" (a random cleared image), "request"
    phash: str | None = None  # 64-bit perceptual hash (hex) of the image: near-duplicate groups
    url: str | None = None  # where the image was downloaded from (img2dataset's url), when the source says
    # verdict
    verdict: str | None = None
    verdict_rule: str | None = None
    similarity_kind: str | None = None
    # cost
    unet_forwards: int | None = None
    unet_backwards: int | None = None
    seconds: float | None = None
    device: str | None = None
    # outcome
    status: str = "ok"
    error: str | None = None

    def to_dict(self) -> dict:
        """The row as a plain dict, columns in schema order."""
        return dataclasses.asdict(self)


_ARROW_TYPES = {
    "str": pa.string(),
    "int": pa.int64(),
    "float": pa.float64(),
    "bool": pa.bool_(),
    "bytes": pa.binary(),
    "list[float]": pa.list_(pa.float64()),
}


def _arrow_type(annotation: str) -> pa.DataType:
    return _ARROW_TYPES[annotation.split("|")[0].strip()]


ARROW_SCHEMA = pa.schema(
    [
        pa.field(f.name, _arrow_type(f.type), nullable=f.name not in ("image_id", "status"))
        for f in dataclasses.fields(AuditRow)
    ],
    metadata={"memray_schema_version": str(SCHEMA_VERSION)},
)
COLUMNS = tuple(ARROW_SCHEMA.names)


def rows_to_table(rows: list[AuditRow]) -> pa.Table:
    """Rows -> an Arrow table with the catalog schema (types fixed even when a column is all null)."""
    return pa.Table.from_pylist([row.to_dict() for row in rows], schema=ARROW_SCHEMA)
