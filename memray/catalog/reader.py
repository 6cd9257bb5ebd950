"""Reading the catalog: read-only DuckDB views over its readable memray files.

Views (in a fresh in-memory DuckDB per `Catalog.connect()`):
- `audits`: every row of every readable memray Parquet file under the root;
- `latest`: per (image_id, image_sha256, model), the newest `status = 'ok'` row of the deepest stage
  (a confirmed or full-chain row outranks a cascade's screen row, whatever their ages);
- `selections` and `cascade`: the cascade's selection tables (catalog/cascade.py).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import re
import shutil
import tempfile
import threading

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from memray.catalog.cascade import CASCADE_VIEW_SQL, SELECTION_FOLDER, SELECTION_SCHEMA
from memray.catalog.files import is_local, open_fs, protocols
from memray.catalog.schema import ARROW_SCHEMA, SCHEMA_VERSION
from memray.errors import CatalogQueryError
from memray.formatting import printable

log = logging.getLogger(__name__)


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
# two images. A screen row (stage 1 of a cascade) yields to any row that ran the chain on the image.
# Equal audited_at broken by run_id, config_hash, fingerprint.
_LATEST_SQL = """
CREATE VIEW latest AS
SELECT * FROM audits
WHERE status = 'ok'
QUALIFY row_number() OVER (
    PARTITION BY image_id, image_sha256, model
    ORDER BY stage IS NOT DISTINCT FROM 'screen', audited_at DESC NULLS LAST, run_id DESC NULLS LAST,
             config_hash DESC NULLS LAST, model_fingerprint DESC NULLS LAST
) = 1
"""
_EMPTY_SELECTIONS = "_memray_empty_selections"
_SELECTIONS_SQL = """
CREATE VIEW selections AS
SELECT * FROM {empty}
UNION ALL BY NAME
SELECT * FROM read_parquet({files}, hive_partitioning = false, union_by_name = true)
"""


def _schema_problem(schema: pa.Schema) -> str | None:
    """Why a Parquet file cannot join the views (None: it can): not memray's, or a column of another
    type than the catalog's, which would break every query over the union of the files."""
    version = (schema.metadata or {}).get(b"memray_schema_version", b"")
    if not (version.isdigit() and 1 <= int(version) <= SCHEMA_VERSION):
        return "not a memray catalog file (no memray schema version in its metadata)"
    wrong = [
        f"{field.name} is {field.type}, not {ARROW_SCHEMA.field(field.name).type}"
        for field in schema
        if field.name in ARROW_SCHEMA.names and not _same_type(field.type, ARROW_SCHEMA.field(field.name).type)
    ]
    return "columns of the wrong type: " + "; ".join(wrong) if wrong else None


def _same_type(found: pa.DataType, expected: pa.DataType) -> bool:
    """Equal types, lists compared by their values (a list's item field may be named item or element);
    a column of nulls only (an all-NULL column of an old writer) fits any type."""
    if pa.types.is_null(found):
        return True
    if pa.types.is_list(found) and pa.types.is_list(expected):
        return found.value_type == expected.value_type
    return found == expected


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
        return path if is_local(self.fs) else self.fs.unstrip_protocol(path)

    def files(self) -> list[str]:
        """The catalog's readable memray Parquet files; the others go to `ignored`, each with a warning."""
        if not is_local(self.fs):
            self.fs.invalidate_cache(self.root)  # s3fs caches listings; see new files
        found = [p for p in self._parquet_files() if not p.startswith(f"{self.root}/{SELECTION_FOLDER}/")]
        good, self.ignored = [], []
        for path in found:
            try:
                with self.fs.open(path, "rb") as handle:
                    schema = pq.read_schema(handle)
            except Exception as error:  # noqa: BLE001 - zero bytes, a torn copy, a foreign format: all unreadable
                problem = f"unreadable ({type(error).__name__}: {error})"
            else:
                problem = _schema_problem(schema)
            if problem is None:
                good.append(path)
            else:
                self.ignored.append(f"{path}: {problem}")
                log.warning("catalog %s: ignoring %s: %s", printable(self.url), printable(path), printable(problem))
        return good

    def _parquet_files(self) -> list[str]:
        try:
            return sorted(p for p in self.fs.find(self.root) if p.endswith(".parquet"))
        except FileNotFoundError:
            return []

    def selection_files(self) -> list[str]:
        """The cascade's selection tables under `cascade/`; an unreadable one is left out with a warning."""
        good = []
        for path in self._parquet_files():
            if not path.startswith(f"{self.root}/{SELECTION_FOLDER}/"):
                continue
            try:
                with self.fs.open(path, "rb") as handle:
                    metadata = pq.read_schema(handle).metadata or {}
            except Exception as error:  # noqa: BLE001 - as for audit files: unreadable is unreadable
                problem = f"unreadable ({type(error).__name__}: {error})"
            else:
                problem = None if b"memray_selection_version" in metadata else "not a memray selection table"
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
        files, selections = self.files(), self.selection_files()
        con = duckdb.connect(":memory:")
        try:
            con.execute("SET autoinstall_known_extensions = false")
            con.execute("SET autoload_known_extensions = false")
            con.execute(f"SET temp_directory = {_sql_string(_private_temp_directory())}")
            if not is_local(self.fs):
                con.register_filesystem(self.fs)
            root = self._duckdb_path(self.root).rstrip("/")
            # DuckDB checks each file it reads against this list.
            allowed = {root + "/", _glob_escape(root) + "/"}
            if not is_local(self.fs):  # some fsspec filesystems glob to protocol:///path
                allowed.add(f"{protocols(self.fs)[0]}:///{self.root.strip('/')}/")

            empty = pa.Table.from_batches([], schema=ARROW_SCHEMA)
            con.from_arrow(empty).create(_EMPTY_TABLE)
            if files:
                listed = "[" + ", ".join(_sql_string(_glob_escape(self._duckdb_path(f))) for f in files) + "]"
                con.execute(_AUDITS_SQL.format(empty=_EMPTY_TABLE, files=listed))
            else:
                con.execute(_AUDITS_EMPTY_SQL.format(empty=_EMPTY_TABLE))
            con.execute(_LATEST_SQL)
            con.from_arrow(pa.Table.from_batches([], schema=SELECTION_SCHEMA)).create(_EMPTY_SELECTIONS)
            listed = "[" + ", ".join(_sql_string(_glob_escape(self._duckdb_path(f))) for f in selections) + "]"
            con.execute(
                _SELECTIONS_SQL.format(empty=_EMPTY_SELECTIONS, files=listed)
                if selections
                else f"CREATE VIEW selections AS SELECT * FROM {_EMPTY_SELECTIONS}"
            )
            con.execute(CASCADE_VIEW_SQL)

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
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise CatalogQueryError(f"the query time limit must be a finite number of seconds > 0, got {timeout}")
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
    where a later query could read another one's spills), removed when the process exits."""
    folder = tempfile.mkdtemp(prefix="memray-duckdb-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder
