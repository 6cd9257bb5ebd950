"""Enumerate image sources as units of reading work, over any fsspec filesystem, and read them. No Ray here.

A source string names a folder, a glob, a single image, a webdataset shard (or a brace pattern of
shards, ``s3://b/laion/{00000..00099}.tar``), an img2dataset parquet with image bytes, or a
manifest (Parquet, CSV or JSONL listing image URIs). `list_units` turns it into units of reading
work, cheap to ship to a Ray task, each named after the reader of its format (memray.data.readers);
`read_unit` turns one unit into records shaped like `memray.data.records.ImageInput`, and
`count_images` says how many, where that is known without reading images.
"""

from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterator

import fsspec
from fsspec.implementations.local import LocalFileSystem

from memray.data.readers import READERS, Reader, reader_of
from memray.data.readers.base import SCHEME, Unit, stable_path_id
from memray.data.readers.images import ImageFiles
from memray.data.uris import normal_prefix
from memray.errors import SourceError

log = logging.getLogger(__name__)

__all__ = [
    "SourceError",
    "Unit",
    "count_images",
    "expand_braces",
    "list_units",
    "read_unit",
    "stable_path_id",
]

# A brace pattern that expands to more names than this is a typo, not a dataset.
MAX_BRACE_EXPANSION = 1_000_000

_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_GLOB_CHARS = "*?["


def read_unit(unit: Unit) -> Iterator[dict]:
    """Yield one record per image of `unit` (keys as `ImageInput`, plus `error`).

    Faults of the data (a missing file, a truncated shard, a bad row) come back as records with
    `error` set and `data` None; this never raises for them.
    """
    return reader_of(unit).read(unit)


def count_images(unit: Unit) -> int | None:
    """How many records `read_unit(unit)` yields, where that is known without reading any image.

    Exact for an image file (1), a manifest (its rows: reading a manifest reads no image), a
    parquet file (the footer's row count, or the number of `status == "success"` rows of an
    img2dataset parquet) and located images (their rows); None for tar shards, which only a full
    read can count, and for a file that cannot be read.
    """
    try:
        return reader_of(unit).count(unit)
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - a count is a courtesy; reading the unit reports the damage
        return None


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
    """One source's filesystem, how its paths turn back into URIs in the source's own style, and where
    its manifests may point besides their own root."""

    def __init__(self, source: str, prefixes: tuple[str, ...]):
        self.source = source
        try:
            self.fs, self.path = fsspec.core.url_to_fs(source)
        except (ImportError, ValueError) as error:
            raise SourceError(f"cannot open source {source}: {error}") from error
        self.local = isinstance(self.fs, LocalFileSystem)
        self.keep_scheme = bool(SCHEME.match(source))
        self.prefixes = prefixes

    def uri(self, path: str) -> str:
        # Local paths stay plain (but absolute: Ray workers do not share the driver's cwd).
        if self.local and not self.keep_scheme:
            return path
        return self.fs.unstrip_protocol(path)


def list_units(source: str, *, allow_uri_prefixes: tuple[str, ...] = ()) -> list[Unit]:
    """Turn a source string into units of reading work, sorted by URI (deterministic).

    A manifest's entries may point into its own root (its folder or bucket) and into
    `allow_uri_prefixes` only: a manifest is data, and must not make a worker read /etc/shadow or an
    internal server.
    """
    if not isinstance(source, str) or not source.strip():
        raise SourceError("empty source")
    listing = _Listing(source.strip(), tuple(normal_prefix(prefix) for prefix in allow_uri_prefixes))
    path = listing.path
    if _has_braces(path):
        units = _list_pattern(listing, expand_braces(path), brace=True)
    elif _has_glob(path):
        units = _list_pattern(listing, [path], brace=False)
    else:
        units = _list_path(listing, path)
    unique = {unit.uri: unit for unit in units}
    return [unique[uri] for uri in sorted(unique)]


def _owners(path: str) -> list[Reader]:
    """The readers whose extensions the file's name ends in, in READERS' order."""
    return [reader for reader in READERS.values() if reader.owns(path)]


def _reader_for(listing: _Listing, path: str) -> tuple[Reader | None, str]:
    """The first reader owning the file's extension that takes its content, or None and why none does."""
    problems = []
    for reader in _owners(path):
        problem = reader.refuses(listing.fs, path)
        if not problem:
            return reader, ""
        problems.append(problem)
    return None, "; ".join(dict.fromkeys(problems))


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
    return [_named_file_unit(listing, path)]


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


def _named_file_unit(listing: _Listing, path: str) -> Unit:
    """A file named on its own: anything it cannot be is an error, not a silent skip."""
    if not _owners(path):
        formats = ", ".join(reader.description for reader in READERS.values() if reader.extensions)
        raise SourceError(f"unsupported source file {listing.source}: expected {formats}, or a folder")
    reader, problem = _reader_for(listing, path)
    if reader is None:
        raise SourceError(f"{listing.source}: {problem}")
    return reader.unit(listing.uri(path), None, listing.prefixes)


def _collect(listing: _Listing, named: list[str], in_folders: list[str], image_root: str) -> list[Unit]:
    """Units for files matched by a pattern (`named`) and files found inside folders.

    A file a unit reads beside its own (a shard's sibling parquet) is never a unit of its own. A file
    found inside a folder is looked at only when some reader takes files from folders, and is a unit
    only when its reader does (a manifest is taken only when named: one lying in an image folder
    usually lists that same folder). Files of no format are skipped; files of a format whose readers
    all refuse them are skipped with a warning saying why.
    """
    every = named + in_folders
    companions = {companion for p in every for reader in _owners(p) for companion in reader.companions(p)}
    root_uri = listing.uri(image_root)
    units = []
    for path, named_here in [(p, True) for p in named] + [(p, False) for p in in_folders]:
        owners = _owners(path)
        if not (owners if named_here else [reader for reader in owners if reader.in_folders]):
            continue  # of no format (stats JSON, README, .pkl), or a manifest inside a folder: never opened
        uri = listing.uri(path)
        if not _regular(listing, path):  # never opened either: read as an image file, an error row naming it
            units.append(Unit(ImageFiles.kind, uri, root_uri))
            continue
        if path in companions:
            continue
        reader, problem = _reader_for(listing, path)
        if reader is None:
            log.warning("skipping %s: %s", uri, problem)
        elif named_here or reader.in_folders:
            units.append(reader.unit(uri, root_uri, listing.prefixes))
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
