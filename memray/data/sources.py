"""Enumerate image sources and read them as raw bytes, over any fsspec filesystem. No Ray here.

A source string names a folder, a glob, a single image, a webdataset shard (or a brace pattern of
shards, ``s3://b/laion/{00000..00099}.tar``), an img2dataset parquet with image bytes, or a
manifest (Parquet, CSV or JSONL listing image URIs). `list_units` turns it into units of reading
work, cheap to ship to a Ray task; `read_unit` turns one unit into records shaped like
`memray.auditing.runner.ImageInput`.

Everything read here is untrusted (web scrapes): nothing is ever unpickled (tar members such as
``.pkl``/``.pt``/``.npy`` are skipped unread), images are not decoded (the auditor does that), and
a damaged shard or file becomes an error record instead of an exception, so one bad shard cannot
fail a whole distributed job.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import posixpath
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from memray.data.images import MAX_IMAGE_BYTES, ImageDecodeError, read_bytes
from memray.data.records import record
from memray.data.uris import Location, UriError, allows, locate, normal_prefix
from memray.errors import SourceError

log = logging.getLogger(__name__)

__all__ = [
    "IMAGE_EXTENSIONS",
    "SourceError",
    "Unit",
    "count_images",
    "expand_braces",
    "list_units",
    "read_unit",
    "stable_path_id",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
MANIFEST_TEXT_EXTENSIONS = (".csv", ".jsonl", ".ndjson")

# Columns, matched case-insensitively, in order of preference. img2dataset names its image column
# after the encode format (jpg by default); Hugging Face datasets use `image` (a struct of bytes
# and path); LAION metadata parquets spell URL and TEXT in capitals.
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "bytes")
URI_COLUMNS = ("uri", "url", "path")
ID_COLUMNS = ("id", "image_id")
CAPTION_COLUMNS = ("caption", "text")

# Caption side files (.txt, .json) bigger than this are ignored.
MAX_TEXT_BYTES = 1024 * 1024
# A brace pattern that expands to more names than this is a typo, not a dataset.
MAX_BRACE_EXPANSION = 1_000_000

_PARQUET_BATCH_ROWS = 64  # rows carry image bytes: keep batches small
_MANIFEST_BATCH_ROWS = 4096
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_GLOB_CHARS = "*?["
_TAR_IMAGE_EXTS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


@dataclass(frozen=True)
class Unit:
    """One unit of reading work: an image file, a tar shard, an image parquet or a manifest.

    `root` is set for files found under a folder, glob or brace pattern: ids are relative to it
    (image_id). `allowed` lists the URI prefixes a manifest's entries may point into.
    """

    kind: str  # "image" | "tar" | "parquet" | "manifest"
    uri: str
    root: str | None = None
    allowed: tuple[str, ...] = ()


# ----------------------------------------------------------------------------------------------
# Identifiers
# ----------------------------------------------------------------------------------------------


def _strip_scheme(uri: str) -> str:
    return _SCHEME.sub("", uri, count=1)


def stable_path_id(uri: str, root: str | None) -> str:
    """The id of a file: its posix path relative to `root`, or its file name without one.

    THE id rule (docs/catalog.md, "image ids"): an image file's id is this; an image inside a
    shard or an image parquet is `{this id of its container}/{its key}`, since keys are unique
    only within their container; a manifest row's id is the id it gives, else its uri as written.
    Only the path is compared (``file:///d/a.jpg`` under ``/d`` is ``a.jpg``), so the id does not
    change when the same folder is named with or without a scheme, or moved to another bucket.
    """
    path = _strip_scheme(uri).rstrip("/")
    if root is None:
        return path.rsplit("/", 1)[-1]
    base = _strip_scheme(root).rstrip("/")
    if not base:
        relative = path
    elif path.startswith(base + "/"):
        relative = path[len(base) + 1 :]
    else:
        raise ValueError(f"{uri} is not under {root}")
    relative = relative.lstrip("/")
    return relative or path.rsplit("/", 1)[-1]


def _lower_name(path: str) -> str:
    return path.rsplit("/", 1)[-1].lower()


def _is_image(path: str) -> bool:
    return _lower_name(path).endswith(IMAGE_EXTENSIONS)


def _is_tar(path: str) -> bool:
    return _lower_name(path).endswith(TAR_EXTENSIONS)


def _is_parquet(path: str) -> bool:
    return _lower_name(path).endswith(".parquet")


def _is_text_manifest(path: str) -> bool:
    return _lower_name(path).endswith(MANIFEST_TEXT_EXTENSIONS)


def _tar_stem(path: str) -> str:
    lower = path.lower()
    for ext in sorted(TAR_EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return path[: -len(ext)]
    return path


def _sibling_parquet(tar_path: str) -> str:
    """img2dataset writes `{shard}.parquet` (key, url, caption, status, ...) next to `{shard}.tar`."""
    return _tar_stem(tar_path) + ".parquet"


# ----------------------------------------------------------------------------------------------
# Brace patterns
# ----------------------------------------------------------------------------------------------


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level(body: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in body:
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += char == "{"
        depth -= char == "}"
        current.append(char)
    parts.append("".join(current))
    return parts


def _range(start: str, stop: str) -> list[str]:
    # As in bash: a leading zero on either end pads every number to the longer end's width.
    padded = (len(start) > 1 and start[0] == "0") or (len(stop) > 1 and stop[0] == "0")
    width = max(len(start), len(stop)) if padded else 0
    first, last = int(start), int(stop)
    if abs(last - first) + 1 > MAX_BRACE_EXPANSION:
        raise SourceError(f"brace range {{{start}..{stop}}} expands to more than {MAX_BRACE_EXPANSION} names")
    step = 1 if last >= first else -1
    return [str(n).zfill(width) for n in range(first, last + step, step)]


def expand_braces(pattern: str) -> list[str]:
    """Expand `{000..012}` numeric ranges (keeping zero padding) and `{a,b}` lists, bash style.

    Several and nested braces multiply out, in order. A brace with neither a range nor a comma is
    kept literally, as bash does.
    """
    start = pattern.find("{")
    while start != -1:
        end = _matching_brace(pattern, start)
        if end == -1:
            return [pattern]
        body = pattern[start + 1 : end]
        head, tail = pattern[:start], pattern[end + 1 :]
        numeric = _RANGE.match(body)
        if numeric:
            alternatives = _range(numeric.group(1), numeric.group(2))
        else:
            alternatives = _split_top_level(body)
            if len(alternatives) < 2:
                start = pattern.find("{", start + 1)  # literal brace: look further on
                continue
        tails = expand_braces(tail)
        expanded = []
        for alternative in alternatives:
            for part in expand_braces(alternative):  # braces nested inside a list
                expanded.extend(head + part + rest for rest in tails)
                if len(expanded) > MAX_BRACE_EXPANSION:
                    raise SourceError(f"brace pattern {pattern} expands to more than {MAX_BRACE_EXPANSION} names")
        return expanded
    return [pattern]


def _has_braces(path: str) -> bool:
    return expand_braces(path) != [path]


def _has_glob(path: str) -> bool:
    return any(char in path for char in _GLOB_CHARS)


def _pattern_root(path: str) -> str:
    """The folder before the first wildcard or brace: image ids are relative to it."""
    cut = min((i for i in (path.find(c) for c in "{" + _GLOB_CHARS) if i != -1), default=len(path))
    prefix = path[:cut]
    return prefix.rsplit("/", 1)[0] if "/" in prefix else ""


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


class _Listing:
    """One source's filesystem and how its paths turn back into URIs in the source's own style."""

    def __init__(self, source: str):
        self.source = source
        try:
            self.fs, self.path = fsspec.core.url_to_fs(source)
        except (ImportError, ValueError) as error:
            raise SourceError(f"cannot open source {source}: {error}") from error
        self.local = isinstance(self.fs, LocalFileSystem)
        self.keep_scheme = bool(_SCHEME.match(source))

    def uri(self, path: str) -> str:
        # Local paths stay plain (but absolute: Ray workers do not share the driver's cwd).
        if self.local and not self.keep_scheme:
            return path
        return self.fs.unstrip_protocol(path)


def list_units(source: str, *, allow_uri_prefixes: tuple[str, ...] = ()) -> list[Unit]:
    """Turn a source string into units of reading work, sorted by URI (deterministic).

    A manifest's entries may point into its own root (uri_root) and into `allow_uri_prefixes`
    only: a manifest is data, and must not make a worker read /etc/shadow or an internal server.
    """
    if not isinstance(source, str) or not source.strip():
        raise SourceError("empty source")
    prefixes = tuple(normal_prefix(prefix) for prefix in allow_uri_prefixes)
    listing = _Listing(source.strip())
    path = listing.path
    if _has_braces(path):
        units = _list_pattern(listing, expand_braces(path), brace=True)
    elif _has_glob(path):
        units = _list_pattern(listing, [path], brace=False)
    else:
        units = _list_path(listing, path)
    unique = {unit.uri: unit for unit in units}
    return [
        dataclasses.replace(unique[uri], allowed=(uri_root(uri), *prefixes))
        if unique[uri].kind == "manifest"
        else unique[uri]
        for uri in sorted(unique)
    ]


def uri_root(uri: str) -> str:
    """The default place a manifest's entries may point into: its folder on a local disk, its bucket
    on object storage, its folder URL on a web server."""
    return locate(uri).root().uri


def _info(listing: _Listing, path: str) -> dict:
    try:
        return listing.fs.info(path)
    except FileNotFoundError as error:
        raise SourceError(f"no such source: {listing.source}") from error
    except OSError as error:
        raise SourceError(f"cannot read source {listing.source}: {error}") from error


def _list_path(listing: _Listing, path: str) -> list[Unit]:
    info = _info(listing, path)
    if info.get("type") == "directory":
        files = _files_under(listing, path)
        units = _collect(listing, [], files, image_root=path)
        if not units:
            raise SourceError(f"no image files, .tar shards or image parquet files under {listing.source}")
        return units
    if not _regular(listing, path):
        raise SourceError(f"{listing.source} is not a regular file")
    return [_classify_named_file(listing, path)]


def _regular(listing: _Listing, path: str) -> bool:
    """Whether a file can be opened without waiting on it: a FIFO on a local disk would block its reader
    (object stores hold only regular files). A missing or unreadable file counts as regular: its read says why."""
    if not listing.local:
        return True
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return True


def _files_under(listing: _Listing, folder: str) -> list[str]:
    """Every file below `folder` (symbolic links, pipes and devices too: reading checks where they lead
    and what they are), skipping hidden files and folders (.git, .ipynb_checkpoints, ._x.jpg)."""
    found = listing.fs.find(folder, detail=True)
    base = folder.rstrip("/")
    files = []
    for path, info in found.items():
        if info.get("type") == "directory" and not info.get("islink"):
            continue
        relative = path[len(base) + 1 :] if path.startswith(base + "/") else path.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        files.append(path)
    return files


def _classify_named_file(listing: _Listing, path: str) -> Unit:
    """A file named on its own: anything it cannot be is an error, not a silent skip."""
    uri = listing.uri(path)
    if _is_image(path):
        return Unit("image", uri)
    if _is_tar(path):
        return Unit("tar", uri)
    if _is_parquet(path):
        kind, reason = _parquet_kind(listing.fs, path)
        if kind is None:
            raise SourceError(f"{listing.source}: {reason}")
        return Unit(kind, uri)
    if _is_text_manifest(path):
        reason = _text_manifest_problem(listing.fs, path)
        if reason:
            raise SourceError(f"{listing.source}: {reason}")
        return Unit("manifest", uri)
    raise SourceError(
        f"unsupported source file {listing.source}: expected an image "
        f"({', '.join(IMAGE_EXTENSIONS)}), a .tar shard, a .parquet, .csv or .jsonl file, or a folder"
    )


def _collect(listing: _Listing, named: list[str], in_folders: list[str], image_root: str) -> list[Unit]:
    """Units for files matched by a pattern (`named`) and files found inside folders.

    A tar's sibling parquet only describes the tar, so it is never a unit of its own. Manifests are
    taken only when matched by name: one lying in an image folder usually lists that same folder.
    Files of other kinds (stats JSON, README, .pkl) are skipped.
    """
    every = named + in_folders
    siblings = {_sibling_parquet(p) for p in every if _is_tar(p)}
    root_uri = listing.uri(image_root)
    units = []
    for path, named_here in [(p, True) for p in named] + [(p, False) for p in in_folders]:
        uri = listing.uri(path)
        readable_kind = _is_image(path) or _is_tar(path) or _is_parquet(path)
        if readable_kind and not _regular(listing, path):
            units.append(Unit("image", uri, root_uri))  # never opened: its read is an error row naming it
        elif _is_image(path):
            units.append(Unit("image", uri, root_uri))
        elif _is_tar(path):
            units.append(Unit("tar", uri, root_uri))
        elif _is_parquet(path) and path not in siblings:
            kind, reason = _parquet_kind(listing.fs, path)
            if kind == "parquet" or (kind == "manifest" and named_here):
                units.append(Unit(kind, uri, root_uri))
            elif kind is None:
                log.warning("skipping %s: %s", uri, reason)
        elif named_here and _is_text_manifest(path):
            reason = _text_manifest_problem(listing.fs, path)
            if reason:
                log.warning("skipping %s: %s", uri, reason)
            else:
                units.append(Unit("manifest", uri))
    return units


def _list_pattern(listing: _Listing, candidates: list[str], *, brace: bool) -> list[Unit]:
    fs = listing.fs
    root = _pattern_root(listing.path)
    matched: dict[str, dict] = {}
    literal: dict[str, list[str]] = {}
    for candidate in candidates:
        if _has_glob(candidate):
            matched.update(fs.glob(candidate, detail=True))
        else:
            literal.setdefault(candidate.rsplit("/", 1)[0] if "/" in candidate else "", []).append(candidate)
    missing = []
    for parent, names in literal.items():
        # One listing per folder instead of one existence check per shard (100s of requests on S3).
        try:
            present = {entry["name"].rstrip("/"): entry for entry in fs.ls(parent or "/", detail=True)}
        except (FileNotFoundError, NotADirectoryError):
            present = {}
        for name in names:
            entry = present.get(name.rstrip("/"))
            if entry is None:
                missing.append(name)
            else:
                matched[name] = entry
    if not matched:
        raise SourceError(f"no such source: {listing.source} (the pattern matches nothing)")
    if missing:
        shown = ", ".join(listing.uri(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        log.warning(
            "%d of %d names of %s do not exist: %s%s", len(missing), len(candidates), listing.source, shown, more
        )
    named, in_folders = [], []
    for path, info in matched.items():
        if info.get("type") == "directory":
            in_folders.extend(_files_under(listing, path))
        else:
            named.append(path)
    units = _collect(listing, named, in_folders, image_root=root)
    if not units:
        kind = "brace pattern" if brace else "glob"
        raise SourceError(f"the {kind} {listing.source} matches no image, shard, parquet or manifest file")
    return units


# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------


def _column(names: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    by_lower = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    for want in wanted:
        if want in by_lower:
            return by_lower[want]
    return None


def _is_binary(dtype: pa.DataType) -> bool:
    checks = (pa.types.is_binary, pa.types.is_large_binary, getattr(pa.types, "is_binary_view", None))
    return any(check is not None and check(dtype) for check in checks)


def _image_bytes_column(schema: pa.Schema) -> str | None:
    """The first image column holding bytes: binary, or a Hugging Face struct<bytes, path>."""
    by_lower = {}
    for field in schema:
        by_lower.setdefault(field.name.lower(), field)
    for want in IMAGE_COLUMNS:
        field = by_lower.get(want)
        if field is None:
            continue
        if _is_binary(field.type):
            return field.name
        if pa.types.is_struct(field.type):
            index = field.type.get_field_index("bytes")
            if index != -1 and _is_binary(field.type.field(index).type):
                return field.name
    return None


def _parquet_kind(fs, path: str) -> tuple[str | None, str]:
    try:
        with fs.open(path, "rb") as handle:
            schema = pq.read_schema(handle)
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        if isinstance(error, MemoryError):
            raise
        return None, f"not a readable parquet file: {error}"
    if _image_bytes_column(schema):
        return "parquet", ""
    if _column(schema.names, URI_COLUMNS):
        return "manifest", ""
    return None, (
        f"parquet has neither an image bytes column ({', '.join(IMAGE_COLUMNS)}) "
        f"nor a uri column ({', '.join(URI_COLUMNS)}); columns: {', '.join(schema.names)}"
    )


def _text_manifest_problem(fs, path: str) -> str:
    """Why a CSV/JSONL file is not a manifest (no uri column), or '' when it is one."""
    try:
        with fs.open(path, "rt", encoding="utf-8-sig", newline="") as text:
            if _lower_name(path).endswith(".csv"):
                header = next(csv.reader(text), [])
                columns = [c.strip() for c in header]
            else:
                first = next((line for line in text if line.strip()), "")
                row = json.loads(first) if first else {}
                columns = list(row) if isinstance(row, dict) else []
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as error:
        return f"cannot read manifest: {error}"
    if _column(columns, URI_COLUMNS):
        return ""
    return f"manifest has no uri column ({', '.join(URI_COLUMNS)}); columns: {', '.join(columns) or 'none'}"


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _clean_caption(value) -> str | None:
    if value is None:
        return None
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip()
    return text or None


def read_unit(unit: Unit) -> Iterator[dict]:
    """Yield one record per image of `unit` (keys as `ImageInput`, plus `error`).

    Faults of the data (a missing file, a truncated shard, a bad row) come back as records with
    `error` set and `data` None; this never raises for them.
    """
    readers = {"image": _read_image, "tar": _read_tar, "parquet": _read_parquet, "manifest": _read_manifest}
    reader = readers.get(unit.kind)
    if reader is None:
        raise ValueError(f"unknown unit kind {unit.kind!r}; expected one of {sorted(readers)}")
    return reader(unit)


def _read_image(unit: Unit) -> Iterator[dict]:
    image_id = stable_path_id(unit.uri, unit.root)
    try:
        location = locate(unit.uri)
    except UriError as error:
        yield record(image_id, source=unit.uri, uri=unit.uri, error=str(error))
        return
    # A symbolic link in a source folder is read like a file, unless it leads out of the folder.
    if unit.root is not None and not location.within(locate(unit.root)):
        yield record(image_id, source=unit.uri, uri=unit.uri, error=f"{unit.uri} links outside its source {unit.root}")
        return
    yield _read_image_record(image_id, location)


def _read_image_record(
    image_id: str, location: Location, *, caption: str | None = None, prefixes: tuple[Location, ...] | None = None
) -> dict:
    """The record of one image file, its bytes read at `location` (under the one size cap, redirects
    only within `prefixes`), or why not."""
    uri = location.uri
    try:
        data = read_bytes(location, prefixes=prefixes)
    except MemoryError:
        raise
    except ImageDecodeError as error:
        return record(image_id, source=uri, uri=uri, caption=caption, error=str(error))
    except Exception as error:  # noqa: BLE001 - any storage error belongs to this image alone
        return record(image_id, source=uri, uri=uri, caption=caption, error=f"cannot read {uri}: {_describe(error)}")
    return record(image_id, source=uri, uri=uri, caption=caption, data=data)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def count_images(unit: Unit) -> int | None:
    """How many records `read_unit(unit)` yields, where that is known without reading any image.

    Exact for an image file (1), a manifest (its rows: reading a manifest reads no image) and a
    parquet file (the footer's row count, or the number of `status == "success"` rows of an
    img2dataset parquet); None for tar shards, which only a full read can count, and for a file
    that cannot be read.
    """
    if unit.kind == "image":
        return 1
    if unit.kind == "manifest" and not unit.uri.lower().endswith(".parquet"):
        try:
            return sum(1 for _ in _manifest_rows(unit))
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - a count is a courtesy; read_unit reports the damage
            return None
    if unit.kind not in ("parquet", "manifest") or not unit.uri.lower().endswith(".parquet"):
        return None
    try:
        with fsspec.open(unit.uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            status_col = _column(parquet.schema_arrow.names, ("status",)) if unit.kind == "parquet" else None
            if status_col is None:
                return parquet.metadata.num_rows
            statuses = parquet.read(columns=[status_col]).column(status_col)
            return sum(1 for status in statuses.to_pylist() if status == "success")
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a count is a courtesy; read_unit reports the damage
        return None


# --- webdataset tar ------------------------------------------------------------------------


def _split_member(name: str) -> tuple[str, str] | None:
    """webdataset's rule: the key is the path up to the first dot of the file name, the rest the extension."""
    name = name.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if not base or base.startswith(".") or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _end_aware_tarinfo(state: dict) -> type[tarfile.TarInfo]:
    """A TarInfo that records how the archive ended.

    tarfile stops quietly when the data runs out at (or inside) a header after the first one, so
    a shard cut at a member boundary would look complete. A real end is a block of zeros; anything
    else is recorded here and reported as damage.
    """

    class _TarInfo(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, archive):
            try:
                return super().fromtarfile(archive)
            except tarfile.EOFHeaderError:
                state["end"] = "clean"
                raise
            except tarfile.EmptyHeaderError:
                state["end"] = f"the data ends at byte {archive.offset} without the end-of-archive marker"
                raise
            except tarfile.TruncatedHeaderError:
                state["end"] = f"the data ends inside the header at byte {archive.offset}"
                raise
            except tarfile.HeaderError as error:
                state["end"] = f"{str(error) or type(error).__name__} at byte {archive.offset}"
                raise

    return _TarInfo


class _SiblingCaptions:
    """Captions from the shard's img2dataset parquet, read on first need, at most once."""

    def __init__(self, tar_uri: str):
        self.uri = _sibling_parquet(tar_uri)
        self.captions: dict[str, str] | None = None

    def get(self, key: str) -> str | None:
        if self.captions is None:
            self.captions = self._load()
        return self.captions.get(key)

    def _load(self) -> dict[str, str]:
        try:
            with fsspec.open(self.uri, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                key_col = _column(parquet.schema_arrow.names, ("key",))
                caption_col = _column(parquet.schema_arrow.names, CAPTION_COLUMNS)
                if key_col is None or caption_col is None:
                    log.warning(
                        "ignoring the captions of %s: it has no key and caption columns (columns: %s)",
                        self.uri,
                        ", ".join(parquet.schema_arrow.names),
                    )
                    return {}
                table = parquet.read(columns=[key_col, caption_col])
        except FileNotFoundError:
            return {}
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - captions are optional: a bad sidecar loses them only
            log.warning("ignoring unreadable caption parquet %s: %s", self.uri, _describe(error))
            return {}
        captions = {}
        for key, caption in zip(table.column(key_col).to_pylist(), table.column(caption_col).to_pylist()):
            caption = _clean_caption(caption)
            if key is not None and caption is not None:
                captions[str(key)] = caption
        return captions


def _member_id(unit: Unit, key: str) -> str:
    """The id of an image inside a shard or an image parquet: qualified by its container (stable_path_id)."""
    return f"{stable_path_id(unit.uri, unit.root)}/{key}"


def _tar_samplerecord(
    unit: Unit,
    key: str,
    parts: dict,
    exts: list[str],
    sidecar: _SiblingCaptions,
    places: dict,
    irregular: dict[str, str],
) -> dict:
    source = f"{unit.uri}#{key}"
    image_id = _member_id(unit, key)
    caption = _clean_caption(parts.get("txt"))
    if caption is None:
        caption = sidecar.get(key)
    meta = None
    if "json" in parts:
        try:
            meta = json.loads(parts["json"])
        except ValueError:
            meta = None
    meta = meta if isinstance(meta, dict) else {}
    if caption is None and isinstance(meta.get("caption"), str):
        caption = _clean_caption(meta["caption"])
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    image_ext = next((ext for ext in _TAR_IMAGE_EXTS if ext in exts), None)
    if image_ext is None:
        return record(
            image_id, source=source, caption=caption, error=f"no image in sample (members: {', '.join(exts)})"
        )
    if image_ext in irregular:
        error = f"image member {key}.{image_ext} is {irregular[image_ext]}, not a regular file: not read"
        return record(image_id, source=source, caption=caption, error=error)
    if image_ext not in parts:
        return record(
            image_id,
            source=source,
            caption=caption,
            error=f"image member {key}.{image_ext} is over {MAX_IMAGE_BYTES} bytes, not read",
        )
    offset, length = places.get(image_ext, (None, None))
    return record(
        image_id,
        source=source,
        data=parts[image_ext],
        caption=caption,
        url=url,
        source_offset=offset,
        source_length=length,
    )


def _read_tar(unit: Unit) -> Iterator[dict]:
    shard = stable_path_id(unit.uri, unit.root)
    sidecar = _SiblingCaptions(unit.uri)
    try:
        opened = fsspec.open(unit.uri, "rb")
        raw = opened.__enter__()
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001
        yield record(f"{shard}#unreadable", source=unit.uri, error=f"cannot read tar {unit.uri}: {_describe(error)}")
        return
    state: dict = {}
    done = 0
    key, parts, exts, places, irregular = None, {}, [], {}, {}
    # Members of an uncompressed tar sit at fixed byte offsets: one ranged read finds one again.
    plain = unit.uri.lower().endswith(".tar")
    damage = None
    try:
        archive = tarfile.open(fileobj=raw, mode="r|*", tarinfo=_end_aware_tarinfo(state))
        while True:
            member = archive.next()
            if member is None:
                break
            archive.members.clear()  # streaming: do not keep every header of a 10k-sample shard
            if member.isdir():
                continue
            split = _split_member(member.name)
            if split is None:
                continue
            member_key, ext = split
            if member_key != key:
                if key is not None:
                    yield _tar_samplerecord(unit, key, parts, exts, sidecar, places, irregular)
                    done += 1
                key, parts, exts, places, irregular = member_key, {}, [], {}, {}
            exts.append(ext)
            # Links, devices and pipes are never followed or read: the sample says what its member is.
            if not member.isfile():
                irregular.setdefault(ext, _member_kind(member))
            # Only images and caption files are read; everything else (.pkl, .pt, .npy) stays unread.
            elif ext in _TAR_IMAGE_EXTS and ext not in parts and member.size <= MAX_IMAGE_BYTES:
                parts[ext] = _read_member(archive, member)
                if plain:
                    places[ext] = (member.offset_data, member.size)
            elif ext in ("txt", "json") and member.size <= MAX_TEXT_BYTES:
                parts[ext] = _read_member(archive, member)
        if state.get("end") != "clean":
            damage = state.get("end") or "the archive ends without its end-of-archive marker"
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - tarfile, zlib, lzma, storage errors: all mean a bad shard
        damage = _describe(error)
    finally:
        opened.__exit__(None, None, None)
    if damage is None:
        if key is not None:
            yield _tar_samplerecord(unit, key, parts, exts, sidecar, places, irregular)
        return
    # The last sample may be missing members (or be cut inside its image): only samples whose end
    # was seen are trusted.
    lost = f"; sample {key} incomplete" if key is not None else ""
    yield record(
        f"{shard}#truncated",
        source=unit.uri,
        error=f"truncated or corrupt tar: {damage} (after {done} complete sample{'' if done == 1 else 's'}{lost})",
    )


def _member_kind(member: tarfile.TarInfo) -> str:
    """What a tar member that is not a regular file is, for an error row."""
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    return "a FIFO" if member.isfifo() else "a device"


def _read_member(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    return handle.read() if handle is not None else b""


# --- img2dataset parquet --------------------------------------------------------------------


def _read_parquet(unit: Unit) -> Iterator[dict]:
    name = stable_path_id(unit.uri, unit.root)
    row = 0
    try:
        with fsspec.open(unit.uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            schema = parquet.schema_arrow
            image_col = _image_bytes_column(schema)
            if image_col is None:
                yield record(
                    f"{name}#unreadable",
                    source=unit.uri,
                    error=f"no image bytes column ({', '.join(IMAGE_COLUMNS)}) in {unit.uri}",
                )
                return
            key_col = _column(schema.names, ("key",))
            caption_col = _column(schema.names, CAPTION_COLUMNS)
            status_col = _column(schema.names, ("status",))
            columns = [c for c in (key_col, caption_col, status_col) if c] + [image_col]
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                values = {c: batch.column(c).to_pylist() for c in columns}
                for i in range(batch.num_rows):
                    index, row = row, row + 1
                    if status_col and values[status_col][i] != "success":
                        continue  # img2dataset keeps rows of failed downloads, without bytes
                    key = values[key_col][i] if key_col else None
                    key = str(key) if key not in (None, "") else str(index)
                    image_id = _member_id(unit, key)
                    data = values[image_col][i]
                    if isinstance(data, dict):
                        data = data.get("bytes")
                    caption = _clean_caption(values[caption_col][i]) if caption_col else None
                    source = f"{unit.uri}#{key}"
                    if data is None:
                        yield record(image_id, source=source, caption=caption, error="no image bytes in this row")
                    elif len(data) > MAX_IMAGE_BYTES:
                        yield record(
                            image_id, source=source, caption=caption, error=f"image is over {MAX_IMAGE_BYTES} bytes"
                        )
                    else:
                        yield record(image_id, source=source, data=bytes(data), caption=caption)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged file: keep the rows read so far, report the rest
        yield record(
            f"{name}#unreadable", source=unit.uri, error=f"cannot read parquet after row {row}: {_describe(error)}"
        )


# --- manifests -------------------------------------------------------------------------------


def _resolve(value: str, manifest_uri: str) -> str:
    """A manifest's relative paths are relative to the manifest's folder; URLs and /paths are kept.
    Dot segments are left to `locate`, which cannot climb above a URL's host or bucket."""
    if _SCHEME.match(value) or value.startswith("/"):
        return value
    return posixpath.join(posixpath.dirname(manifest_uri), value)


def _manifest_rows(unit: Unit) -> Iterator[tuple[int, dict | None, str | None]]:
    """(row number from 0, the row as a dict keyed by column name, or None and why it is unusable)."""
    lower = unit.uri.lower()
    if lower.endswith(".parquet"):
        with fsspec.open(unit.uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            names = parquet.schema_arrow.names
            wanted = (_column(names, URI_COLUMNS), _column(names, ID_COLUMNS), _column(names, CAPTION_COLUMNS))
            columns = [c for c in wanted if c]
            row = 0
            for batch in parquet.iter_batches(batch_size=_MANIFEST_BATCH_ROWS, columns=columns):
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


def _read_manifest(unit: Unit) -> Iterator[dict]:
    name = stable_path_id(unit.uri, unit.root)
    allowed = unit.allowed or (uri_root(unit.uri),)
    prefixes = tuple(locate(prefix) for prefix in allowed)
    row = -1
    try:
        for row, item, problem in _manifest_rows(unit):
            if item is None:
                yield record(f"{name}#row{row}", source=unit.uri, error=problem)
                continue
            uri_col = _column(item, URI_COLUMNS)
            id_col = _column(item, ID_COLUMNS)
            caption_col = _column(item, CAPTION_COLUMNS)
            written = item.get(uri_col) if uri_col else None
            written = str(written).strip() if written is not None else ""
            given_id = item.get(id_col) if id_col else None
            given_id = str(given_id).strip() if given_id is not None else ""
            caption = _clean_caption(item.get(caption_col)) if caption_col else None
            if not written:
                yield record(
                    given_id or f"{name}#row{row}",
                    source=unit.uri,
                    caption=caption,
                    error=f"manifest row {row} has no uri",
                )
                continue
            # Without an id, the id is the uri as written: it stays the same when the manifest and
            # its images move together.
            uri, image_id = _resolve(written, unit.uri), given_id or written
            try:
                location = locate(uri)  # normalised once: the check and the read see the same location
            except UriError as error:
                yield record(image_id, source=uri, caption=caption, error=str(error))
                continue
            if allows(prefixes, location):
                yield _read_image_record(image_id, location, caption=caption, prefixes=prefixes)
            else:
                problem = (
                    f"manifest {unit.uri} points outside where it may ({', '.join(allowed)}): {location.uri}; "
                    "allow it with --allow-uri-prefix"
                )
                yield record(image_id, source=location.uri, caption=caption, error=problem)
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - a damaged manifest: keep the rows read so far
        yield record(
            f"{name}#unreadable", source=unit.uri, error=f"cannot read manifest after row {row}: {_describe(error)}"
        )
