"""The record of one image to audit: what every source yields and what the auditor takes.

The readers (memray.data.readers) yield it as a plain dict of these fields (Ray Data carries dicts), the
auditor rebuilds it with `ImageInput(**record)`: one definition for both ends.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class ImageInput:
    """One image to audit: its bytes (or where to read them) and what we know about it."""

    image_id: str
    data: bytes | None = None
    uri: str | None = None
    caption: str | None = None
    source: str | None = None  # where it was read: the file, or `{shard or parquet}#{key}` for a member
    error: str | None = None  # a fault found while reading (e.g. a truncated shard): recorded as is
    url: str | None = None  # where it was downloaded from, when the source says (img2dataset's url)
    # the bytes' place inside the container of `source` (an uncompressed tar member): one ranged read
    # finds them again without re-reading the shard (memray confirm)
    source_offset: int | None = None
    source_length: int | None = None
    selected_by: str | None = None  # why the cascade's stage 2 audits it: "screen", "calibration" or "request"


def record(image_id: str, **fields) -> dict:
    """An ImageInput as the plain dict a source yields.

    An id with a NUL in it is refused: C strings, terminals and file names end at a NUL, so two ids
    that differ after it would pass for one. The record becomes an error, its id shown escaped.
    """
    if "\x00" in image_id:
        fields = {**fields, "data": None, "error": f"the image id {image_id!r} contains a NUL character"}
        image_id = image_id.replace("\x00", "\\x00")
    return dataclasses.asdict(ImageInput(image_id, **fields))
