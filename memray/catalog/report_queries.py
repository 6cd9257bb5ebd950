"""The catalog queries behind the HTML report: summaries, score distributions, the most memorized images.

Everything is read from one DuckDB connection over the views `audits` and `latest`; the large
per-image artifacts (`replicas_png`, the error quantiles) are fetched only for the few images shown.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from memray.catalog.compare import previous_model
from memray.catalog.reader import Catalog

# Most memorized first: replicated from the empty prompt (the most severe kind), then replicated
# by InvMM with the lowest KL, then the largest Wasserstein shift.
_RANK = "coalesce(uncond_replication_rate, 0) DESC, invmm_kl IS NULL, invmm_kl, wasserstein_shift_sd DESC NULLS LAST, image_id"

_MODELS_SQL = """
WITH rows AS (
    SELECT model,
        count(*) AS rows,
        count(*) FILTER (WHERE status <> 'ok') AS error_rows,
        count(DISTINCT run_id) AS runs,
        min(audited_at) AS first_audited,
        max(audited_at) AS last_audited,
        CAST(sum(unet_forwards) AS BIGINT) AS unet_forwards,
        CAST(sum(unet_backwards) AS BIGINT) AS unet_backwards,
        sum(seconds) AS seconds
    FROM audits GROUP BY model
),
images AS (
    SELECT model,
        count(*) AS images,
        count(*) FILTER (WHERE verdict = 'memorized') AS memorized,
        count(*) FILTER (WHERE verdict = 'not_memorized') AS not_memorized,
        count(*) FILTER (WHERE verdict = 'inconclusive') AS inconclusive,
        count(*) FILTER (WHERE invmm_replicated) AS replicated,
        count(*) FILTER (WHERE NOT invmm_replicated) AS censored
    FROM latest GROUP BY model
)
SELECT rows.*, coalesce(images, 0) AS images, coalesce(memorized, 0) AS memorized,
    coalesce(not_memorized, 0) AS not_memorized, coalesce(inconclusive, 0) AS inconclusive,
    coalesce(replicated, 0) AS replicated, coalesce(censored, 0) AS censored
FROM rows LEFT JOIN images USING (model)
ORDER BY last_audited DESC NULLS LAST, model
"""
_RUNS_SQL = """
SELECT run_id, model, min(audited_at) AS started, max(audited_at) AS finished, count(*) AS rows,
    count(*) FILTER (WHERE status <> 'ok') AS errors, CAST(sum(unet_forwards + unet_backwards) AS BIGINT) AS unet_evaluations
FROM audits GROUP BY run_id, model
ORDER BY started DESC NULLS LAST, run_id
"""
# Images with no ok row under a model: their newest error explains why.
_ERRORS_SQL = """
SELECT model, image_id, error, audited_at FROM audits AS a
WHERE status <> 'ok' AND NOT EXISTS (
    SELECT 1 FROM latest AS l
    WHERE l.model = a.model AND l.image_id = a.image_id AND l.image_sha256 IS NOT DISTINCT FROM a.image_sha256
)
QUALIFY row_number() OVER (PARTITION BY model, image_id ORDER BY audited_at DESC NULLS LAST, run_id DESC NULLS LAST) = 1
ORDER BY audited_at DESC NULLS LAST, model, image_id
"""
_SCORES_SQL = "SELECT model, invmm_kl, wasserstein_shift_sd FROM latest WHERE invmm_kl IS NOT NULL OR wasserstein_shift_sd IS NOT NULL"
_NEWEST_SQL = "SELECT model FROM audits GROUP BY model ORDER BY max(audited_at) DESC NULLS LAST, model DESC LIMIT 1"
_TOP_SQL = f"""
SELECT image_id, caption, verdict, verdict_rule, invmm_kl, invmm_replicated, invmm_similarity, invmm_guidance,
    invmm_prompt, invmm_prompt_replicated, replication_threshold, uncond_replication_rate, wasserstein_shift_sd,
    err_shift_relative, similarity_kind, replicas_png
FROM latest WHERE model = $model ORDER BY {_RANK} LIMIT $top
"""
_ERROR_QUANTILES_SQL = f"""
SELECT image_id, caption, wasserstein, wasserstein_shift_sd, err_uncond_quantiles, err_cond_quantiles
FROM latest WHERE model = $model AND err_uncond_quantiles IS NOT NULL AND err_cond_quantiles IS NOT NULL
ORDER BY {_RANK} LIMIT 1
"""


# The rows runs wrote, one per image: a cascade's confirmed row in place of its screen row.
_RUN_SQL = f"""
SELECT * FROM audits WHERE list_contains($run_ids, run_id)
QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256 ORDER BY stage IS NOT DISTINCT FROM 'screen') = 1
ORDER BY status <> 'ok', {_RANK}
"""
_STATUS_SQL = f"""
WITH models AS ({_MODELS_SQL}),
failed AS (SELECT model, count(*) AS failed FROM ({_ERRORS_SQL}) GROUP BY model)
SELECT model, images, memorized, inconclusive, not_memorized, coalesce(failed, 0) AS failed, runs,
    last_audited, unet_forwards + unet_backwards AS unet_evaluations
FROM models LEFT JOIN failed USING (model)
ORDER BY last_audited DESC NULLS LAST, model
"""


def catalog_status(catalog: Catalog) -> tuple[pa.Table, dict | None]:
    """Per model (newest first): images, verdict counts, images without an ok row, runs, last audit,
    UNet evaluations; and the newest run."""
    con = catalog.connect()
    try:
        runs = _records(con, _RUNS_SQL)
        return con.sql(_STATUS_SQL).to_arrow_table(), runs[0] if runs else None
    finally:
        con.close()


def run_rows(catalog: Catalog, *run_ids: str) -> list[dict]:
    """One row per image the runs wrote (a cascade's two stages: the confirmed row where there is one),
    most memorized first (the report's ranking), errors last."""
    con = catalog.connect()
    try:
        return _records(con, _RUN_SQL, run_ids=list(run_ids))
    finally:
        con.close()


@dataclass
class ScoreValues:
    """One model's score distributions over its latest ok rows."""

    invmm_kl: list[float]
    censored: int  # InvMM never replicated: no KL
    shift_sd: list[float]


@dataclass
class ReportData:
    """What the report shows, as plain row dicts keyed by column name."""

    models: list[dict]  # per model: rows, errors, runs, times, verdict counts, UNet cost; newest first
    runs: list[dict]  # newest first
    errors: list[dict]  # images with no ok row under a model, with their newest error; newest first
    scores: dict[str, ScoreValues]
    model: str | None  # the model whose images are ranked
    previous: str | None  # the model audited before it
    top: list[dict]  # its most memorized images, with replicas_png
    error_quantiles: dict | None  # its most memorized image that has the M4 error quantiles


def _records(con, sql: str, **params) -> list[dict]:
    return con.sql(sql, params=params or None).to_arrow_table().to_pylist()


def _scores(con, models: list[dict]) -> dict[str, ScoreValues]:
    scores = {m["model"]: ScoreValues([], m["censored"], []) for m in models}
    for model, kl, shift in con.sql(_SCORES_SQL).fetchall():
        if kl is not None:
            scores[model].invmm_kl.append(kl)
        if shift is not None:
            scores[model].shift_sd.append(shift)
    return scores


def report_data(catalog: Catalog, *, model: str | None = None, top: int = 10) -> ReportData:
    """Everything the report shows; `model` (default: the most recently audited) is the one ranked."""
    con = catalog.connect()
    try:
        models = _records(con, _MODELS_SQL)
        if model is None:
            newest = con.sql(_NEWEST_SQL).fetchall()
            model = newest[0][0] if newest else None
        quantiles = _records(con, _ERROR_QUANTILES_SQL, model=model)
        return ReportData(
            models=models,
            runs=_records(con, _RUNS_SQL),
            errors=_records(con, _ERRORS_SQL),
            scores=_scores(con, models),
            model=model,
            previous=previous_model(catalog, model) if model else None,
            top=_records(con, _TOP_SQL, model=model, top=top),
            error_quantiles=quantiles[0] if quantiles else None,
        )
    finally:
        con.close()
