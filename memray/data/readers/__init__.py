"""One reader per source format, found by the name its units carry (`Unit.kind`) in READERS.

A reader owns its file extensions (and, where two formats share one, the look at the content that
tells them apart), its image ids (docs/catalog.md, "Image ids"), its counting and its reading:
listing (memray.data.sources), counting, reading in Ray tasks and a cascade's stage 2 all find it
here, and nothing else dispatches on a format.

To add a format: a module here with a `Reader` subclass (`kind`, `extensions`, `description`,
`read`; `refuses` when the extension is not enough, `count` when the count is known without reading
images), and one entry below. Order matters where extensions overlap: the first reader that does not
refuse a file takes it (an image parquet before a parquet manifest).

Everything read is untrusted (web scrapes): nothing is ever unpickled, images are not decoded (the
auditor does that), and a damaged file becomes an error record instead of an exception, so one bad
shard cannot fail a whole distributed job.
"""

from __future__ import annotations

from memray.data.readers.base import Reader, Unit
from memray.data.readers.images import ImageFiles
from memray.data.readers.located import Located
from memray.data.readers.manifests import Manifests
from memray.data.readers.parquets import ImageParquets
from memray.data.readers.shards import WebdatasetShards

READERS: dict[str, Reader] = {
    reader.kind: reader for reader in (ImageFiles(), WebdatasetShards(), ImageParquets(), Manifests(), Located())
}


def reader_of(unit: Unit) -> Reader:
    """The reader of a unit, by its `kind`."""
    try:
        return READERS[unit.kind]
    except KeyError:
        raise ValueError(f"unknown unit kind {unit.kind!r}; expected one of {sorted(READERS)}") from None
