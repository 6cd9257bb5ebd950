"""A LAION-shaped image set with known memorization: img2dataset's output layout, filled from the
demo model's world, for the cascade's benchmark and end-to-end tests.

img2dataset (webdataset output) writes, per shard, `{shard:05d}.tar` holding `{key}.jpg`,
`{key}.txt` (the caption) and `{key}.json` (the row's metadata), and a sibling `{shard:05d}.parquet`
with one row per URL tried: key, url, caption, status ("success" or "failed_to_download"),
error_message, width, height, original_width, original_height, exif, sha256, and the LAION
metadata columns it was asked to keep (similarity, punsafe, pwatermark). Keys are the shard number
and the row's index in it (`{shard:05d}{index:04d}`); failed downloads have a parquet row and no
tar members.

The images are what the demo model saw or never saw (memray.demo): every planted image of the
shipped demo set, each in a few near-duplicate copies (re-encoded, resized), as a scrape holds
them; the demo's hard negatives; normal training images (seen one to four times, captions as
trained); never-trained scenes from the held-out stream; a few failed downloads and truncated
JPEGs. `truth.parquet` beside the shards (not part of the layout) gives each key's ground truth:
what it is a copy of, its group, training copies and the graded caption and empty-prompt rates
of the demo manifest (measured for planted images and hard negatives; 0 for never-trained scenes,
and unmeasured, NULL, for normal training images, which the demo set shows do not replicate).
"""

from __future__ import annotations

import gzip
import io
import json
import random
import tarfile
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from memray.catalog.files import open_fs, parquet_bytes, put_atomic
from memray.demo import (
    CAPTION_DETAILS,
    DEMO_ASSETS,
    generated_scene,
    read_demo_manifest,
    render_scene,
    scene_caption,
    trained_demo_manifest,
)

# How a scrape re-encodes one image: (JPEG quality, side in pixels; None keeps the side).
COPY_VARIANTS = ((95, None), (80, None), (90, 64), (85, 48))


@dataclass
class LaionItem:
    """One row of the set before it is laid out in shards."""

    source_id: str  # the demo image it shows: planted-x1024-0021, normal-000123, heldout-000042, ...
    caption: str
    image: Image.Image | None  # None: a failed download
    quality: int = 90
    side: int | None = None
    truncated: bool = False  # a JPEG cut short, as a scrape sometimes stores one
    copy: int = 0


def _demo_image(record: dict) -> Image.Image:
    return Image.open(trained_demo_manifest().parent / record["uri"]).convert("RGB")


def _train_index() -> list[dict]:
    """The demo model's training set: id, split, caption and copies of every distinct image."""
    with gzip.open(DEMO_ASSETS / "train_index.jsonl.gz", "rt") as handle:
        return [json.loads(line) for line in handle]


def training_copies() -> dict[str, int]:
    """How many times the demo model saw each training image, by demo id (absent: never)."""
    return {row["id"]: row["copies"] for row in _train_index()}


def _normal_training_items(count: int, rng: random.Random) -> list[LaionItem]:
    """`count` distinct normal training images with the captions they were trained under."""
    normal = [row for row in _train_index() if row["split"] == "normal"]
    chosen = rng.sample(normal, count)
    items = []
    for row in chosen:
        index = int(row["id"].rsplit("-", 1)[1])
        image = render_scene(generated_scene(0, "normal", index), 32)
        items.append(LaionItem(row["id"], row["caption"], image))
    return items


def _heldout_items(count: int, rng: random.Random, first: int = 10) -> list[LaionItem]:
    """Never-trained scenes from the held-out stream (the demo set uses its first `first`)."""
    items = []
    for index in range(first, first + count):
        scene = generated_scene(0, "heldout", index)
        detail = rng.choices(CAPTION_DETAILS, weights=(0.4, 0.3, 0.3))[0]
        items.append(LaionItem(f"heldout-{index:06d}", scene_caption(scene, detail), render_scene(scene, 32)))
    return items


def build_items(images: int, *, copies: int = 3, failed: int = 4, truncated: int = 2, seed: int = 0) -> list[LaionItem]:
    """The set's rows in shard order: planted copies, hard negatives, normal and held-out scenes, faults."""
    rng = random.Random(f"memray-laion/{seed}")
    demo = read_demo_manifest(trained_demo_manifest())
    items = []
    for record in demo:
        if record["split"] == "planted":
            for k, (quality, side) in enumerate(COPY_VARIANTS[:copies]):
                items.append(
                    LaionItem(record["id"], record["caption"] or "", _demo_image(record), quality, side, copy=k)
                )
        elif record["split"] == "hard":
            items.append(LaionItem(record["id"], record["caption"] or "", _demo_image(record)))
    rest = images - len(items) - failed - truncated
    if rest < 2:
        raise ValueError(f"{images} images cannot hold the {len(items)} planted copies and hard negatives")
    normal = _normal_training_items(rest // 2, rng)
    heldout = _heldout_items(rest - rest // 2, rng)
    items += normal + heldout
    for k in range(failed):
        items.append(LaionItem(f"failed-{k}", "a picture that could not be downloaded", None))
    for k, item in enumerate(rng.sample(heldout, truncated)):
        items.append(LaionItem(item.source_id, item.caption, item.image, truncated=True, copy=k + 1))
    rng.shuffle(items)
    return items


def _jpeg(item: LaionItem) -> bytes:
    image = item.image
    if item.side:
        image = image.resize((item.side, item.side), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=item.quality)
    data = buffer.getvalue()
    return data[: len(data) // 2] if item.truncated else data


def _tar_member(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    archive.addfile(info, io.BytesIO(data))


def write_laion_set(
    url: str, images: int = 2000, *, shard_size: int = 500, seed: int = 0, copies: int = 3
) -> list[str]:
    """Write the set under `url` (a folder or an fsspec URL); returns the shard URLs.

    Also writes `truth.parquet` beside the shards: per key, the demo image it shows, its copy
    number, and the demo manifest's ground truth (module docstring).
    """
    import hashlib

    fs, root = open_fs(url)
    items = build_items(images, copies=copies, seed=seed)
    demo = {r["id"]: r for r in read_demo_manifest(trained_demo_manifest())}
    meta_rng = random.Random(f"memray-laion/{seed}/metadata")
    shards, truth = [], []
    for shard, start in enumerate(range(0, len(items), shard_size)):
        rows, tar = [], io.BytesIO()
        with tarfile.open(fileobj=tar, mode="w") as archive:
            for index, item in enumerate(items[start : start + shard_size]):
                key = f"{shard:05d}{index:04d}"
                url_of = f"https://images.example.org/{item.source_id}/{item.copy}.jpg"
                laion = dict(
                    similarity=round(meta_rng.uniform(0.28, 0.42), 4),
                    punsafe=round(meta_rng.uniform(0.0, 0.05), 4),
                    pwatermark=round(meta_rng.uniform(0.0, 0.6), 4),
                )
                row = dict(key=key, url=url_of, caption=item.caption, **laion)
                if item.image is None:
                    row.update(status="failed_to_download", error_message="HTTP Error 404: Not Found")
                    row.update(
                        width=None, height=None, original_width=None, original_height=None, exif=None, sha256=None
                    )
                else:
                    data = _jpeg(item)
                    side = item.side or item.image.size[0]
                    row.update(status="success", error_message=None, width=side, height=side)
                    row.update(
                        original_width=side, original_height=side, exif="{}", sha256=hashlib.sha256(data).hexdigest()
                    )
                    _tar_member(archive, f"{key}.jpg", data)
                    _tar_member(archive, f"{key}.txt", item.caption.encode())
                    _tar_member(archive, f"{key}.json", json.dumps(row).encode())
                rows.append(row)
                record = demo.get(item.source_id, {})
                truth.append(
                    dict(
                        key=key,
                        shard=f"{shard:05d}",
                        source_id=item.source_id,
                        copy=item.copy,
                        split=record.get("split") or item.source_id.split("-", 1)[0],
                        duplicates=record.get("duplicates", 0 if item.source_id.startswith("heldout") else None),
                        truth_caption_rate=record.get(
                            "truth_caption_rate", 0.0 if item.source_id.startswith("heldout") else None
                        ),
                        truth_uncond_rate=record.get(
                            "truth_uncond_rate", 0.0 if item.source_id.startswith("heldout") else None
                        ),
                        status=row["status"] if not item.truncated else "truncated",
                    )
                )
        put_atomic(fs, f"{root}/{shard:05d}.tar", tar.getvalue())
        put_atomic(fs, f"{root}/{shard:05d}.parquet", parquet_bytes(pa.Table.from_pylist(rows)))
        shards.append(
            fs.unstrip_protocol(f"{root}/{shard:05d}.tar") if "://" in str(url) else f"{root}/{shard:05d}.tar"
        )
    put_atomic(fs, f"{root}/truth.parquet", parquet_bytes(pa.Table.from_pylist(truth)))
    return shards


def read_truth(url: str) -> list[dict]:
    """The ground truth written beside a set by write_laion_set, one dict per key."""
    fs, root = open_fs(url)
    with fs.open(f"{root}/truth.parquet", "rb") as handle:
        return pq.read_table(handle).to_pylist()
