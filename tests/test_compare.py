"""Comparing two audited models: real Parquet catalogs read through DuckDB, and `memray compare`."""

from __future__ import annotations

import json

import pytest

from memray.catalog.compare import ComparePolicy, compare_models, previous_model
from memray.catalog.reader import Catalog
from memray.catalog.schema import AuditRow
from memray.catalog.writer import CatalogWriter
from memray.cli import main
from memray.errors import CatalogQueryError

BASE, NEW = "ckpt-001", "ckpt-002"
OFF = ["--kl-drop-rel", "off", "--max-newly-memorized", "off", "--max-newly-replicated", "off"]


def row(
    image_id,
    model,
    *,
    kl=None,
    verdict="not_memorized",
    shift=None,
    uncond=None,
    at="2026-11-01",
    config="cfg",
    status="ok",
):
    """An audit row; `kl` None means InvMM never replicated the image (censored)."""
    return AuditRow(
        image_id=image_id,
        model=model,
        model_fingerprint=f"fp-{model}",
        config_hash=config,
        audited_at=at,
        status=status,
        invmm_kl=kl,
        invmm_replicated=kl is not None,
        wasserstein_shift_sd=shift,
        uncond_replication_rate=uncond,
        verdict=verdict if status == "ok" else None,
    )


def write_catalog(path, rows) -> Catalog:
    with CatalogWriter(path) as writer:
        writer.add(rows)
    return Catalog(path)


def pair(image_id, base: dict, new: dict) -> list[AuditRow]:
    """The same image audited under BASE (a day earlier) and NEW."""
    return [row(image_id, BASE, at="2026-11-01", **base), row(image_id, NEW, at="2026-11-02", **new)]


@pytest.fixture
def catalog(tmp_path):
    """One image of each kind of change between BASE and NEW."""
    return write_catalog(
        tmp_path / "catalog",
        [
            *pair("same", {}, {}),
            *pair("memorized", {"kl": 1.0, "verdict": "inconclusive"}, {"kl": 0.3, "verdict": "memorized"}),
            *pair("replicated", {}, {"kl": 2.0, "verdict": "inconclusive"}),
            *pair("improved", {"kl": 0.2, "verdict": "memorized"}, {}),
            row("gone", BASE),
            row("fresh", NEW),
            *pair("errored", {}, {"status": "error"}),
        ],
    )


def regressions(comparison) -> dict[str, list[str]]:
    return {r["image_id"]: r["regressions"] for r in comparison.changes.to_pylist()}


def test_each_kind_of_change_is_found(catalog):
    comparison = compare_models(catalog, BASE, NEW)
    assert regressions(comparison) == {
        "memorized": ["newly_memorized", "kl_regression"],
        "replicated": ["newly_replicated"],
        "improved": [],
        "same": [],
    }
    assert comparison.changes.column("image_id").to_pylist()[:2] == ["memorized", "replicated"]  # regressions first
    assert comparison.only_in_base == ["errored", "gone"]  # an error row under NEW is no ok row
    assert comparison.only_in_new == ["fresh"]
    assert comparison.counts == {
        "compared": 4,
        "only_in_base": 2,
        "only_in_new": 1,
        "newly_memorized": 1,
        "newly_replicated": 1,
        "kl_regression": 1,
        "shift_regression": 0,
        "newly_uncond_replicated": 0,
        "no_longer_memorized": 1,
        "config_differs": 0,
    }
    assert len(comparison.violations) == 3 and not comparison.warnings
    assert "1 images newly memorized (policy allows 0): memorized" in comparison.violations


def test_replication_from_the_empty_prompt_is_a_regression_of_its_own(tmp_path):
    catalog = write_catalog(
        tmp_path / "catalog",
        [
            *pair("unprompted", {"kl": 0.0, "uncond": 0.0}, {"kl": 0.0, "uncond": 0.25}),
            *pair("already", {"kl": 0.0, "uncond": 0.1}, {"kl": 0.0, "uncond": 0.5}),
            *pair("old-catalog", {"kl": 0.0}, {"kl": 0.0, "uncond": 0.0}),  # a schema 1 row has no rate
        ],
    )
    comparison = compare_models(catalog, BASE, NEW)
    assert regressions(comparison) == {"unprompted": ["newly_uncond_replicated"], "already": [], "old-catalog": []}
    assert comparison.violations == [
        "1 images newly replicated from the empty prompt (no prompt needed) (policy allows 0): unprompted"
    ]
    allowed = compare_models(catalog, BASE, NEW, ComparePolicy(max_newly_uncond_replicated=1))
    assert not allowed.violations


def test_comparison_reads_the_latest_row_per_image(tmp_path):
    catalog = write_catalog(
        tmp_path / "catalog",
        [
            *pair("x", {}, {"kl": 0.1, "verdict": "memorized"}),
            row("x", NEW, at="2026-11-03", config="cfg-2"),  # audited again later: not replicated
        ],
    )
    comparison = compare_models(catalog, BASE, NEW)
    assert regressions(comparison) == {"x": []} and not comparison.violations
    assert comparison.counts["config_differs"] == 1
    assert "different configs" in comparison.warnings[0]


@pytest.mark.parametrize(
    ("policy", "regressed"),
    [
        (ComparePolicy(kl_drop=0.24, kl_drop_rel=None), True),  # 1.0 -> 0.75 fell by 0.25 (25%)
        (ComparePolicy(kl_drop=0.26, kl_drop_rel=None), False),
        (ComparePolicy(kl_drop_rel=0.24), True),
        (ComparePolicy(kl_drop_rel=0.26), False),
        (ComparePolicy(kl_drop=0.24, kl_drop_rel=0.24), True),
        (ComparePolicy(kl_drop=0.24, kl_drop_rel=0.26), False),  # every threshold set must be exceeded
        (ComparePolicy(kl_drop=0.26, kl_drop_rel=0.24), False),
        (ComparePolicy(kl_drop=None, kl_drop_rel=None), False),
    ],
)
def test_kl_drop_thresholds(tmp_path, policy, regressed):
    catalog = write_catalog(
        tmp_path / "catalog",
        [*pair("a", {"kl": 1.0, "verdict": "inconclusive"}, {"kl": 0.75, "verdict": "inconclusive"})],
    )
    comparison = compare_models(catalog, BASE, NEW, policy)
    assert comparison.counts["kl_regression"] == int(regressed)
    assert bool(comparison.violations) == regressed


@pytest.mark.parametrize(("shift_rise", "regressed"), [(2.9, True), (3.1, False), (None, False)])
def test_shift_rise_threshold(tmp_path, shift_rise, regressed):
    catalog = write_catalog(tmp_path / "catalog", pair("a", {"shift": 2.0}, {"shift": 5.0}))
    comparison = compare_models(catalog, BASE, NEW, ComparePolicy(shift_rise=shift_rise))
    assert comparison.counts["shift_regression"] == int(regressed)
    assert bool(comparison.violations) == regressed


@pytest.mark.parametrize(
    ("policy", "violations"),
    [
        (ComparePolicy(max_newly_memorized=1, max_newly_replicated=1, max_kl_regressions=1), 0),
        (ComparePolicy(max_newly_memorized=1, max_newly_replicated=1, max_kl_regressions=1, max_missing=2), 0),
        (ComparePolicy(max_newly_memorized=1, max_newly_replicated=1, max_kl_regressions=1, max_missing=1), 1),
        (ComparePolicy(max_newly_memorized=None, max_newly_replicated=None, kl_drop_rel=None), 0),
    ],
)
def test_count_limits(catalog, policy, violations):
    assert len(compare_models(catalog, BASE, NEW, policy).violations) == violations


def test_previous_model_is_the_one_audited_before(tmp_path):
    catalog = write_catalog(
        tmp_path / "catalog",
        [row("a", "old", at="2026-10-01"), row("a", "older", at="2026-09-01"), row("a", "now", at="2026-11-01")],
    )
    assert previous_model(catalog, "now") == "old"
    assert previous_model(catalog, "old") == "older"  # not "now", audited after it
    assert previous_model(catalog, "older") is None
    assert previous_model(write_catalog(tmp_path / "one", [row("a", "now")]), "now") is None
    assert previous_model(Catalog(tmp_path / "empty"), "now") is None


def test_unknown_or_identical_models_are_refused(catalog):
    with pytest.raises(CatalogQueryError, match="'nope' has no ok rows"):
        compare_models(catalog, BASE, "nope")
    with pytest.raises(CatalogQueryError, match="same model"):
        compare_models(catalog, BASE, BASE)
    with pytest.raises(ValueError, match="max_missing"):
        ComparePolicy(max_missing=-1)


def test_cli_table_output_and_exit_codes(catalog, capsys):
    assert main(["compare", catalog.url, "--base", BASE, "--new", NEW]) == 1
    out = capsys.readouterr().out
    assert "VIOLATION: 1 images newly memorized" in out
    assert "newly_memorized,kl_regression" in out and "(4 rows)" in out

    assert main(["compare", catalog.url, "--base", BASE, "--new", NEW, *OFF]) == 0
    assert "policy: passed" in capsys.readouterr().out

    assert main(["compare", catalog.url, "--base", BASE, "--new", NEW, "--limit", "1"]) == 1
    assert "(first 1 of 4 images" in capsys.readouterr().out


def test_cli_json_output_parses(catalog, capsys, tmp_path):
    out_file = tmp_path / "compare.json"
    code = main(["compare", catalog.url, "--base", BASE, "--new", NEW, "--format", "json", "--out", str(out_file)])
    assert code == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out_file.read_text())
    assert printed["passed"] is False and len(printed["violations"]) == 3
    assert printed["counts"]["compared"] == 4 and len(printed["changes"]) == 4
    changed = {c["image_id"]: c for c in printed["changes"]}
    assert changed["replicated"]["base_invmm_kl"] is None and changed["replicated"]["new_invmm_kl"] == 2.0
    assert printed["policy"]["kl_drop_rel"] == 0.5


@pytest.mark.parametrize(("flag", "code"), [("0.69", 1), ("0.71", 0)])
def test_cli_policy_flags(catalog, capsys, flag, code):
    # "memorized" fell from 1.0 to 0.3: by 0.7 absolute, 70% relative
    argv = ["compare", catalog.url, "--base", BASE, "--new", NEW, *OFF, "--kl-drop", flag, "--kl-drop-rel", "0.5"]
    assert main(argv) == code


def test_cli_usage_errors(catalog, capsys):
    assert main(["compare", catalog.url, "--base", BASE, "--new", "nope"]) == 2
    assert "has no ok rows" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["compare", catalog.url, "--base", BASE, "--new", NEW, "--max-newly-memorized", "-1"])
    assert exc.value.code == 2
