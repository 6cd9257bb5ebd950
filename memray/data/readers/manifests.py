"""Manifests: Parquet, CSV or JSONL files listing images by `uri` (or `url`, `path`), with an optional
`id` and `caption`. A row's id is the id it gives, else its uri as written (it stays the same when the
manifest and its images move together).

A manifest is data (a web scrape): its entries may point into its own root (its folder, its bucket)
and the prefixes allowed by --allow-uri-prefix only, checked on the normal form that is then read
(memray.data.uris); anything else is an error record naming the way to allow it.
"""

from __future__ import annotations

import csv
import json
import posixpath
from collections.abc import Iterator

import fsspec
import pyarrow.parquet as pq

from memray.data.readers.base import (
    CAPTION_COLUMNS,
    SCHEME,
    Reader,
    Unit,
    clean_caption,
    column,
    describe,
    parquet_schema,
    stable_path_id,
)
from memray.data.readers.images import read_image_file
from memray.data.records import record
from memray.data.uris import UriError, allows, locate

URI_COLUMNS = ("uri", "url", "path")
ID_COLUMNS = ("id", "image_id")
MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".ndjson", ".parquet")
_BATCH_ROWS = 4096


class Manifests(Reader):
    """A manifest. Taken only when named (on its own or by a pattern): one lying in an image folder
    usually lists that same folder."""

    kind = "manifest"
    extensions = MANIFEST_EXTENSIONS
    description = f"a manifest ({', '.join(MANIFEST_EXTENSIONS)})"
    in_folders = False

    def refuses(self, fs, path: str) -> str:
        """Why the file is not a manifest: unreadable, or no uri column."""
        if path.lower().endswith(".parquet"):
            schema, problem = parquet_schema(fs, path)
            if schema is None:
                return problem
            columns = schema.names
        else:
            try:
                with fs.open(path, "rt", encoding="utf-8-sig", newline="") as text:
                    if path.lower().endswith(".csv"):
                        columns = [c.strip() for c in next(csv.reader(text), [])]
                    else:
                        first = next((line for line in text if line.strip()), "")
                        row = json.loads(first) if first else {}
                        columns = list(row) if isinstance(row, dict) else []
            except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
                return f"cannot read manifest: {error}"
        if column(columns, URI_COLUMNS):
            return ""
        return f"not a manifest: no uri column ({', '.join(URI_COLUMNS)}); columns: {', '.join(columns) or 'none'}"

    def unit(self, uri: str, root: str | None, prefixes: tuple[str, ...]) -> Unit:
        """The manifest's unit, allowed to point into its own root and `prefixes`."""
        return Unit(self.kind, uri, root, allowed=(uri_root(uri), *prefixes))

    def prefixes(self, unit: Unit) -> tuple[str, ...]:
        """Where the manifest may point."""
        return unit.allowed

    def count(self, unit: Unit) -> int | None:
        """The rows (reading a manifest reads no image): a parquet's footer, a text manifest's lines."""
        if unit.uri.lower().endswith(".parquet"):
            with fsspec.open(unit.uri, "rb") as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        return sum(1 for _ in _rows(unit))

    def read(self, unit: Unit) -> Iterator[dict]:
        """One record per row: the image it names, read if it lies where the manifest may point."""
        name = stable_path_id(unit.uri, unit.root)
        allowed = unit.allowed or (uri_root(unit.uri),)
        prefixes = tuple(locate(prefix) for prefix in allowed)
        row = -1
        try:
            for row, item, problem in _rows(unit):
                if item is None:
                    yield record(f"{name}#row{row}", source=unit.uri, error=problem)
                    continue
                uri_col = column(item, URI_COLUMNS)
                id_col = column(item, ID_COLUMNS)
                caption_col = column(item, CAPTION_COLUMNS)
                written = item.get(uri_col) if uri_col else None
                written = str(written).strip() if written is not None else ""
                given_id = item.get(id_col) if id_col else None
                given_id = str(given_id).strip() if given_id is not None else ""
                caption = clean_caption(item.get(caption_col)) if caption_col else None
                if not written:
                    problem = f"manifest row {row} has no uri"
                    yield record(given_id or f"{name}#row{row}", source=unit.uri, caption=caption, error=problem)
                    continue
                uri, image_id = _resolve(written, unit.uri), given_id or written
                try:
                    location = locate(uri)  # normalised once: the check and the read see the same location
                except UriError as error:
                    yield record(image_id, source=uri, caption=caption, error=str(error))
                    continue
                if allows(prefixes, location):
                    yield read_image_file(image_id, location, caption=caption, prefixes=prefixes)
                else:
                    problem = (
                        f"manifest {unit.uri} points outside where it may ({', '.join(allowed)}): {location.uri}; "
                        "allow it with --allow-uri-prefix"
                    )
                    yield record(image_id, source=location.uri, caption=caption, error=problem)
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a damaged manifest: keep the rows read so far
            problem = f"cannot read manifest after row {row}: {describe(error)}"
            yield record(f"{name}#unreadable", source=unit.uri, error=problem)


def uri_root(uri: str) -> str:
    """The default place a manifest's entries may point into: its folder on a local disk, its bucket
    on object storage, its folder URL on a web server."""
    return locate(uri).root().uri


def _resolve(value: str, manifest_uri: str) -> str:
    """A manifest's relative paths are relative to the manifest's folder; URLs and /paths are kept.
    Dot segments are left to `locate`, which cannot climb above a URL's host or bucket."""
    if SCHEME.match(value) or value.startswith("/"):
        return value
    return posixpath.join(posixpath.dirname(manifest_uri), value)


def _rows(unit: Unit) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number from 0, the row as a dict keyed by column name, or None and why it is unusable)."""
    lower = unit.uri.lower()
    if lower.endswith(".parquet"):
        with fsspec.open(unit.uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            wanted = (column(names, URI_COLUMNS), column(names, ID_COLUMNS), column(names, CAPTION_COLUMNS))
            columns = [c for c in wanted if c]
            row = 0
            for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                for item in batch.to_pylist():
                    yield row, item, None
                    row += 1
    elif lower.endswith(".csv"):
        with fsspec.open(unit.uri, "rt", encoding="utf-8-sig", newline="") as text:
            for row, item in enumerate(csv.DictReader(text)):
                yield row, {(k or "").strip(): v for k, v in item.items()}, None
    else:
        with fsspec.open(unit.uri, "rt", encoding="utf-8-sig") as text:
            row = 0
            for number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except ValueError as error:
                    yield row, None, f"line {number} is not JSON: {error}"
                else:
                    if isinstance(item, dict):
                        yield row, item, None
                    else:
                        yield row, None, f"line {number} is not a JSON object"
                row += 1
