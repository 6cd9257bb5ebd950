"""What every reader shares: the unit of reading work, the reader's shape, the id of a file, and the
small rules of reading untrusted columns and captions."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")

# Columns, matched case-insensitively, in order of preference. LAION metadata parquets spell URL and
# TEXT in capitals.
CAPTION_COLUMNS = ("caption", "text")


@dataclass(frozen=True)
class Unit:
    """One unit of reading work, cheap to ship to a Ray task: a file (an image, a shard, an image parquet,
    a manifest), or a chunk of images located by their catalog rows.

    `kind` names its reader in READERS. `root` is set for files found under a folder, glob or brace
    pattern: ids are relative to it (stable_path_id). `allowed` lists the URI prefixes a manifest's
    entries, or located images, may be read from; `located` holds a located chunk's rows as JSON.
    """

    kind: str
    uri: str
    root: str | None = None
    allowed: tuple[str, ...] = ()
    located: str = ""


class Reader:
    """One source format: the files it reads, how its images are named (docs/catalog.md, "Image ids"), how
    it counts and reads them. Every fault of the data becomes an error record, never an exception.

    A reader sets `kind` (its key in READERS, the name its units carry), `extensions` (lowercase file
    name endings; none: never listed from a source) and `description`, and defines `read`; the other
    methods default to what fits a file of images read as it is.
    """

    kind: str = ""
    extensions: tuple[str, ...] = ()
    description: str = ""  # names the format in the message listing what a source file may be
    in_folders: bool = True  # its files are units when found inside a folder, not only when named

    def owns(self, path: str) -> bool:
        """Whether the file's name ends in one of this reader's extensions."""
        return path.rsplit("/", 1)[-1].lower().endswith(self.extensions)

    def refuses(self, fs, path: str) -> str:
        """Why a file with this reader's extension is not one it reads ('' when it is), from its content."""
        return ""

    def companions(self, path: str) -> tuple[str, ...]:
        """Files this file's unit reads beside it, which are therefore no units of their own."""
        return ()

    def unit(self, uri: str, root: str | None, prefixes: tuple[str, ...]) -> Unit:
        """The unit of one of its files (`prefixes`: where a source may point besides its own root)."""
        return Unit(self.kind, uri, root)

    def read(self, unit: Unit) -> Iterator[dict]:
        """One record per image of the unit (keys as `ImageInput`, `error` set for a fault of the data)."""
        raise NotImplementedError(f"{type(self).__name__} reads nothing")

    def count(self, unit: Unit) -> int | None:
        """How many records `read` yields, where that is known without reading any image (None: only reading
        tells). It may raise on a damaged unit: the count is then unknown (sources.count_images)."""
        return None

    def prefixes(self, unit: Unit) -> tuple[str, ...]:
        """Where the unit's images lie: what a cascade's stage 2 may read again."""
        return (unit.root or unit.uri,)


def _strip_scheme(uri: str) -> str:
    return SCHEME.sub("", uri, count=1)


def stable_path_id(uri: str, root: str | None) -> str:
    """The id of a file: its posix path relative to `root`, or its file name without one.

    THE id rule (docs/catalog.md, "image ids"): an image file's id is this; an image inside a
    shard or an image parquet is `{this id of its container}/{its key}` (member_id), since keys are
    unique only within their container; a manifest row's id is the id it gives, else its uri as written.
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


def member_id(unit: Unit, key: str) -> str:
    """The id of an image inside a shard or an image parquet: qualified by its container (stable_path_id)."""
    return f"{stable_path_id(unit.uri, unit.root)}/{key}"


def column(names: Iterable[str], wanted: tuple[str, ...]) -> str | None:
    """The first of `wanted` among `names`, compared case-insensitively, as `names` spells it."""
    by_lower = {}
    for name in names:
        by_lower.setdefault(name.lower(), name)
    for want in wanted:
        if want in by_lower:
            return by_lower[want]
    return None


def parquet_schema(fs, path: str) -> tuple[pa.Schema | None, str]:
    """A parquet file's schema from its footer, or None and why it cannot be read."""
    try:
        with fs.open(path, "rb") as handle:
            return pq.read_schema(handle), ""
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
        return None, f"not a readable parquet file: {error}"


def clean_caption(value) -> str | None:
    """A caption as text without surrounding blanks; None for none or an empty one."""
    if value is None:
        return None
    text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
    text = text.strip()
    return text or None


def describe(error: BaseException) -> str:
    """An exception as one line for an error record: its type, and its message where it has one."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
