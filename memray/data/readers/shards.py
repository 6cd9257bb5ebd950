"""Webdataset tar shards, img2dataset's layout: samples `{key}.jpg/.txt/.json`, captions from the .txt,
else the sibling `{shard}.parquet`, else the .json (which also gives the url); an image's id is
`{shard id}/{key}`, and in an uncompressed shard its byte range is recorded for one ranged read later.

The shard is streamed, never extracted: only image, .txt and .json members are read (nothing is ever
unpickled: .pkl/.pt/.npy members stay unread), a link, device or pipe member is an error record
naming it, and a shard that ends early keeps the samples whose end was seen and reports the rest.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Iterator

import fsspec
import pyarrow.parquet as pq

from memray.data.images import MAX_IMAGE_BYTES
from memray.data.readers.base import (
    CAPTION_COLUMNS,
    Reader,
    Unit,
    clean_caption,
    column,
    describe,
    member_id,
    stable_path_id,
)
from memray.data.readers.images import IMAGE_EXTENSIONS
from memray.data.records import record

log = logging.getLogger(__name__)

SHARD_EXTENSIONS = (".tar", ".tar.gz", ".tgz")
# Caption side files (.txt, .json) bigger than this are ignored.
MAX_TEXT_BYTES = 1024 * 1024
_MEMBER_IMAGE_EXTENSIONS = tuple(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)


class WebdatasetShards(Reader):
    """A webdataset shard (plain or gzipped tar); its sibling parquet is read with it, never on its own."""

    kind = "tar"
    extensions = SHARD_EXTENSIONS
    description = f"a webdataset shard ({', '.join(SHARD_EXTENSIONS)})"

    def companions(self, path: str) -> tuple[str, ...]:
        """The sibling parquet img2dataset writes next to the shard (key, url, caption, status, ...)."""
        return (sibling_parquet(path),)

    def read(self, unit: Unit) -> Iterator[dict]:
        """The shard's samples in their order, then one error record if the shard is damaged."""
        shard = stable_path_id(unit.uri, unit.root)
        sidecar = _SiblingCaptions(unit.uri)
        try:
            opened = fsspec.open(unit.uri, "rb")
            raw = opened.__enter__()
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001
            problem = f"cannot read tar {unit.uri}: {describe(error)}"
            yield record(f"{shard}#unreadable", source=unit.uri, error=problem)
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
                        yield _sample_record(unit, key, parts, exts, sidecar, places, irregular)
                        done += 1
                    key, parts, exts, places, irregular = member_key, {}, [], {}, {}
                exts.append(ext)
                # Links, devices and pipes are never followed or read: the sample says what its member is.
                if not member.isfile():
                    irregular.setdefault(ext, _member_kind(member))
                # Only images and caption files are read; everything else (.pkl, .pt, .npy) stays unread.
                elif ext in _MEMBER_IMAGE_EXTENSIONS and ext not in parts and member.size <= MAX_IMAGE_BYTES:
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
            damage = describe(error)
        finally:
            opened.__exit__(None, None, None)
        if damage is None:
            if key is not None:
                yield _sample_record(unit, key, parts, exts, sidecar, places, irregular)
            return
        # The last sample may be missing members (or be cut inside its image): only samples whose end
        # was seen are trusted.
        lost = f"; sample {key} incomplete" if key is not None else ""
        yield record(
            f"{shard}#truncated",
            source=unit.uri,
            error=f"truncated or corrupt tar: {damage} (after {done} complete sample{'' if done == 1 else 's'}{lost})",
        )


def sibling_parquet(shard_path: str) -> str:
    """img2dataset writes `{shard}.parquet` (key, url, caption, status, ...) next to `{shard}.tar`."""
    for ext in sorted(SHARD_EXTENSIONS, key=len, reverse=True):
        if shard_path.lower().endswith(ext):
            return shard_path[: -len(ext)] + ".parquet"
    return shard_path + ".parquet"


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
        self.uri = sibling_parquet(tar_uri)
        self.captions: dict[str, str] | None = None

    def get(self, key: str) -> str | None:
        if self.captions is None:
            self.captions = self._load()
        return self.captions.get(key)

    def _load(self) -> dict[str, str]:
        try:
            with fsspec.open(self.uri, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                key_col = column(parquet.schema_arrow.names, ("key",))
                caption_col = column(parquet.schema_arrow.names, CAPTION_COLUMNS)
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
            log.warning("ignoring unreadable caption parquet %s: %s", self.uri, describe(error))
            return {}
        captions = {}
        for key, caption in zip(table.column(key_col).to_pylist(), table.column(caption_col).to_pylist()):
            caption = clean_caption(caption)
            if key is not None and caption is not None:
                captions[str(key)] = caption
        return captions


def _sample_record(
    unit: Unit,
    key: str,
    parts: dict,
    exts: list[str],
    sidecar: _SiblingCaptions,
    places: dict,
    irregular: dict[str, str],
) -> dict:
    source = f"{unit.uri}#{key}"
    image_id = member_id(unit, key)
    caption = clean_caption(parts.get("txt"))
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
        caption = clean_caption(meta["caption"])
    url = meta.get("url") if isinstance(meta.get("url"), str) else None
    image_ext = next((ext for ext in _MEMBER_IMAGE_EXTENSIONS if ext in exts), None)
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
