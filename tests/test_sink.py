"""The catalog sink of a stage, on a real local folder catalog: start (the lease, the journal, the sweep,
the resume keys), write (one row per image), complete (the ledger's judgement) and failed (rows kept,
bookkeeping released). No Ray: the sink runs on the driver."""

from __future__ import annotations

import pytest

from memray.catalog.reader import Catalog
from memray.catalog.schema import AuditRow, rows_to_table
from memray.catalog.writer import CatalogWriter
from memray.distributed.bookkeeping import CrashJournal
from memray.distributed.sink import CatalogSink
from memray.errors import CatalogLeaseError


def _rows(*keys: tuple[str, str], status: str = "ok"):
    return rows_to_table(
        [
            AuditRow(
                image_id=image_id,
                image_sha256=sha,
                model="m",
                model_fingerprint="fp",
                config_hash="cfg",
                status=status,
                audited_at="2026-11-01",
            )  # fmt: skip
            for image_id, sha in keys
        ]
    )


def _sink(catalog, run_id: str, **options) -> CatalogSink:
    options = {"rows_per_file": 2, "flush_seconds": 3600, "retry_errors": False, **options}
    return CatalogSink(str(catalog), "fp", "cfg", run_id, **options)


def _ids(catalog) -> list[str]:
    return [r["image_id"] for r in Catalog(str(catalog)).query("SELECT image_id FROM audits ORDER BY 1").to_pylist()]


def test_start_takes_the_lease_clears_old_markers_sweeps_killed_runs_and_says_what_resume_skips(tmp_path):
    with CatalogWriter(tmp_path) as writer:
        writer.add_table(_rows(("done", "h0")))
        writer.add_table(_rows(("failed", "h1"), status="error"))
    CrashJournal(str(tmp_path), "fp", "cfg", "earlier-run").mark(("x", "h"), 0)
    (tmp_path / "_runs" / "killed-run").mkdir(parents=True)
    sink = _sink(tmp_path, "run-1")
    assert sink.start() == {("done", "h0"), ("failed", "h1")}  # an error row counts unless --retry-errors
    try:
        assert not (tmp_path / "_inflight" / "fp-cfg").exists() and not (tmp_path / "_runs" / "killed-run").exists()
        with pytest.raises(CatalogLeaseError, match="run run-1"):
            _sink(tmp_path, "run-2").start()
    finally:
        sink.failed()
    retrying = _sink(tmp_path, "run-3", retry_errors=True)
    assert retrying.start() == {("done", "h0")}
    retrying.failed()


def test_write_keeps_one_row_per_image_and_complete_judges_the_stage_by_its_ledger(tmp_path):
    sink = _sink(tmp_path, "run-1")
    sink.start()
    sink.ledger.record("shard-a", [("a", "h1"), ("b", "h2"), ("c", "h3")], [("old", "h0")])
    sink.ledger.record("shard-b", [("a", "h1")], [])  # the same image read from a second unit
    assert sink.write(_rows(("a", "h1"), ("b", "h2"))).num_rows == 2
    assert sink.write(_rows(("a", "h1"))).num_rows == 0  # audited twice, written once
    assert _ids(tmp_path) == ["a", "b"]  # two rows: a file was written as they came
    outcome = sink.complete(["shard-a", "shard-b", "shard-c"])
    assert outcome.unfinished == ["c", "unit: shard-c"]  # read without a row; a unit never read to its end
    assert outcome.skipped == 1 and outcome.population == {("a", "h1"), ("b", "h2"), ("c", "h3"), ("old", "h0")}
    assert len(outcome.files) == 1
    assert not (tmp_path / "_runs" / "run-1").exists() and not list((tmp_path / "_runs").glob("lease-*"))


def test_a_stage_that_fails_keeps_the_rows_received_and_releases_the_catalog(tmp_path):
    sink = _sink(tmp_path, "run-1")
    sink.start()
    sink.ledger.record("shard-a", [("a", "h1")], [])
    sink.write(_rows(("a", "h1")))  # buffered: fewer rows than a file holds
    assert not list(tmp_path.glob("model=*/*.parquet"))
    sink.failed()
    assert _ids(tmp_path) == ["a"]
    assert not (tmp_path / "_runs" / "run-1").exists()
    again = _sink(tmp_path, "run-2")
    assert again.start() == {("a", "h1")}  # the lease is free, and the rerun resumes
    again.complete([])
