"""Compare two audited checkpoints image by image, and judge the differences against a policy.

Models are named by their slug (the `model` column, the catalog's partition key: the checkpoint's
folder name and its fingerprint, so two checkpoints never share one): the comparison reads the
`latest` view, so under each slug it takes the newest ok row per image (id and bytes), whatever
audit config produced it; images whose rows come from different audit configs are compared
anyway and counted in a warning, since their scores may not be comparable.

A regression is a change towards "more memorized" under the new model:
- `newly_memorized`: the verdict became `memorized`;
- `newly_replicated`: InvMM never replicated the image under the base model (censored, no KL)
  and did under the new one;
- `kl_regression`: both replicated and the InvMM KL fell (lower = more memorized) by more
  than the policy's absolute and relative thresholds;
- `shift_regression`: the Wasserstein error shift rose by more than the policy's threshold;
- `newly_uncond_replicated`: none of the base model's empty-prompt samples replicated the image
  and some of the new model's do (replication without any prompt, the most severe kind); a base
  row that never measured it (schema 1, or audited without uncond_replication) is no evidence.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from memray.catalog.policy import ComparePolicy
from memray.catalog.reader import Catalog
from memray.errors import CatalogQueryError
from memray.formatting import format_table, printable

_IDS_IN_MESSAGE = 10
_DESCRIPTIONS = {
    "newly_memorized": "newly memorized",
    "newly_replicated": "newly replicated by InvMM, censored under the base model",
    "kl_regression": "whose InvMM KL fell beyond the threshold",
    "shift_regression": "whose Wasserstein error shift rose beyond the threshold",
    "newly_uncond_replicated": "newly replicated from the empty prompt (no prompt needed)",
}


_PAIRS_SQL = """
WITH base AS (SELECT * FROM latest WHERE model = $base),
new AS (SELECT * FROM latest WHERE model = $new),
pairs AS (
    SELECT
        b.image_id,
        b.verdict AS base_verdict,
        n.verdict AS new_verdict,
        b.invmm_kl AS base_invmm_kl,
        n.invmm_kl AS new_invmm_kl,
        n.invmm_kl - b.invmm_kl AS invmm_kl_change,
        b.invmm_replicated AS base_replicated,
        n.invmm_replicated AS new_replicated,
        b.wasserstein_shift_sd AS base_shift_sd,
        n.wasserstein_shift_sd AS new_shift_sd,
        b.uncond_replication_rate AS base_uncond_rate,
        n.uncond_replication_rate AS new_uncond_rate,
        b.config_hash IS DISTINCT FROM n.config_hash AS config_differs
    -- the same image: the same id and bytes (rows of a schema 1 catalog carry no hash: NULL = NULL here)
    FROM base AS b JOIN new AS n
        ON b.image_id = n.image_id AND b.image_sha256 IS NOT DISTINCT FROM n.image_sha256
),
judged AS (
    SELECT *,
        list_filter([
            CASE WHEN new_verdict = 'memorized' AND base_verdict IS DISTINCT FROM 'memorized'
                THEN 'newly_memorized' END,
            CASE WHEN NOT base_replicated AND new_replicated THEN 'newly_replicated' END,
            CASE WHEN ($kl_drop IS NOT NULL OR $kl_drop_rel IS NOT NULL)
                AND ($kl_drop IS NULL OR base_invmm_kl - new_invmm_kl > $kl_drop)
                AND ($kl_drop_rel IS NULL OR base_invmm_kl - new_invmm_kl > $kl_drop_rel * base_invmm_kl)
                THEN 'kl_regression' END,
            CASE WHEN new_shift_sd - base_shift_sd > $shift_rise THEN 'shift_regression' END,
            CASE WHEN base_uncond_rate = 0 AND new_uncond_rate > 0 THEN 'newly_uncond_replicated' END
        ], lambda kind: kind IS NOT NULL) AS regressions
    FROM pairs
)
SELECT * FROM judged
ORDER BY len(regressions) > 0 DESC, invmm_kl_change ASC NULLS LAST, image_id
"""
_ONLY_IN_SQL = """
SELECT image_id FROM (
    SELECT image_id, image_sha256 FROM latest WHERE model = $this
    EXCEPT
    SELECT image_id, image_sha256 FROM latest WHERE model = $other
)
ORDER BY image_id
"""
_MODELS_SQL = "SELECT DISTINCT model FROM latest ORDER BY model"
# The model whose newest ok row is newest; ties broken by name so the answer is stable.
# The model whose newest ok row comes last before the newest ok row of $current: the checkpoint
# audited before it (an ad-hoc audit of an older checkpoint afterwards does not become the base).
_PREVIOUS_SQL = """
WITH newest AS (SELECT model, max(audited_at) AS newest_at FROM latest GROUP BY model)
SELECT model FROM newest WHERE newest_at < (SELECT newest_at FROM newest WHERE model = $current)
ORDER BY newest_at DESC, model DESC LIMIT 1
"""


@dataclass
class Comparison:
    """Per-image changes from model `base` to model `new`, summary counts and policy violations."""

    base: str
    new: str
    policy: ComparePolicy
    changes: pa.Table  # one row per image audited ok under both, regressions first
    only_in_base: list[str]
    only_in_new: list[str]
    counts: dict[str, int]
    violations: list[str]
    warnings: list[str]

    def to_dict(self) -> dict:
        """Everything as plain JSON-able values."""
        return {
            "base": self.base,
            "new": self.new,
            "policy": dataclasses.asdict(self.policy),
            "passed": not self.violations,
            "violations": self.violations,
            "warnings": self.warnings,
            "counts": self.counts,
            "only_in_base": self.only_in_base,
            "only_in_new": self.only_in_new,
            "changes": json.loads(format_table(self.changes, "json")),
        }

    def to_json(self) -> str:
        """The comparison as indented JSON (NaN and infinities as null)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def to_text(self, limit: int | None = 20) -> str:
        """A summary and the first `limit` per-image changes as an aligned table (None: all)."""
        c = self.counts
        lines = [
            f"compare {self.base} -> {self.new}: {c['compared']} images audited under both "
            f"({c['only_in_base']} only under {self.base}, {c['only_in_new']} only under {self.new})",
            f"newly memorized {c['newly_memorized']}, no longer memorized {c['no_longer_memorized']}, "
            f"newly replicated {c['newly_replicated']}, InvMM KL regressions {c['kl_regression']}, "
            f"shift regressions {c['shift_regression']}, newly replicated from the empty prompt "
            f"{c['newly_uncond_replicated']}",
        ]
        if self.changes.num_rows:
            table = self.changes.drop_columns(["base_replicated", "new_replicated", "config_differs"])
            shown = table if limit is None else table.slice(0, limit)
            joined = pc.binary_join(shown.column("regressions"), ",")
            shown = shown.set_column(shown.schema.get_field_index("regressions"), "regressions", joined)
            lines += ["", format_table(shown, "table")]
            if shown.num_rows < table.num_rows:
                lines.append(f"(first {shown.num_rows} of {table.num_rows} images; JSON output lists all)")
        lines += ["", *(f"warning: {w}" for w in self.warnings)]
        lines += [f"VIOLATION: {v}" for v in self.violations] or ["policy: passed"]
        return printable("\n".join(lines), keep_newlines=True)  # model names and ids are data


def _models(con) -> list[str]:
    return [model for (model,) in con.sql(_MODELS_SQL).fetchall()]


def _ids(con, sql: str, **params) -> list[str]:
    return [image_id for (image_id,) in con.sql(sql, params=params).fetchall()]


def _examples(ids: list[str]) -> str:
    more = f", ... ({len(ids) - _IDS_IN_MESSAGE} more)" if len(ids) > _IDS_IN_MESSAGE else ""
    return ", ".join(ids[:_IDS_IN_MESSAGE]) + more


def _violations(policy: ComparePolicy, flagged: dict[str, list[str]], missing: list[str]) -> list[str]:
    limits = policy.limits()
    found = [
        f"{len(ids)} images {_DESCRIPTIONS[kind]} (policy allows {limits[kind]}): {_examples(ids)}"
        for kind, ids in flagged.items()
        if limits[kind] is not None and len(ids) > limits[kind]
    ]
    if policy.max_missing is not None and len(missing) > policy.max_missing:
        found.append(
            f"{len(missing)} images audited ok under the base model have no ok row under the new one "
            f"(policy allows {policy.max_missing}): {_examples(missing)}"
        )
    return found


def compare_models(catalog: Catalog, base: str, new: str, policy: ComparePolicy | None = None) -> Comparison:
    """Compare the latest ok rows of model slugs `base` and `new`, image by image, under `policy` (default: the defaults)."""
    policy = policy or ComparePolicy()
    if base == new:
        raise CatalogQueryError(f"base and new are the same model {base!r}; compare two different model slugs")
    con = catalog.connect()
    try:
        known = _models(con)
        for model in (base, new):
            if model not in known:
                raise CatalogQueryError(
                    f"model {model!r} has no ok rows in catalog {catalog.url}; models: {', '.join(known) or 'none'}"
                )
        params = {
            "base": base,
            "new": new,
            "kl_drop": policy.kl_drop,
            "kl_drop_rel": policy.kl_drop_rel,
            "shift_rise": policy.shift_rise,
        }
        changes = con.sql(_PAIRS_SQL, params=params).to_arrow_table()
        only_in_base = _ids(con, _ONLY_IN_SQL, this=base, other=new)
        only_in_new = _ids(con, _ONLY_IN_SQL, this=new, other=base)
    finally:
        con.close()
    records = changes.to_pylist()
    flagged = {kind: [r["image_id"] for r in records if kind in r["regressions"]] for kind in policy.limits()}
    counts = {
        "compared": len(records),
        "only_in_base": len(only_in_base),
        "only_in_new": len(only_in_new),
        **{kind: len(ids) for kind, ids in flagged.items()},
        "no_longer_memorized": sum(
            r["base_verdict"] == "memorized" and r["new_verdict"] != "memorized" for r in records
        ),
        "config_differs": sum(r["config_differs"] for r in records),
    }
    warnings = []
    if counts["config_differs"]:
        warnings.append(
            f"{counts['config_differs']} images were audited with different configs under {base} and {new}; "
            "their scores may not be comparable"
        )
    return Comparison(
        base=base,
        new=new,
        policy=policy,
        changes=changes,
        only_in_base=only_in_base,
        only_in_new=only_in_new,
        counts=counts,
        violations=_violations(policy, flagged, only_in_base),
        warnings=warnings,
    )


def previous_model(catalog: Catalog, current: str) -> str | None:
    """The model audited before `current` (by newest ok audited_at); None if there is none."""
    con = catalog.connect()
    try:
        found = con.sql(_PREVIOUS_SQL, params={"current": current}).fetchall()
    finally:
        con.close()
    return found[0][0] if found else None
