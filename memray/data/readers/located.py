"""Images read again from where their catalog rows say they were read (a cascade's stage 2), without
re-reading their shard. No source lists these: stage 2 makes its units from the rows (`Located.units`).

A row's `source` names the file, or `{container}#{key}` for a member of a shard or an image parquet;
for a member of an uncompressed tar, `source_offset` and `source_length` say where its bytes sit,
so one ranged read (a single GET on object storage) brings them back. Other members are found by
reading their container again. The bytes must hash to the row's `image_sha256`, or the record is
an error: the image changed since it was screened. Reads stay inside the prefixes the run was
allowed to read (its sources), like every other read of untrusted locations. The id is the row's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import fsspec

from memray.data.images import MAX_IMAGE_BYTES, ImageDecodeError, read_bytes, sha256_hex
from memray.data.readers.base import Reader, Unit
from memray.data.readers.parquets import ImageParquets
from memray.data.readers.shards import WebdatasetShards
from memray.data.records import record
from memray.data.uris import Location, UriError, allows, locate


class Located(Reader):
    """A chunk of images located by their catalog rows (kept as JSON in the unit)."""

    kind = "located"

    def units(self, rows: list[dict], allowed: tuple[str, ...], *, chunk: int = 64) -> list[Unit]:
        """Units of `chunk` rows each, in the order given, to be read again inside `allowed`."""
        return [
            Unit(
                self.kind,
                f"located:{start // chunk:06d}",
                allowed=tuple(allowed),
                located=json.dumps(rows[start : start + chunk]),
            )
            for start in range(0, len(rows), chunk)
        ]

    def count(self, unit: Unit) -> int:
        """One image per row."""
        return len(json.loads(unit.located))

    def read(self, unit: Unit) -> Iterator[dict]:
        """Each row's image, read again from its place."""
        for located in json.loads(unit.located):
            yield read_located(located, unit.allowed)


def _member_bytes(container: str, source: str) -> bytes:
    """The bytes of one member, found by reading its container again (compressed tars, parquet)."""
    parquets = ImageParquets()
    reader = parquets if parquets.owns(container) else WebdatasetShards()
    for found in reader.read(Unit(reader.kind, container)):
        if found["source"] == source:
            if found["error"]:
                raise ImageDecodeError(found["error"])
            return found["data"]
    raise ImageDecodeError(f"{source}: no such member in {container} any more")


def _byte_range(location: Location, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of the file at `location`: one ranged read (a single GET on object storage)."""
    if not 0 <= length <= MAX_IMAGE_BYTES:
        raise ImageDecodeError(f"{location.uri}: {length} bytes is over the {MAX_IMAGE_BYTES}-byte cap")
    if location.scheme == "file":
        with open(location.uri, "rb") as handle:
            handle.seek(offset)
            return handle.read(length)
    return fsspec.filesystem(location.scheme).cat_file("/".join(location.segments), start=offset, end=offset + length)


def read_located(located: dict, allowed: tuple[str, ...]) -> dict:
    """The record of one image read again from its row's place (keys: image_id, image_sha256, source,
    source_offset, source_length, caption, url, selected_by); faults become the record's error."""
    source = located["source"]
    container = source.rpartition("#")[0] if "#" in source else source
    keep = {k: located.get(k) for k in ("caption", "url", "source_offset", "source_length", "selected_by")}
    try:
        prefixes = tuple(locate(prefix) for prefix in allowed)
        location = locate(container)  # normalised once: the check and the read see the same location
        if not allows(prefixes, location):
            raise UriError(f"{container} is outside the sources this run may read ({', '.join(allowed)})")
        offset, length = located.get("source_offset"), located.get("source_length")
        if offset is not None and length is not None and location.scheme not in ("http", "https"):
            data = _byte_range(location, offset, length)
        elif "#" in source:
            data = _member_bytes(location.uri, source.replace(container, location.uri, 1))
        else:
            data = read_bytes(location, prefixes=prefixes)
    except (ImageDecodeError, UriError) as error:
        return record(located["image_id"], source=source, error=str(error), **keep)
    except Exception as error:  # noqa: BLE001 - any storage fault belongs to this image alone
        return record(located["image_id"], source=source, error=f"cannot read {source} again: {error}", **keep)
    expected = located.get("image_sha256")
    if expected and sha256_hex(data) != expected:
        problem = f"the bytes at {source} changed since the screen read them (sha256 {expected[:12]}...)"
        return record(located["image_id"], source=source, error=problem, **keep)
    return record(located["image_id"], source=source, data=data, **keep)
