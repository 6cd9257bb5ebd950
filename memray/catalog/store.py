"""The catalog on disk or object storage: append-only Parquet files and read-only DuckDB views.

Layout: `{root}/model={slug}/part-{UTC timestamp}-{uuid8}.parquet`, every file with the schema
of `memray.catalog.schema`. Files are only ever added, each in one atomic step (a rename on a
local disk, a single PUT on an object store), so a reader never sees half a file and a crash
loses at most the rows still buffered in a writer.

Beside the data, `{root}/_inflight/` holds the crash journal (`CrashJournal`): one small JSON
file per image being audited, so an image whose worker dies is recognised when Ray retries it.

Views (in a fresh in-memory DuckDB per `Catalog.connect()`):
- `audits`: every row of every `**/*.parquet` under the root;
- `latest`: the newest `status = 'ok'` row per (image_id, model).
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import hashlib
import io
import json
import logging
import math
import os
import re
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable

import duckdb
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from memray.catalog.schema import ARROW_SCHEMA, SCHEMA_VERSION, AuditRow, rows_to_table

log = logging.getLogger(__name__)

# Object stores make a single PUT visible all at once (or not at all); the in-memory filesystem
# of tests commits a file when it is closed. Everything else gets a temporary name and a rename.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"})
_SAFE_SLUG = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*$")
_TMP_SUFFIX = ".tmp"


class CatalogQueryError(ValueError):
    """A query the catalog refuses (not a single read-only SELECT) or cannot run."""


class CatalogWriteError(ValueError):
    """The catalog cannot be written to (a file in the way, a read-only mount, no permission)."""


class CatalogLeaseError(ValueError):
    """Another audit of the same model and config is writing to the catalog right now."""


# ---------------------------------------------------------------------------------------------
# filesystems


def open_fs(url) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path without protocol) for a local path or an fsspec URL.

    For s3:// the endpoint comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` when set
    (passed to s3fs explicitly, so any S3-compatible server on any address works).
    """
    url = os.fspath(url)
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    kwargs: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    fs, root = fsspec.core.url_to_fs(url, **kwargs)
    return fs, root.rstrip("/") or root


def _protocols(fs) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _is_local(fs) -> bool:
    return isinstance(fs, LocalFileSystem)


def _put_atomic(fs, path: str, data: bytes) -> None:
    """Make `path` appear with content `data` in one step: readers see all of it or nothing."""
    if _is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}{_TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        try:  # make the rename itself durable
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    elif set(_protocols(fs)) & _ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
    else:  # e.g. sftp, hdfs: a temporary name in the same folder, then a rename
        tmp = f"{path}{_TMP_SUFFIX}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_bytes(url, data: bytes) -> str:
    """Write one file (local path or fsspec URL) in one step: readers see all of it or nothing."""
    fs, target = open_fs(url)
    _put_atomic(fs, target, data)
    return target


def write_parquet(table: pa.Table, path) -> str:
    """Write a query result as one Parquet file (local path or fsspec URL), atomically."""
    return write_bytes(path, _parquet_bytes(table))


# ---------------------------------------------------------------------------------------------
# writing


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

    A flush happens in `add` when `target_rows` rows are buffered or `max_seconds` have passed
    since the first buffered row, and in `close` (also on leaving a `with` block). Each file is
    written in one atomic step. `files` lists the paths written, `rows_written` counts rows.
    """

    def __init__(self, catalog_url, *, target_rows: int = 2000, max_seconds: float = 60):
        if target_rows < 1:
            raise ValueError("target_rows must be at least 1")
        self.fs, self.root = open_fs(catalog_url)
        self.target_rows = int(target_rows)
        self.max_seconds = float(max_seconds)
        self.files: list[str] = []
        self.rows_written = 0
        self._buffer: list[AuditRow] = []
        self._first_at: float | None = None
        self._closed = False

    @property
    def buffered(self) -> int:
        """Rows added but not yet written."""
        return len(self._buffer)

    def add(self, rows: Iterable[AuditRow]) -> None:
        """Buffer rows; flush when the buffer is full or old enough."""
        if self._closed:
            raise ValueError("CatalogWriter is closed")
        rows = list(rows)
        for row in rows:
            _partition_slug(row.model)  # refuse a bad row now, not at flush time
        if not rows:
            self._flush_if_due()
            return
        if self._first_at is None:
            self._first_at = time.monotonic()
        self._buffer.extend(rows)
        self._flush_if_due()

    def _flush_if_due(self) -> None:
        if not self._buffer:
            return
        if len(self._buffer) >= self.target_rows or time.monotonic() - self._first_at >= self.max_seconds:
            self.flush()

    def flush(self) -> list[str]:
        """Write every buffered row now; returns the paths written by this flush.

        If writing one partition fails, the partitions already written leave the buffer and the
        rest stay, so retrying does not duplicate rows.
        """
        by_model: dict[str, list[AuditRow]] = {}
        for row in self._buffer:
            by_model.setdefault(_partition_slug(row.model), []).append(row)
        written: list[str] = []
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S%fZ")
        try:
            for slug in sorted(by_model):
                rows = by_model[slug]
                path = f"{self.root}/model={slug}/part-{stamp}-{uuid.uuid4().hex[:8]}.parquet"
                _put_atomic(self.fs, path, _parquet_bytes(rows_to_table(rows)))
                written.append(path)
                self.files.append(path)
                self.rows_written += len(rows)
                del by_model[slug]
        finally:
            self._buffer = [row for rows in by_model.values() for row in rows]
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


class CrashJournal:
    """Which images were being audited when their worker died, kept on the catalog's filesystem.

    An auditor marks an image before auditing it and unmarks it afterwards. A marker that is still
    there when the image comes round again *in the same run* (Ray retries the task on a restarted
    actor) counts one death of the worker that held it. A marker left by another run is no death:
    that run was interrupted (Ctrl-C, a killed driver, a lost cluster), which says nothing about the
    image. Markers are per image (id and content hash), model fingerprint and config hash, so they
    never depend on which batch the image was in.
    """

    def __init__(self, catalog_url, model_fingerprint: str, config_hash: str, run_id: str):
        self.fs, root = open_fs(catalog_url)
        self.folder = f"{root}/_inflight/{model_fingerprint[:16]}-{config_hash}"
        self.run_id = run_id

    def _path(self, key: tuple[str, str | None]) -> str:
        return f"{self.folder}/{hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:32]}.json"

    def deaths(self, key: tuple[str, str | None]) -> int:
        """How often a worker of this run died while auditing the image (image_id, image_sha256)."""
        try:
            marker = json.loads(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return 0
        return int(marker["deaths"]) if marker.get("run_id") == self.run_id else 0

    def mark(self, key: tuple[str, str | None], deaths: int) -> None:
        """Record that the image is being audited, after `deaths` earlier deaths of its worker in this run."""
        marker = {"image_id": key[0], "image_sha256": key[1], "run_id": self.run_id, "deaths": deaths + 1}
        _put_atomic(self.fs, self._path(key), json.dumps(marker).encode())

    def unmark(self, key: tuple[str, str | None]) -> None:
        """The image's audit finished (with a row, ok or error): forget it."""
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass


class RunLease:
    """One audit at a time per catalog, model fingerprint and config: a heartbeat file under `_runs/`.

    A second run refuses to start while the lease's heartbeat is fresh, with a message naming the
    holder; a lease whose holder stopped beating for `stale_seconds`, or whose holder process on
    this very host is gone (a killed driver), is taken over.
    """

    def __init__(self, catalog_url, model_fingerprint: str, config_hash: str, run_id: str, *, stale_seconds=120.0):
        self.fs, root = open_fs(catalog_url)
        self.path = f"{root}/_runs/lease-{model_fingerprint[:16]}-{config_hash}.json"
        self.run_id, self.stale_seconds = run_id, stale_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        payload = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        _put_atomic(self.fs, self.path, json.dumps(payload).encode())

    def _alive(self, holder: dict) -> bool:
        if time.time() - holder["beat"] >= self.stale_seconds:
            return False
        if holder["host"] == socket.gethostname():
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's live process
                return True
        return True

    def acquire(self) -> None:
        """Take the lease or raise CatalogLeaseError; then keep it beating until release()."""
        holder = self._holder()
        if holder and holder["run_id"] != self.run_id and self._alive(holder):
            raise CatalogLeaseError(
                f"another audit of this model and config is writing to this catalog (run {holder['run_id']} on "
                f"{holder['host']}, pid {holder['pid']}, last seen {time.time() - holder['beat']:.0f} s ago); "
                f"wait for it, or for {self.stale_seconds:.0f} s after it died"
            )
        self._beat()
        time.sleep(0.2)  # two runs that started together: the last writer holds it, the other sees that
        holder = self._holder()
        if holder is None or holder["run_id"] != self.run_id:
            raise CatalogLeaseError(
                f"another audit took this catalog's lease at the same moment (run {holder and holder['run_id']})"
            )
        self._thread = threading.Thread(target=self._keep, daemon=True, name="memray-lease")
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.stale_seconds / 4):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; a long outage lets the lease go stale
                log.warning("could not renew the catalog lease %s", self.path, exc_info=True)

    def release(self) -> None:
        """Stop beating and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._holder()
        if holder and holder["run_id"] == self.run_id:
            self.fs.rm_file(self.path)


def check_writable(catalog_url) -> None:
    """Write, read back and delete a file the way the catalog writes its own, or raise CatalogWriteError.

    Run before any work starts: an audit that cannot write its rows must not run green with none.
    """
    fs, root = open_fs(catalog_url)
    path = f"{root}/_runs/preflight-{uuid.uuid4().hex}.txt"
    try:
        _put_atomic(fs, path, b"memray preflight")
        if fs.cat_file(path) != b"memray preflight":
            raise OSError("the file read back differs from the file written")
        fs.rm_file(path)
    except Exception as error:  # noqa: BLE001 - every way of failing means the same to the user
        raise CatalogWriteError(
            f"cannot write to the catalog {catalog_url}: {type(error).__name__}: {error}"
        ) from error


# ---------------------------------------------------------------------------------------------
# reading


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _glob_escape(path: str) -> str:
    """`path` with glob characters matched literally (`[*]`), for DuckDB's and fsspec's globbing."""
    return re.sub(r"([*?\[])", r"[\1]", path)


_EMPTY_TABLE = "_memray_empty"
_AUDITS_SQL = """
CREATE VIEW audits AS
SELECT * FROM {empty}
UNION ALL BY NAME
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
"""
_AUDITS_EMPTY_SQL = "CREATE VIEW audits AS SELECT * FROM {empty}"
# Newest ok row per (image_id, image_sha256, model): two images under one id with different bytes are
# two images. Equal audited_at broken by run_id, config_hash, fingerprint.
_LATEST_SQL = """
CREATE VIEW latest AS
SELECT * FROM audits
WHERE status = 'ok'
QUALIFY row_number() OVER (
    PARTITION BY image_id, image_sha256, model
    ORDER BY audited_at DESC NULLS LAST, run_id DESC NULLS LAST,
             config_hash DESC NULLS LAST, model_fingerprint DESC NULLS LAST
) = 1
"""


class Catalog:
    """Read side of a catalog: DuckDB views `audits` and `latest`, read-only queries, resume keys.

    Only memray's own files enter the views: a Parquet file under the root that cannot be read, or
    that lacks memray's schema metadata (a query export saved into the catalog folder, say), is
    left out with a warning naming it, so one bad file cannot break every command or double rows.
    """

    def __init__(self, catalog_url, *, must_exist: bool = False):
        self.url = os.fspath(catalog_url)
        self.fs, self.root = open_fs(self.url)
        if must_exist and not self.fs.exists(self.root):
            raise CatalogQueryError(f"no catalog at {self.url}")
        self.ignored: list[str] = []  # files left out of the views at the last connect, and why

    def _duckdb_path(self, path: str) -> str:
        """A path as DuckDB should see it: plain locally, else a URL of the registered filesystem."""
        return path if _is_local(self.fs) else self.fs.unstrip_protocol(path)

    def files(self) -> list[str]:
        """The catalog's readable memray Parquet files; the others go to `ignored`, each with a warning."""
        if not _is_local(self.fs):
            self.fs.invalidate_cache(self.root)  # s3fs caches listings; see new files
        try:
            found = sorted(p for p in self.fs.find(self.root) if p.endswith(".parquet"))
        except FileNotFoundError:
            found = []
        good, self.ignored = [], []
        for path in found:
            try:
                with self.fs.open(path, "rb") as handle:
                    metadata = pq.read_schema(handle).metadata or {}
            except Exception as error:  # noqa: BLE001 - zero bytes, a torn copy, a foreign format: all unreadable
                problem = f"unreadable ({type(error).__name__}: {error})"
            else:
                version = metadata.get(b"memray_schema_version", b"")
                known = version.isdigit() and 1 <= int(version) <= SCHEMA_VERSION
                problem = None if known else "not a memray catalog file (no memray schema version in its metadata)"
            if problem is None:
                good.append(path)
            else:
                self.ignored.append(f"{path}: {problem}")
                log.warning("catalog %s: ignoring %s: %s", self.url, path, problem)
        return good

    def connect(self) -> duckdb.DuckDBPyConnection:
        """A fresh in-memory DuckDB with the views `audits` and `latest` over the catalog as it is now.

        The connection can read only the catalog's own files: external access is switched off
        (except for the catalog root), spilling goes to a private temporary folder, and the
        configuration is locked.
        """
        files = self.files()
        con = duckdb.connect(":memory:")
        try:
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET autoload_known_extensions = false")
            con.execute(f"SET temp_directory = {_sql_string(_private_temp_directory())}")
            if not _is_local(self.fs):
                con.register_filesystem(self.fs)
            root = self._duckdb_path(self.root).rstrip("/")
            # DuckDB checks each file it reads against this list.
            allowed = {root + "/", _glob_escape(root) + "/"}
            if not _is_local(self.fs):  # some fsspec filesystems glob to protocol:///path
                allowed.add(f"{_protocols(self.fs)[0]}:///{self.root.strip('/')}/")

            empty = pa.Table.from_batches([], schema=ARROW_SCHEMA)
            con.from_arrow(empty).create(_EMPTY_TABLE)
            if files:
                listed = "[" + ", ".join(_sql_string(_glob_escape(self._duckdb_path(f))) for f in files) + "]"
                con.execute(_AUDITS_SQL.format(empty=_EMPTY_TABLE, files=listed))
            else:
                con.execute(_AUDITS_EMPTY_SQL.format(empty=_EMPTY_TABLE))
            con.execute(_LATEST_SQL)

            con.execute("SET allowed_directories = [" + ", ".join(_sql_string(a) for a in sorted(allowed)) + "]")
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
        except BaseException:
            con.close()
            raise
        return con

    def query(self, sql: str, *, timeout: float | None = 300.0) -> pa.Table:
        """Run one read-only SELECT over the views; anything else, or one running past `timeout`
        seconds (None: no limit), raises CatalogQueryError."""
        con = self.connect()
        timer = threading.Timer(timeout, con.interrupt) if timeout else None
        try:
            try:
                statements = con.extract_statements(sql)
            except duckdb.Error as exc:
                raise CatalogQueryError(f"cannot parse query: {exc}") from exc
            if len(statements) != 1:
                raise CatalogQueryError(
                    f"catalog queries take exactly one SELECT statement; got {len(statements)} statements"
                )
            kind = statements[0].type
            if kind != duckdb.StatementType.SELECT:
                raise CatalogQueryError(
                    f"catalog queries are read-only: only SELECT is allowed, not {kind.name} (views: audits, latest)"
                )
            if timer:
                timer.start()
            try:
                return con.sql(statements[0].query).to_arrow_table()
            except duckdb.InterruptException as exc:
                raise CatalogQueryError(f"query stopped after its time limit of {timeout:.0f} s") from exc
            except duckdb.Error as exc:
                raise CatalogQueryError(f"query failed: {exc}") from exc
        finally:
            if timer:
                timer.cancel()
            con.close()

    def completed_keys(
        self, model_fingerprint: str, config_hash: str, *, include_errors: bool = False
    ) -> set[tuple[str, str | None]]:
        """(image_id, image_sha256) with an ok row (any row with include_errors) for this fingerprint and
        config: the resume key. Two images under one id with different bytes are two keys."""
        con = self.connect()
        try:
            sql = "SELECT DISTINCT image_id, image_sha256 FROM audits WHERE model_fingerprint = ? AND config_hash = ?"
            if not include_errors:
                sql += " AND status = 'ok'"
            return set(con.execute(sql, [model_fingerprint, config_hash]).fetchall())
        finally:
            con.close()


@functools.cache
def _private_temp_directory() -> str:
    """A temporary folder of this process only, for DuckDB's spills (not the working directory,
    where a later query could read another one's spills)."""
    return tempfile.mkdtemp(prefix="memray-duckdb-")


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
        _put_atomic(catalog.fs, path, _parquet_bytes(pa.table(columns, schema=ARROW_SCHEMA)))
        migrated.append(path)
    return migrated


# ---------------------------------------------------------------------------------------------
# output


def _json_value(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, dict):
        return {k: _json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_value(v) for v in value]
    return value


def _text_value(value) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, bytes):  # replicas_png: a size, not a screenful of binary
        return f"<{len(value)} bytes>"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_table(table: pa.Table, fmt: str = "table") -> str:
    """A query result as text: `table` (aligned columns), `csv` (with header) or `json` (records)."""
    names = table.column_names
    records = table.to_pylist()
    if fmt == "json":
        return json.dumps([_json_value(r) for r in records], default=str, allow_nan=False)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(names)
        for r in records:
            writer.writerow(["" if r[n] is None else r[n] for n in names])
        return out.getvalue()
    if fmt == "table":
        cells = [[_text_value(r[n]).replace("\n", "\\n") for n in names] for r in records]
        numeric = [
            pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t) for t in table.schema.types
        ]
        widths = [max([len(n)] + [len(row[i]) for row in cells]) for i, n in enumerate(names)]

        def line(values):
            return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

        lines = [line(names), "  ".join("-" * w for w in widths)]
        lines += [line(row) for row in cells]
        lines.append(f"({table.num_rows} row{'s' if table.num_rows != 1 else ''})")
        return "\n".join(lines)
    raise ValueError(f"unknown format {fmt!r}; expected table, csv or json")
