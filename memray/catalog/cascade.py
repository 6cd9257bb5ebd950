"""The cascade's side of the catalog: selection tables, and the run summary with the screen's recall.

A cascade run writes one selection table when its screen has seen every image:
`{root}/cascade/model={slug}/selection-{UTC timestamp}-{run_id}.parquet`, one row per screened image
(why it went to stage 2 or not, its calibration draw and rate, its near-duplicate group), with the
prefixes the run could read and its options in the file's metadata. Stage 2's rows are ordinary catalog rows
(`stage = 'confirm'`, `selected_by`). Views (reader.py): `selections` (every selection row) and
`cascade` (each image's newest selection with its screen row and its newest confirmed verdict).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.parquet as pq

from memray.catalog.files import open_fs, parquet_bytes, put_atomic

if TYPE_CHECKING:  # the recall's statistics load scipy: only a summary needs them, not every query
    from memray.cascade.recall import RecallEstimate
    from memray.cascade.selection import Selection

SELECTION_VERSION = 1
SELECTION_FOLDER = "cascade"
SELECTION_SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("model", pa.string(), nullable=False),
        pa.field("model_fingerprint", pa.string()),
        pa.field("screen_config_hash", pa.string()),
        pa.field("confirm_config_hash", pa.string()),
        pa.field("created_at", pa.string()),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image_sha256", pa.string()),
        pa.field("flagged", pa.bool_()),
        pa.field("screen_progress", pa.float64()),
        pa.field("calibration_draw", pa.float64()),
        pa.field("calibration_rate", pa.float64()),
        pa.field("selected_by", pa.string()),
        pa.field("dup_group", pa.string()),
        pa.field("dup_count", pa.int64()),
        pa.field("confirmed_via", pa.string()),
    ],
    metadata={"memray_selection_version": str(SELECTION_VERSION)},
)

# Each image's newest selection, its screen row and its newest stage-2 (or full-chain) ok row.
CASCADE_VIEW_SQL = """
CREATE VIEW cascade AS
WITH sel AS (
    SELECT * FROM selections
    QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256, model ORDER BY created_at DESC, run_id DESC) = 1
), screen AS (
    SELECT * FROM audits WHERE status = 'ok' AND stage = 'screen'
    QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256, model ORDER BY audited_at DESC, run_id DESC) = 1
), confirmed AS (
    SELECT * FROM audits WHERE status = 'ok' AND stage IN ('confirm', 'full')
    QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256, model ORDER BY audited_at DESC, run_id DESC) = 1
)
SELECT sel.run_id, sel.model, sel.image_id, sel.image_sha256, screen.caption, screen.url, screen.source,
    sel.flagged, sel.screen_progress, screen.screen_replicas, screen.screen_samples, screen.uncond_replication_rate,
    sel.selected_by, sel.calibration_rate, sel.dup_group, sel.dup_count, sel.confirmed_via,
    screen.verdict AS screen_verdict, confirmed.verdict AS confirmed_verdict, confirmed.selected_by AS confirmed_as,
    confirmed.invmm_kl_nats, confirmed.invmm_rate_bound, confirmed.verdict_rule AS confirmed_rule,
    coalesce(confirmed.verdict, screen.verdict) AS verdict
FROM sel
LEFT JOIN screen ON screen.image_id = sel.image_id AND screen.image_sha256 IS NOT DISTINCT FROM sel.image_sha256
    AND screen.model = sel.model
LEFT JOIN confirmed ON confirmed.image_id = sel.image_id
    AND confirmed.image_sha256 IS NOT DISTINCT FROM sel.image_sha256 AND confirmed.model = sel.model
"""


def write_selection(
    catalog_url: str,
    rows: list[Selection],
    *,
    run_id: str,
    model: str,
    model_fingerprint: str,
    screen_config_hash: str,
    confirm_config_hash: str,
    allowed: list[str],
    options: dict,
) -> str:
    """Write a run's selection table in one atomic step; returns its path."""
    created = dt.datetime.now(dt.UTC)
    common = dict(
        run_id=run_id,
        model=model,
        model_fingerprint=model_fingerprint,
        screen_config_hash=screen_config_hash,
        confirm_config_hash=confirm_config_hash,
        created_at=created.isoformat(timespec="seconds"),
    )
    table = pa.Table.from_pylist([{**common, **asdict(row)} for row in rows], schema=SELECTION_SCHEMA)
    # where stage 2 may read the run's images again (memray confirm, long after the run's flags are gone)
    metadata = {
        **SELECTION_SCHEMA.metadata,
        b"memray_allowed": json.dumps(allowed),
        b"memray_options": json.dumps(options),
    }
    table = table.replace_schema_metadata(metadata)
    fs, root = open_fs(catalog_url)
    path = f"{root}/{SELECTION_FOLDER}/model={model}/selection-{created.strftime('%Y%m%dT%H%M%S%fZ')}-{run_id}.parquet"
    put_atomic(fs, path, parquet_bytes(table))
    return path


@dataclass
class CascadeSummary:
    """What one cascade run screened, sent to stage 2 and found, and the screen's recall."""

    run_id: str
    model: str
    screened: int
    flagged: int
    flagged_confirmed: int
    flagged_via_group: int  # flagged images confirmed through their group's representative
    cleared: int
    calibration_rate: float
    calibration_selected: int
    calibration_confirmed: int
    requested: int  # cleared images confirmed on request (memray confirm --top / --threshold)
    memorized_by_screen: int
    memorized_in_calibration: int
    memorized_on_request: int
    recall: RecallEstimate

    def lines(self) -> list[str]:
        """The summary as a few lines for a terminal or a job log."""
        pending = self.flagged - self.flagged_confirmed - self.flagged_via_group
        return [
            f"cascade run {self.run_id} ({self.model}): {self.screened} images screened, {self.flagged} flagged "
            f"({self.flagged_confirmed} confirmed, {self.flagged_via_group} via their group, {pending} not yet)",
            f"  calibration: {self.calibration_confirmed} of {self.calibration_selected} sampled cleared images confirmed "
            f"(rate {self.calibration_rate:.3g} of {self.cleared}); {self.requested} more confirmed on request",
            f"  memorized: {self.memorized_by_screen} flagged by the screen, {self.memorized_in_calibration} in the "
            f"calibration sample, {self.memorized_on_request} among those requested",
            f"  screen {self.recall.statement()}",
        ]


_SCREENED_SQL = """
SELECT image_id, image_sha256, screen_flagged, screen_progress, phash, source, source_offset, source_length,
    caption, url
FROM audits JOIN population USING (image_id, image_sha256)
WHERE status = 'ok' AND stage = 'screen' AND model_fingerprint = $fingerprint AND config_hash = $config_hash
QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256 ORDER BY audited_at DESC, run_id DESC) = 1
ORDER BY image_id, image_sha256
"""


def screened_rows(catalog, fingerprint: str, config_hash: str, keys: set[tuple[str, str | None]]) -> list[dict]:
    """The newest ok screen row of each (image_id, image_sha256) in `keys`, as dicts (the selection's input
    and where stage 2 finds each image again)."""
    population = pa.table(
        {"image_id": [k[0] for k in keys], "image_sha256": [k[1] for k in keys]},
        schema=pa.schema([("image_id", pa.string()), ("image_sha256", pa.string())]),
    )
    con = catalog.connect()
    try:
        con.register("population", population)
        result = con.sql(_SCREENED_SQL, params={"fingerprint": fingerprint, "config_hash": config_hash})
        return result.to_arrow_table().to_pylist()
    finally:
        con.close()


_RUN_SQL = """
SELECT sel.flagged, sel.selected_by, sel.confirmed_via, sel.calibration_rate, confirmed.verdict, confirmed.selected_by AS confirmed_as
FROM selections AS sel
LEFT JOIN (
    SELECT * FROM audits WHERE status = 'ok' AND stage IN ('confirm', 'full') AND model = $model
    QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256 ORDER BY audited_at DESC, run_id DESC) = 1
) AS confirmed ON confirmed.image_id = sel.image_id AND confirmed.image_sha256 IS NOT DISTINCT FROM sel.image_sha256
WHERE sel.run_id = $run_id AND sel.model = $model
"""
_LAST_RUN_SQL = "SELECT run_id, model FROM selections {where} ORDER BY created_at DESC, run_id DESC LIMIT 1"


def _newest_run(con, where: str, params: dict) -> tuple[str, str] | None:
    """(run_id, model) of the newest selection table matching `where`, or None."""
    rows = con.execute(_LAST_RUN_SQL.format(where=where), params).fetchall()
    return rows[0] if rows else None


def cascade_summary(catalog, *, model: str | None = None, run_id: str | None = None, confidence: float = 0.95):
    """The summary of a cascade run (the newest, of `model` if given), or None where none ran."""
    con = catalog.connect()
    try:
        where = "WHERE " + " AND ".join(
            f"{name} = ${name}" for name, value in (("model", model), ("run_id", run_id)) if value is not None
        )
        params = {name: value for name, value in (("model", model), ("run_id", run_id)) if value is not None}
        found = _newest_run(con, where if params else "", params)
        if found is None:
            return None
        run_id, model = found
        rows = con.sql(_RUN_SQL, params={"run_id": run_id, "model": model}).to_arrow_table().to_pylist()
    finally:
        con.close()
    return summarize(run_id, model, rows, confidence)


def summarize(run_id: str, model: str, rows: list[dict], confidence: float) -> CascadeSummary:
    """Count a run's selection rows, each with its confirmed verdict (None: not confirmed) and how it was."""
    from memray.cascade.recall import Stratum, screen_recall

    flagged = [r for r in rows if r["flagged"]]
    cleared = [r for r in rows if not r["flagged"]]
    calibration = [r for r in cleared if r["selected_by"] == "calibration"]
    sampled = [r for r in calibration if r["verdict"] is not None]
    requested = [r for r in cleared if r["selected_by"] != "calibration" and r["verdict"] is not None]
    confirmed_flagged = [r for r in flagged if r["verdict"] is not None]

    def memorized(group: list[dict]) -> int:
        return sum(r["verdict"] == "memorized" for r in group)

    rate = cleared[0]["calibration_rate"] if cleared else 0.0
    stratum = Stratum(len(cleared) - len(requested), len(sampled), memorized(sampled), rate)
    return CascadeSummary(
        run_id=run_id,
        model=model,
        screened=len(rows),
        flagged=len(flagged),
        flagged_confirmed=len(confirmed_flagged),
        flagged_via_group=sum(r["confirmed_via"] is not None and r["verdict"] is None for r in flagged),
        cleared=len(cleared),
        calibration_rate=rate,
        calibration_selected=len(calibration),
        calibration_confirmed=len(sampled),
        requested=len(requested),
        memorized_by_screen=memorized(confirmed_flagged),
        memorized_in_calibration=memorized(sampled),
        memorized_on_request=memorized(requested),
        recall=screen_recall(memorized(confirmed_flagged), memorized(requested), [stratum], confidence),
    )


_SELECTION_SQL = """
SELECT sel.image_id, sel.image_sha256, sel.flagged, sel.selected_by, sel.screen_progress, screen.source,
    screen.source_offset, screen.source_length, screen.caption, screen.url, confirmed.image_id IS NOT NULL AS confirmed
FROM selections AS sel
JOIN (
    SELECT * FROM audits WHERE status = 'ok' AND stage = 'screen' AND model = $model
    QUALIFY row_number() OVER (PARTITION BY image_id, image_sha256 ORDER BY audited_at DESC, run_id DESC) = 1
) AS screen ON screen.image_id = sel.image_id AND screen.image_sha256 IS NOT DISTINCT FROM sel.image_sha256
LEFT JOIN (
    SELECT DISTINCT image_id, image_sha256 FROM audits WHERE status = 'ok' AND stage IN ('confirm', 'full') AND model = $model
) AS confirmed ON confirmed.image_id = sel.image_id AND confirmed.image_sha256 IS NOT DISTINCT FROM sel.image_sha256
WHERE sel.run_id = $run_id AND sel.model = $model
"""


def selection_run(catalog, model: str, run_id: str | None = None) -> tuple[str, list[dict], list[str]]:
    """A cascade run's selection (the newest of `model` unless `run_id`): (run id, its rows joined with
    where each image was screened and whether it was confirmed since, the prefixes it may be read from).

    Raises LookupError where the catalog holds no such run.
    """
    con = catalog.connect()
    try:
        params = {"model": model} | ({"run_id": run_id} if run_id else {})
        where = "WHERE model = $model" + (" AND run_id = $run_id" if run_id else "")
        found = _newest_run(con, where, params)
        if found is None:
            raise LookupError(f"no cascade run of model {model}" + (f" with run id {run_id}" if run_id else ""))
        run_id = found[0]
        rows = con.sql(_SELECTION_SQL, params={"model": model, "run_id": run_id}).to_arrow_table().to_pylist()
    finally:
        con.close()
    (path,) = [p for p in catalog.selection_files() if p.endswith(f"-{run_id}.parquet")]
    with catalog.fs.open(path, "rb") as handle:
        metadata = pq.read_schema(handle).metadata or {}
    return run_id, rows, json.loads(metadata.get(b"memray_allowed", b"[]"))
