"""Parquet files that hold the image bytes (img2dataset's parquet output, Hugging Face datasets): an
image's id is `{file id}/{key}` (its row number where there is no key column), its caption from a
caption column; img2dataset's rows of failed downloads (status other than success) are passed over."""

from __future__ import annotations

from collections.abc import Iterator

import fsspec
import pyarrow as pa
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
    parquet_schema,
    stable_path_id,
)
from memray.data.records import record

# Matched case-insensitively, in order of preference. img2dataset names its image column after the
# encode format (jpg by default); Hugging Face datasets use `image` (a struct of bytes and path).
IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "bytes")
_BATCH_ROWS = 64  # rows carry image bytes: keep batches small


class ImageParquets(Reader):
    """A parquet file with an image bytes column (a parquet without one may be a manifest)."""

    kind = "parquet"
    extensions = (".parquet",)
    description = "an image parquet (.parquet)"

    def refuses(self, fs, path: str) -> str:
        """Why the parquet is not an image parquet: unreadable, or no image bytes column."""
        schema, problem = parquet_schema(fs, path)
        if schema is not None and not _image_bytes_column(schema):
            problem = f"not an image parquet: no image bytes column ({', '.join(IMAGE_COLUMNS)})"
        return problem

    def count(self, unit: Unit) -> int | None:
        """The footer's row count, or the rows of `status == "success"` of an img2dataset parquet."""
        with fsspec.open(unit.uri, "rb") as handle:
            parquet = pq.ParquetFile(handle)
            status_col = column(parquet.schema_arrow.names, ("status",))
            if status_col is None:
                return parquet.metadata.num_rows
            statuses = parquet.read(columns=[status_col]).column(status_col)
            return sum(1 for status in statuses.to_pylist() if status == "success")

    def read(self, unit: Unit) -> Iterator[dict]:
        """The rows' images in file order, streamed a few rows at a time; a damaged file ends in one error record."""
        name = stable_path_id(unit.uri, unit.root)
        row = 0
        try:
            with fsspec.open(unit.uri, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                schema = parquet.schema_arrow
                image_col = _image_bytes_column(schema)
                if image_col is None:
                    problem = f"no image bytes column ({', '.join(IMAGE_COLUMNS)}) in {unit.uri}"
                    yield record(f"{name}#unreadable", source=unit.uri, error=problem)
                    return
                key_col = column(schema.names, ("key",))
                caption_col = column(schema.names, CAPTION_COLUMNS)
                status_col = column(schema.names, ("status",))
                columns = [c for c in (key_col, caption_col, status_col) if c] + [image_col]
                for batch in parquet.iter_batches(batch_size=_BATCH_ROWS, columns=columns):
                    values = {c: batch.column(c).to_pylist() for c in columns}
                    for i in range(batch.num_rows):
                        index, row = row, row + 1
                        if status_col and values[status_col][i] != "success":
                            continue  # img2dataset keeps rows of failed downloads, without bytes
                        key = values[key_col][i] if key_col else None
                        key = str(key) if key not in (None, "") else str(index)
                        image_id = member_id(unit, key)
                        data = values[image_col][i]
                        if isinstance(data, dict):
                            data = data.get("bytes")
                        caption = clean_caption(values[caption_col][i]) if caption_col else None
                        source = f"{unit.uri}#{key}"
                        if data is None:
                            yield record(image_id, source=source, caption=caption, error="no image bytes in this row")
                        elif len(data) > MAX_IMAGE_BYTES:
                            problem = f"image is over {MAX_IMAGE_BYTES} bytes"
                            yield record(image_id, source=source, caption=caption, error=problem)
                        else:
                            yield record(image_id, source=source, data=bytes(data), caption=caption)
        except MemoryError:
            raise
        except Exception as error:  # noqa: BLE001 - a damaged file: keep the rows read so far, report the rest
            problem = f"cannot read parquet after row {row}: {describe(error)}"
            yield record(f"{name}#unreadable", source=unit.uri, error=problem)


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
