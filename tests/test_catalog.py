"""The catalog: atomic Parquet appends per model partition, DuckDB views, read-only queries, resume keys.

Runs on the local filesystem, fsspec's memory filesystem and a real S3-compatible server on
loopback (moto, tests/s3server.py).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from memray.catalog import files as catalog_files
from memray.catalog.files import open_fs, write_parquet
from memray.catalog.reader import Catalog
from memray.catalog.schema import ARROW_SCHEMA, COLUMNS, AuditRow
from memray.catalog.writer import CatalogWriter
from memray.distributed.bookkeeping import CrashJournal
from memray.errors import CatalogQueryError
from memray.formatting import format_table

pytest_plugins = ["s3server"]  # fixtures s3_server, s3_endpoint, s3_bucket (tests/s3server.py)

PART_NAME = re.compile(r"^part-\d{8}T\d{12}Z-[0-9a-f]{8}\.parquet$")


def row(
    image_id,
    *,
    model="sd-a",
    fingerprint="fp-a",
    config="cfg-1",
    run="run-1",
    at="2026-11-01T00:00:00+00:00",
    status="ok",
    kl=0.5,
):
    return AuditRow(
        image_id=image_id,
        model=model,
        model_fingerprint=fingerprint,
        config_hash=config,
        run_id=run,
        audited_at=at,
        status=status,
        invmm_kl=kl if status == "ok" else None,
        error="boom" if status == "error" else None,
    )


def write(url, rows, **kwargs):
    with CatalogWriter(url, **kwargs) as writer:
        writer.add(rows)
    return writer


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


# --- writer ---------------------------------------------------------------------------------


def test_writer_flushes_when_target_rows_reached(tmp_path):
    writer = CatalogWriter(tmp_path / "cat", target_rows=3, max_seconds=3600)
    writer.add([row("a"), row("b")])
    assert writer.files == [] and writer.buffered == 2
    assert not (tmp_path / "cat").exists()
    writer.add([row("c")])
    assert len(writer.files) == 1 and writer.rows_written == 3 and writer.buffered == 0
    writer.add([row("d")])
    writer.close()
    assert len(writer.files) == 2 and writer.rows_written == 4
    assert sorted(pq.read_table(f).num_rows for f in writer.files) == [1, 3]


def test_writer_flushes_when_max_seconds_elapsed(tmp_path):
    writer = CatalogWriter(tmp_path / "cat", target_rows=1000, max_seconds=0.05)
    writer.add([row("a")])
    assert writer.files == []
    time.sleep(0.1)
    writer.add([row("b")])  # the first buffered row is old enough: both rows go out
    assert writer.rows_written == 2 and len(writer.files) == 1
    writer.add([row("c")])  # the clock starts again with the next first row
    assert writer.buffered == 1
    time.sleep(0.1)
    writer.add([])  # an empty add still flushes rows that waited long enough
    assert writer.rows_written == 3 and writer.buffered == 0
    writer.close()


def test_layout_one_file_per_model_partition_and_no_tmp(tmp_path):
    root = tmp_path / "cat"
    rows = [row(f"i{k}", model="sd-a" if k % 3 else "sd-b.v2") for k in range(7)]
    writer = write(root, rows)
    assert writer.rows_written == 7
    files = all_files(root)
    assert len(files) == 2 and not any(f.endswith(".tmp") for f in files)
    for rel in files:
        partition, name = rel.split(os.sep)
        assert partition in ("model=sd-a", "model=sd-b.v2") and PART_NAME.match(name), rel
        table = pq.read_table(root / rel)
        assert table.schema.equals(ARROW_SCHEMA, check_metadata=False)
        assert set(table.column("model").to_pylist()) == {partition.split("=", 1)[1]}
    assert sorted(writer.files) == sorted(str(root / f) for f in files)


@pytest.mark.parametrize("model", [None, "../escape", "a/b", ".hidden", "x y"])
def test_writer_refuses_rows_without_a_safe_partition(tmp_path, model):
    writer = CatalogWriter(tmp_path / "cat")
    with pytest.raises(ValueError):
        writer.add([row("a", model=model)])
    assert writer.buffered == 0


def test_crash_before_rename_leaves_nothing_visible_and_retry_writes_once(tmp_path, monkeypatch):
    root = tmp_path / "cat"
    writer = CatalogWriter(root, target_rows=100)
    writer.add([row("a"), row("b", model="sd-b")])
    real_replace = os.replace
    calls = []

    def crash_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(catalog_files.os, "replace", crash_on_second)
    with pytest.raises(OSError, match="disk gone"):
        writer.flush()
    # the first partition is in, the second is neither visible nor left as a temporary file
    assert [f.split(os.sep)[0] for f in all_files(root)] == ["model=sd-a"]
    assert writer.buffered == 1 and writer.rows_written == 1
    monkeypatch.setattr(catalog_files.os, "replace", real_replace)
    writer.close()
    assert Catalog(root).query("SELECT image_id, model FROM audits ORDER BY image_id").to_pylist() == [
        {"image_id": "a", "model": "sd-a"},
        {"image_id": "b", "model": "sd-b"},
    ]


def test_leftover_tmp_files_are_ignored_by_the_views(tmp_path):
    root = tmp_path / "cat"
    write(root, [row("a")])
    # what a crash mid-write leaves: a truncated Parquet file under its temporary name
    full = io.BytesIO()
    pq.write_table(pa.table({"image_id": ["ghost"], "model": ["sd-a"], "status": ["ok"]}), full)
    (root / "model=sd-a" / "part-crashed.parquet.tmp").write_bytes(full.getvalue()[:40])
    (root / "model=sd-b").mkdir()
    (root / "model=sd-b" / "part-crashed2.parquet.tmp").write_bytes(b"PAR1garbage")
    assert Catalog(root).query("SELECT image_id FROM audits").column("image_id").to_pylist() == ["a"]


# --- views ----------------------------------------------------------------------------------


def test_empty_or_missing_catalog_has_views_with_the_schema_columns(tmp_path):
    for url in (tmp_path / "missing", tmp_path):
        catalog = Catalog(url)
        for view in ("audits", "latest"):
            table = catalog.query(f"SELECT * FROM {view}")
            assert table.num_rows == 0 and tuple(table.column_names) == COLUMNS
        assert catalog.completed_keys("fp-a", "cfg-1", include_errors=True) == set()
    types = {r["column_name"]: r["column_type"] for r in catalog.query("DESCRIBE audits").to_pylist()}
    assert (types["invmm_kl"], types["width"], types["invmm_replicated"]) == ("DOUBLE", "BIGINT", "BOOLEAN")


def test_audits_has_exactly_the_schema_columns_and_rows_round_trip(tmp_path):
    rows = [row("a", kl=0.25), row("b", status="error")]
    write(tmp_path, rows)
    table = Catalog(tmp_path).query("SELECT * FROM audits ORDER BY image_id")
    assert tuple(table.column_names) == COLUMNS  # `model` once: from the file, not from the path
    assert [AuditRow(**r) for r in table.to_pylist()] == rows


def test_files_of_an_older_schema_read_with_nulls(tmp_path):
    write(tmp_path, [row("new")])
    (tmp_path / "model=old").mkdir()
    pq.write_table(
        pa.table({"image_id": ["old"], "model": ["old"], "status": ["ok"]}).replace_schema_metadata(
            {"memray_schema_version": "1"}
        ),
        tmp_path / "model=old" / "part-old.parquet",
    )
    table = Catalog(tmp_path).query("SELECT image_id, invmm_kl FROM audits ORDER BY image_id")
    assert table.to_pylist() == [{"image_id": "new", "invmm_kl": 0.5}, {"image_id": "old", "invmm_kl": None}]


def test_migrate_rewrites_older_files_in_the_current_schema_and_keeps_each_rows_version(tmp_path):
    import dataclasses

    from memray.catalog.schema import SCHEMA_VERSION
    from memray.catalog.writer import migrate_catalog

    write(tmp_path, [row("current")])
    old = row("old")
    # a schema 1 file: the columns of version 1 only, with its metadata
    v1 = {f.name: getattr(old, f.name) for f in dataclasses.fields(old) if f.name not in V2_COLUMNS}
    v1["schema_version"] = 1
    table = pa.Table.from_pylist([v1]).replace_schema_metadata({"memray_schema_version": "1"})
    (tmp_path / "model=m").mkdir(exist_ok=True)
    pq.write_table(table, tmp_path / "model=m" / "part-v1.parquet")
    before = Catalog(tmp_path).query("SELECT * FROM audits ORDER BY image_id").to_pylist()

    migrated = migrate_catalog(tmp_path)
    assert [p.rsplit("/", 1)[-1] for p in migrated] == ["part-v1.parquet"]
    assert migrate_catalog(tmp_path) == []  # a rerun finds nothing left to do
    rewritten = pq.read_table(tmp_path / "model=m" / "part-v1.parquet")
    assert rewritten.schema.metadata[b"memray_schema_version"] == str(SCHEMA_VERSION).encode()
    assert rewritten.schema.names == list(ARROW_SCHEMA.names)
    after = Catalog(tmp_path).query("SELECT * FROM audits ORDER BY image_id").to_pylist()
    assert after == before  # the same rows, the new columns NULL, each row's own version kept
    assert [r["schema_version"] for r in after] == [SCHEMA_VERSION, 1]
    assert all(r[c] is None for r in after if r["image_id"] == "old" for c in V2_COLUMNS)


V2_COLUMNS = (
    "invmm_prompt_init",
    "invmm_prompt_replicated",
    "replication_threshold",
    "null_content_similarity",
    "null_model_similarity",
    "uncond_replication_rate",
    "err_shift_relative",
)


def test_root_path_with_key_value_folders_adds_no_columns(tmp_path):
    root = tmp_path / "run=3" / "cat"
    write(root, [row("a")])
    assert tuple(Catalog(root).query("SELECT * FROM audits").column_names) == COLUMNS


def test_latest_is_the_newest_ok_row_per_image_and_model(tmp_path):
    rows = [
        row("a", run="r1", at="2026-11-01T00:00:00+00:00", kl=1.0),
        row("a", run="r2", at="2026-11-02T00:00:00+00:00", kl=2.0),  # newer ok: wins
        row("a", run="r3", at="2026-11-03T00:00:00+00:00", status="error"),  # newer error: ignored
        row("b", run="r1", status="error"),  # only errors: not in latest
        row("a", model="sd-b", fingerprint="fp-b", run="r1", kl=9.0),  # other model: its own row
        row("c", run="r1", at="2026-11-05T00:00:00+00:00", kl=3.0),  # tie on audited_at: run_id decides
        row("c", run="r9", at="2026-11-05T00:00:00+00:00", kl=4.0),
    ]
    # spread over several flushes and files, in no particular order
    write(tmp_path, rows[4:], target_rows=1)
    write(tmp_path, rows[:4], target_rows=2)
    catalog = Catalog(tmp_path)
    latest = catalog.query("SELECT image_id, model, run_id, invmm_kl, status FROM latest ORDER BY model, image_id")
    assert latest.to_pylist() == [
        {"image_id": "a", "model": "sd-a", "run_id": "r2", "invmm_kl": 2.0, "status": "ok"},
        {"image_id": "c", "model": "sd-a", "run_id": "r9", "invmm_kl": 4.0, "status": "ok"},
        {"image_id": "a", "model": "sd-b", "run_id": "r1", "invmm_kl": 9.0, "status": "ok"},
    ]
    assert catalog.query("SELECT count(*) n FROM audits").to_pylist() == [{"n": 7}]


def test_completed_keys_for_resume(tmp_path):
    """(image_id, image_sha256): these rows carry no hash, so every key holds None."""
    write(
        tmp_path,
        [
            row("ok1"),
            row("ok2"),
            row("err", status="error"),
            row("other-config", config="cfg-2"),
            row("other-weights", fingerprint="fp-z"),
            row("retried", status="error", run="r1"),
            row("retried", status="ok", run="r2"),
        ],
    )
    catalog = Catalog(tmp_path)
    assert catalog.completed_keys("fp-a", "cfg-1") == {("ok1", None), ("ok2", None), ("retried", None)}
    assert catalog.completed_keys("fp-a", "cfg-1", include_errors=True) == {
        ("ok1", None),
        ("ok2", None),
        ("retried", None),
        ("err", None),
    }
    assert catalog.completed_keys("fp-a", "cfg-2") == {("other-config", None)}
    assert catalog.completed_keys("fp-b", "cfg-1") == set()


def test_catalog_sees_files_written_after_it_was_created(tmp_path):
    catalog = Catalog(tmp_path)
    assert catalog.completed_keys("fp-a", "cfg-1") == set()
    write(tmp_path, [row("a")])
    assert catalog.completed_keys("fp-a", "cfg-1") == {("a", None)}


# --- read-only queries ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "COPY (SELECT * FROM audits) TO '{out}/x.csv'",
        "INSERT INTO _memray_empty (image_id, status) VALUES ('x', 'ok')",
        "CREATE TABLE t AS SELECT * FROM audits",
        "CREATE VIEW v AS SELECT 1",
        "ATTACH '{out}/x.duckdb'",
        "INSTALL httpfs",
        "LOAD httpfs",
        "PRAGMA version",
        "SET enable_external_access = true",
        "RESET allowed_directories",
        "DROP VIEW audits",
        "EXPORT DATABASE '{out}/dump'",
        "CALL pragma_version()",
        "EXPLAIN SELECT 1",
        "SELECT 1; SELECT 2",
        "SELECT * FROM latest; COPY (SELECT 1) TO '{out}/y.csv'",
        "SELEC nonsense",
    ],
)
def test_query_refuses_anything_but_one_select(tmp_path, sql):
    write(tmp_path / "cat", [row("a")])
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CatalogQueryError):
        Catalog(tmp_path / "cat").query(sql.format(out=out))
    assert list(out.iterdir()) == []


def test_query_cannot_read_files_outside_the_catalog(tmp_path):
    root = tmp_path / "cat"
    write(root, [row("a")])
    secret = tmp_path / "secret.csv"
    secret.write_text("password\nhunter2\n")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "other.parquet")
    (tmp_path / "cat2").mkdir()  # a sibling whose name starts like the root
    pq.write_table(pa.table({"x": [1]}), tmp_path / "cat2" / "p.parquet")
    catalog = Catalog(root)
    for sql in (
        f"SELECT * FROM read_csv('{secret}')",
        f"SELECT * FROM read_text('{secret}')",
        f"SELECT * FROM '{tmp_path / 'other.parquet'}'",
        f"SELECT * FROM read_parquet('{root}/../other.parquet')",
        f"SELECT * FROM read_parquet('{tmp_path / 'cat2' / 'p.parquet'}')",
        "SELECT * FROM read_csv('/etc/passwd')",
    ):
        with pytest.raises(CatalogQueryError, match="disabled|Permission"):
            catalog.query(sql)
    # reads through the views keep working, and so do the usual read-only statements
    assert catalog.query("SELECT count(*) n FROM audits").to_pylist() == [{"n": 1}]
    assert catalog.query("DESCRIBE latest").num_rows == len(COLUMNS)
    assert catalog.query("WITH x AS (SELECT image_id FROM latest) FROM x").num_rows == 1


def test_query_errors_are_catalog_query_errors(tmp_path):
    with pytest.raises(CatalogQueryError, match="no_such_column"):
        Catalog(tmp_path).query("SELECT no_such_column FROM audits")


# --- output ---------------------------------------------------------------------------------


def test_output_formats(tmp_path):
    table = pa.table(
        {
            "image_id": ["a", "b,c"],
            "invmm_kl": [0.123456789, float("nan")],
            "unet_forwards": pa.array([12, None], pa.int64()),
        }
    )
    text = format_table(table, "table").splitlines()
    assert text[0].split() == ["image_id", "invmm_kl", "unet_forwards"]
    assert text[2].split() == ["a", "0.123457", "12"] and text[3].split() == ["b,c", "nan", "NULL"]
    assert text[-1] == "(2 rows)"
    assert len({len(line) for line in text[:2]}) == 1  # header and rule aligned
    assert list(csv.reader(io.StringIO(format_table(table, "csv")))) == [
        ["image_id", "invmm_kl", "unet_forwards"],
        ["a", "0.123456789", "12"],
        ["b,c", "nan", ""],
    ]
    assert json.loads(format_table(table, "json")) == [
        {"image_id": "a", "invmm_kl": 0.123456789, "unet_forwards": 12},
        {"image_id": "b,c", "invmm_kl": None, "unet_forwards": None},  # NaN is not JSON
    ]
    assert format_table(table.slice(0, 0), "table").splitlines()[-1] == "(0 rows)"
    with pytest.raises(ValueError):
        format_table(table, "xml")
    out = tmp_path / "sub" / "result.parquet"
    write_parquet(table, out)
    back = pq.read_table(out)
    assert back.schema.equals(table.schema) and back.slice(0, 1).equals(table.slice(0, 1))
    assert back.column("unet_forwards").to_pylist() == [12, None]
    assert all_files(tmp_path) == [os.path.join("sub", "result.parquet")]


# --- other filesystems ----------------------------------------------------------------------


def test_memory_filesystem_round_trip():
    url = f"memory://memray-test-{time.time_ns()}/cat"
    writer = write(url, [row("a"), row("b", model="sd-b"), row("c", status="error")])
    assert len(writer.files) == 2
    catalog = Catalog(url)
    assert catalog.query("SELECT image_id FROM latest ORDER BY 1").column("image_id").to_pylist() == ["a", "b"]
    assert catalog.completed_keys("fp-a", "cfg-1", include_errors=True) == {("a", None), ("b", None), ("c", None)}


@pytest.mark.parametrize("where", ["local", "memory"])
def test_crash_journal_counts_deaths_per_image_and_stays_out_of_the_views(tmp_path, where):
    url = str(tmp_path / "cat") if where == "local" else f"memory://memray-journal-{time.time_ns()}/cat"
    write(url, [row("a")])
    one, two = ("x/1.png", "h1"), ("x/2.png", "h2")
    journal = CrashJournal(url, "fp-a" * 8, "cfg-1", "run-1")
    assert journal.deaths(one) == 0
    journal.mark(one, 0)  # the worker holding it dies here: the marker stays
    journal.mark(two, 0)
    journal.unmark(two)  # finished
    assert journal.deaths(one) == 1 and journal.deaths(two) == 0
    journal.mark(one, journal.deaths(one))  # retried, dies again
    again = CrashJournal(url, "fp-a" * 8, "cfg-1", "run-1")  # another actor of the run, another process
    assert again.deaths(one) == 2
    assert again.deaths(("x/1.png", "another hash")) == 0  # other bytes under the same id: another image
    assert CrashJournal(url, "fp-a" * 8, "cfg-2", "run-1").deaths(one) == 0  # other config: other images
    again.unmark(one)
    again.unmark(("never-marked", None))
    assert again.deaths(one) == 0
    journal.mark(("y", None), 0)
    assert Catalog(url).query("SELECT image_id FROM audits").column("image_id").to_pylist() == ["a"]


def test_open_fs_uses_the_s3_endpoint_from_the_environment(monkeypatch):
    pytest.importorskip("s3fs")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, root = open_fs("s3://bucket/some/catalog/")
    assert root == "bucket/some/catalog" and fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")
    assert open_fs("s3://bucket/x")[0].client_kwargs["endpoint_url"] == "http://127.0.0.1:10"


def test_s3_round_trip_on_a_real_server(s3_bucket, tmp_path):
    import boto3

    url = f"s3://{s3_bucket}/memray-catalog"
    first = write(url, [row("a", run="r1", kl=1.0), row("b", model="sd-b", fingerprint="fp-b")])
    write(url, [row("a", run="r2", at="2026-11-02T00:00:00+00:00", kl=2.0), row("c", status="error")])
    keys = sorted(o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert len(keys) == 3 and not any(k.endswith(".tmp") for k in keys)
    assert all(k.startswith("memray-catalog/model=sd-") and PART_NAME.match(k.rsplit("/", 1)[1]) for k in keys)
    assert len(first.files) == 2 and set(first.files) <= {f"{s3_bucket}/{k}" for k in keys}

    catalog = Catalog(url)
    assert catalog.query(
        "SELECT image_id, model, run_id, invmm_kl FROM latest ORDER BY model, image_id"
    ).to_pylist() == [
        {"image_id": "a", "model": "sd-a", "run_id": "r2", "invmm_kl": 2.0},
        {"image_id": "b", "model": "sd-b", "run_id": "run-1", "invmm_kl": 0.5},
    ]
    assert tuple(catalog.query("SELECT * FROM audits").column_names) == COLUMNS
    assert catalog.completed_keys("fp-a", "cfg-1") == {("a", None)}
    assert catalog.completed_keys("fp-a", "cfg-1", include_errors=True) == {("a", None), ("c", None)}
    with pytest.raises(CatalogQueryError):
        catalog.query(f"COPY (SELECT * FROM audits) TO '{tmp_path}/leak.csv'")
    # another object of the same bucket, outside the catalog root, is out of reach
    buffer = io.BytesIO()
    pq.write_table(pa.table({"x": [1]}), buffer)
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="private/p.parquet", Body=buffer.getvalue())
    with pytest.raises(CatalogQueryError, match="disabled|Permission"):
        catalog.query(f"SELECT * FROM read_parquet('s3://{s3_bucket}/private/p.parquet')")
    # an empty prefix on the server: views exist, no rows
    assert Catalog(f"s3://{s3_bucket}/nothing-here").query("SELECT * FROM latest").num_rows == 0


def test_root_with_quotes_spaces_and_glob_characters(tmp_path):
    for url in (str(tmp_path / "it's a [cat] *?"), f"memory://memray-test-{time.time_ns()}/it's [a] cat*"):
        write(url, [row("a")])
        catalog = Catalog(url)
        assert catalog.query("SELECT image_id FROM latest").column("image_id").to_pylist() == ["a"], url
        assert catalog.completed_keys("fp-a", "cfg-1") == {("a", None)}


def test_binary_columns_print_as_their_size(tmp_path):
    stored = row("a")
    stored.replicas_png = b"\x89PNG" + bytes(96)
    write(tmp_path, [stored])
    table = Catalog(tmp_path).query("SELECT image_id, replicas_png FROM audits")
    assert "<100 bytes>" in format_table(table) and "\\x89" not in format_table(table)
    assert json.loads(format_table(table, "json"))[0]["replicas_png"].startswith("89504e47")
