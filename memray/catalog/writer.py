"""Writing the catalog: rows buffered into one Parquet file per model partition, each file atomic.

Layout: `{root}/model={slug}/part-{UTC timestamp}-{uuid8}.parquet`, every file with the schema of
`memray.catalog.schema` and its version in the metadata. Files are only ever added (or, by
`migrate_catalog`, replaced in one step under their own name), so a crash loses at most the rows
still buffered in a writer.
"""

from __future__ import annotations

import datetime as dt
import re
import time
import uuid
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from memray.catalog.files import open_fs, parquet_bytes, put_atomic
from memray.catalog.reader import Catalog
from memray.catalog.schema import ARROW_SCHEMA, SCHEMA_VERSION, AuditRow, rows_to_table
from memray.errors import CatalogWriteError

_SAFE_SLUG = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")


def _partition_slug(model: str | None) -> str:
    if model is None:
        raise ValueError("catalog rows need a model (the partition key); got model=None")
    if not _SAFE_SLUG.match(model):
        raise ValueError(
            f"model {model!r} is not a safe partition value (letters, digits, '.', '_', '-'; no leading dot)"
        )
    return model


class CatalogWriter:
    """Buffers rows and appends them to the catalog as Parquet files, one per model partition.

    Rows arrive as Arrow tables of the catalog schema (`add_table`, what an auditor returns) or as
    AuditRows (`add`). A flush happens when `target_rows` rows are buffered or `max_seconds` have
    passed since the first buffered row, and in `close` (also on leaving a `with` block). Each file
    is written in one atomic step. `files` lists the paths written, `rows_written` counts rows.
    """

    def __init__(self, catalog_url, *, target_rows: int = 2000, max_seconds: float = 60):
        if target_rows < 1:
            raise ValueError("target_rows must be at least 1")
        self.fs, self.root = open_fs(catalog_url)
        self.target_rows = int(target_rows)
        self.max_seconds = float(max_seconds)
        self.files: list[str] = []
        self.rows_written = 0
        self._buffer: list[pa.Table] = []
        self._first_at: float | None = None
        self._closed = False

    @property
    def buffered(self) -> int:
        """Rows added but not yet written."""
        return sum(table.num_rows for table in self._buffer)

    def add(self, rows: Iterable[AuditRow]) -> None:
        """Buffer rows; flush when the buffer is full or old enough."""
        self.add_table(rows_to_table(list(rows)))

    def add_table(self, table: pa.Table) -> None:
        """Buffer a table of rows (the catalog schema); flush when the buffer is full or old enough."""
        if self._closed:
            raise ValueError("CatalogWriter is closed")
        table = table.cast(ARROW_SCHEMA)
        for model in pc.unique(table.column("model")).to_pylist():
            _partition_slug(model)  # refuse a bad row now, not at flush time
        if table.num_rows:
            if self._first_at is None:
                self._first_at = time.monotonic()
            self._buffer.append(table)
        self._flush_if_due()

    def _flush_if_due(self) -> None:
        if not self._buffer:
            return
        if self.buffered >= self.target_rows or time.monotonic() - self._first_at >= self.max_seconds:
            self.flush()

    def flush(self) -> list[str]:
        """Write every buffered row now; returns the paths written by this flush.

        If writing one partition fails, the partitions already written leave the buffer and the
        rest stay, so retrying does not duplicate rows.
        """
        buffered = pa.concat_tables(self._buffer) if self._buffer else pa.Table.from_batches([], schema=ARROW_SCHEMA)
        models = sorted(pc.unique(buffered.column("model")).to_pylist())
        left = {model: buffered.filter(pc.equal(buffered.column("model"), model)) for model in models}
        written: list[str] = []
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        try:
            for model in models:
                table = left[model]
                path = f"{self.root}/model={_partition_slug(model)}/part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
                put_atomic(self.fs, path, parquet_bytes(table))
                written.append(path)
                self.files.append(path)
                self.rows_written += table.num_rows
                del left[model]
        finally:
            self._buffer = list(left.values())
            self._first_at = time.monotonic() if self._buffer else None
        return written

    def close(self) -> None:
        """Flush the remaining rows; the writer takes no more rows afterwards."""
        if self._closed:
            return
        if self._buffer:
            self.flush()
        self._closed = True

    def __enter__(self) -> CatalogWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_writable(catalog_url) -> None:
    """Write, read back and delete a file the way the catalog writes its own, or raise CatalogWriteError.

    Run before any work starts: an audit that cannot write its rows must not run green with none.
    """
    fs, root = open_fs(catalog_url)
    path = f"{root}/_runs/preflight-{uuid.uuid4().hex}.txt"
    try:
        put_atomic(fs, path, b"memray preflight")
        if fs.cat_file(path) != b"memray preflight":
            raise OSError("the file read back differs from the file written")
        fs.rm_file(path)
    except Exception as error:  # noqa: BLE001 - every way of failing means the same to the user
        raise CatalogWriteError(
            f"cannot write to the catalog {catalog_url}: {type(error).__name__}: {error}"
        ) from error


def migrate_catalog(catalog_url) -> list[str]:
    """Rewrite every catalog file of an older schema version in the current one; returns their paths.

    Columns the old version lacked are added as NULL (no measure is rerun); each row keeps the
    `schema_version` it was measured under, so migrated rows stay distinguishable, and the file's
    metadata names the current version. Each file is replaced under its own name in one atomic
    step, so readers see the old file or the new one and a rerun after a crash picks up where it stopped.
    """
    catalog = Catalog(catalog_url, must_exist=True)
    migrated = []
    for path in catalog.files():
        with catalog.fs.open(path, "rb") as handle:
            table = pq.read_table(handle)
        if int(table.schema.metadata[b"memray_schema_version"]) >= SCHEMA_VERSION:
            continue
        columns = {
            name: table.column(name) if name in table.column_names else pa.nulls(table.num_rows, field.type)
            for name, field in zip(ARROW_SCHEMA.names, ARROW_SCHEMA)
        }
        put_atomic(catalog.fs, path, parquet_bytes(pa.table(columns, schema=ARROW_SCHEMA)))
        migrated.append(path)
    return migrated
