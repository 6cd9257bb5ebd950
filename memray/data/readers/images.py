"""Image files, named on their own or found under a folder, glob or brace pattern: one image each, its id
its path relative to the source's root (or its file name), its bytes read as they are."""

from __future__ import annotations

from collections.abc import Iterator

from memray.data.images import ImageDecodeError, read_bytes
from memray.data.readers.base import Reader, Unit, describe, stable_path_id
from memray.data.records import record
from memray.data.uris import Location, UriError, locate

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class ImageFiles(Reader):
    """An image file. Also the unit of a file in a source folder that must never be opened as what its
    name says (a pipe, a device): reading it is an error record naming what it is, without waiting on it."""

    kind = "image"
    extensions = IMAGE_EXTENSIONS
    description = f"an image ({', '.join(IMAGE_EXTENSIONS)})"

    def read(self, unit: Unit) -> Iterator[dict]:
        """The file's record; a link leading out of its source folder is an error record."""
        image_id = stable_path_id(unit.uri, unit.root)
        try:
            location = locate(unit.uri)
        except UriError as error:
            yield record(image_id, source=unit.uri, uri=unit.uri, error=str(error))
            return
        # A symbolic link in a source folder is read like a file, unless it leads out of the folder.
        if unit.root is not None and not location.within(locate(unit.root)):
            error = f"{unit.uri} links outside its source {unit.root}"
            yield record(image_id, source=unit.uri, uri=unit.uri, error=error)
            return
        yield read_image_file(image_id, location)

    def count(self, unit: Unit) -> int:
        """One image."""
        return 1


def read_image_file(
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
        return record(image_id, source=uri, uri=uri, caption=caption, error=f"cannot read {uri}: {describe(error)}")
    return record(image_id, source=uri, uri=uri, caption=caption, data=data)
