"""Image sources over fsspec: folders, globs, webdataset shards, img2dataset parquet, manifests.

Every source here is a real file: tars written with tarfile in img2dataset's layout, parquet
written with pyarrow, in tmp_path and in fsspec's memory:// filesystem.
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import pickle
import pickletools
import tarfile
import uuid
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import memray.data.readers as readers
import memray.data.readers.shards as shards
import memray.data.sources as sources
from memray.data.records import ImageInput
from memray.data.sources import (
    SourceError,
    Unit,
    count_images,
    expand_braces,
    list_units,
    read_unit,
    stable_path_id,
)

# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def _image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    image = Image.new("RGB", (8, 8), (seed * 40 % 256, seed * 90 % 256, seed * 10 % 256))
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def _tar_bytes(members: list[tuple[str, bytes]], *, gz: bool = False) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if gz else "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1_700_000_000
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _parquet_bytes(table: pa.Table) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def _key(shard: int, index: int) -> str:
    # img2dataset: key = shard id and index within the shard, zero padded (9 digits in all)
    return f"{shard:05d}{index:04d}"


def _img2dataset_shard(shard: int, samples: int = 3, *, txt: bool = True, json_caption: bool = True):
    """Members of `{shard:05d}.tar` and the rows of its sibling parquet, as img2dataset writes them."""
    members, rows, images = [], [], {}
    for i in range(samples):
        key = _key(shard, i)
        images[key] = _image_bytes(shard * 10 + i)
        caption = f"a photo {shard}-{i}"
        members.append((f"{key}.jpg", images[key]))
        if txt:
            members.append((f"{key}.txt", caption.encode()))
        meta = {"key": key, "url": f"http://example.com/{key}.jpg", "status": "success"}
        if json_caption:
            meta["caption"] = f"json {shard}-{i}"
        members.append((f"{key}.json", json.dumps(meta).encode()))
        rows.append({"key": key, "url": meta["url"], "caption": f"parquet {shard}-{i}", "status": "success"})
    # a failed download: a parquet row, no sample in the tar
    rows.append(
        {
            "key": _key(shard, samples),
            "url": "http://example.com/gone.jpg",
            "caption": "gone",
            "status": "failed_to_download",
        }
    )
    return members, pa.Table.from_pylist(rows), images


def _write(path: str, data: bytes) -> None:
    with fsspec.open(path, "wb") as handle:
        handle.write(data)


@pytest.fixture
def bucket():
    """A fresh memory:// bucket, removed afterwards."""
    name = f"bucket-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(f"/{name}"):
        fs.rm(f"/{name}", recursive=True)


@pytest.fixture
def shard_folder(tmp_path):
    """An img2dataset webdataset output folder: 00000..00002.tar, sibling parquets, stats files."""
    folder = tmp_path / "laion"
    folder.mkdir()
    expected = {}
    for shard in range(3):
        members, table, images = _img2dataset_shard(shard)
        (folder / f"{shard:05d}.tar").write_bytes(_tar_bytes(members))
        (folder / f"{shard:05d}.parquet").write_bytes(_parquet_bytes(table))
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 3}))
        expected.update(images)
    return folder, expected


def _all(units) -> list[dict]:
    return [record for unit in units for record in read_unit(unit)]


# ----------------------------------------------------------------------------------------------
# Webdataset shards
# ----------------------------------------------------------------------------------------------


def test_folder_of_img2dataset_shards_lists_tars_not_their_parquets(shard_folder):
    folder, expected = shard_folder
    units = list_units(str(folder))
    assert units == [Unit("tar", str(folder / f"{s:05d}.tar"), str(folder)) for s in range(3)]

    records = _all(units)
    # a key is unique only within its shard: the id is qualified by the shard
    assert [r["image_id"] for r in records] == [f"{key[:5]}.tar/{key}" for key in sorted(expected)]
    for record in records:
        key = record["image_id"].split("/", 1)[1]
        assert record["error"] is None
        assert record["data"] == expected[key]
        assert record["uri"] is None
        shard = key[:5]
        assert record["source"] == f"{folder / (shard + '.tar')}#{key}"
        # .txt wins over the sibling parquet and the .json
        assert record["caption"] == f"a photo {int(shard)}-{int(key[5:])}"
    assert set(records[0]) == {f.name for f in dataclasses.fields(ImageInput)}
    # an uncompressed shard's member is where the record says: one ranged read finds its bytes again
    for record in records:
        with open(record["source"].rpartition("#")[0], "rb") as shard:
            shard.seek(record["source_offset"])
            assert shard.read(record["source_length"]) == record["data"]


def test_tar_caption_falls_back_to_sibling_parquet_then_json(tmp_path):
    members, table, _ = _img2dataset_shard(0, txt=False)
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    (tmp_path / "00000.parquet").write_bytes(_parquet_bytes(table))
    records = list(read_unit(Unit("tar", str(tmp_path / "00000.tar"))))
    assert [r["caption"] for r in records] == ["parquet 0-0", "parquet 0-1", "parquet 0-2"]

    (tmp_path / "00000.parquet").unlink()
    records = list(read_unit(Unit("tar", str(tmp_path / "00000.tar"))))
    assert [r["caption"] for r in records] == ["json 0-0", "json 0-1", "json 0-2"]

    members, _, _ = _img2dataset_shard(1, txt=False, json_caption=False)
    (tmp_path / "00001.tar").write_bytes(_tar_bytes(members))
    records = list(read_unit(Unit("tar", str(tmp_path / "00001.tar"))))
    assert [r["caption"] for r in records] == [None, None, None]
    assert all(r["data"] for r in records)


def test_tar_sibling_parquet_is_read_once_per_shard(tmp_path, monkeypatch):
    members, table, _ = _img2dataset_shard(0, samples=5, txt=False)
    (tmp_path / "00000.tar").write_bytes(_tar_bytes(members))
    (tmp_path / "00000.parquet").write_bytes(_parquet_bytes(table))
    loads = []
    original = shards._SiblingCaptions._load
    monkeypatch.setattr(shards._SiblingCaptions, "_load", lambda self: loads.append(1) or original(self))
    records = list(read_unit(Unit("tar", str(tmp_path / "00000.tar"))))
    assert len(records) == 5 and loads == [1]


def test_tar_groups_members_by_key_whatever_their_order(tmp_path):
    data = _image_bytes(1, "PNG")
    members = [
        ("a.txt", b"  caption of a \n"),
        ("a.PNG", data),
        ("sub/b.json", b'{"caption": "from json"}'),
        ("sub/b.jpeg", _image_bytes(2)),
        ("c.txt", b"lonely caption"),
        ("d.seg.png", _image_bytes(3, "PNG")),  # webdataset: key "d", extension "seg.png" (not the image)
        ("d.webp", _image_bytes(4, "WEBP")),
    ]
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar_bytes(members))
    records = list(read_unit(Unit("tar", str(path))))
    assert [r["image_id"] for r in records] == ["shard.tar/a", "shard.tar/sub/b", "shard.tar/c", "shard.tar/d"]
    assert records[0]["caption"] == "caption of a" and records[0]["data"] == data
    assert records[1]["caption"] == "from json"
    # a sample with a caption but no image is reported, not dropped
    assert records[2]["data"] is None and records[2]["caption"] == "lonely caption"
    assert "no image in sample" in records[2]["error"]
    assert records[3]["data"] == _image_bytes(4, "WEBP")


def _cut_inside_member(tar: bytes, index: int) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        member = archive.getmembers()[index]
    return tar[: member.offset_data + member.size // 2]


def test_truncated_tar_yields_complete_samples_then_one_error(tmp_path):
    members = [(f"{_key(0, i)}.jpg", _image_bytes(i) * 4) for i in range(4)]  # one member per sample
    members.insert(1, (f"{_key(0, 0)}.txt", b"first"))
    tar = _tar_bytes(members)
    path = tmp_path / "00000.tar"
    path.write_bytes(_cut_inside_member(tar, 2))  # members: 0.jpg, 0.txt, 1.jpg (cut), ...

    records = list(read_unit(Unit("tar", str(path))))
    assert [r["image_id"] for r in records] == [f"00000.tar/{_key(0, 0)}", "00000.tar#truncated"]
    assert records[0]["data"] == _image_bytes(0) * 4 and records[0]["caption"] == "first"
    damaged = records[-1]
    assert damaged["data"] is None
    assert damaged["error"].startswith("truncated or corrupt tar: ")
    assert "after 1 complete sample;" in damaged["error"] and _key(0, 1) in damaged["error"]
    assert damaged["source"] == str(path)


def test_tar_cut_at_a_member_boundary_is_still_reported(tmp_path):
    members = [(f"{_key(0, i)}.jpg", _image_bytes(i)) for i in range(3)]
    tar = _tar_bytes(members)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        last = archive.getmembers()[1]
    boundary = last.offset_data + -(-last.size // 512) * 512  # the end of member 2, before member 3's header
    for cut in (tar[:boundary], tar[: boundary + 100]):  # at the boundary; inside the next header
        path = tmp_path / "cut.tar"
        path.write_bytes(cut)
        records = list(read_unit(Unit("tar", str(path))))
        assert [r["image_id"] for r in records] == [f"cut.tar/{_key(0, 0)}", "cut.tar#truncated"]
        assert "truncated or corrupt tar" in records[-1]["error"]
        assert "the data ends" in records[-1]["error"]


@pytest.mark.parametrize("payload", [b"", b"this is not a tar file at all" * 40], ids=["empty", "garbage"])
def test_not_a_tar_is_one_error_record(tmp_path, payload):
    path = tmp_path / "bad.tar"
    path.write_bytes(payload)
    records = list(read_unit(Unit("tar", str(path))))
    assert len(records) == 1
    assert records[0]["image_id"] == "bad.tar#truncated"
    assert records[0]["error"].startswith("truncated or corrupt tar")


def test_gzipped_shard_reads_and_its_truncation_is_reported(tmp_path):
    members = [(f"{_key(0, i)}.jpg", os.urandom(3000)) for i in range(3)]
    good = tmp_path / "00000.tar.gz"
    good.write_bytes(_tar_bytes(members, gz=True))
    assert list_units(str(good)) == [Unit("tar", str(good))]
    assert [r["data"] for r in read_unit(Unit("tar", str(good)))] == [m[1] for m in members]

    cut = tmp_path / "00001.tar.gz"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    records = list(read_unit(Unit("tar", str(cut))))
    assert records[-1]["image_id"] == "00001.tar.gz#truncated"
    assert all(r["error"] is None for r in records[:-1])


def test_missing_tar_is_an_error_record(tmp_path):
    records = list(read_unit(Unit("tar", str(tmp_path / "nope.tar"))))
    assert len(records) == 1 and records[0]["data"] is None
    assert records[0]["image_id"] == "nope.tar#unreadable" and "cannot read tar" in records[0]["error"]


class _Exploit:
    """Unpickling this runs a shell command."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_pickle_members_are_never_unpickled(tmp_path, monkeypatch):
    sentinel = tmp_path / "SENTINEL"
    payload = pickle.dumps(_Exploit(sentinel))
    # the payload is live: it calls os.system (posix.system) with our command
    strings = [arg for _, arg, _ in pickletools.genops(payload) if isinstance(arg, str)]
    assert "system" in strings and f"touch {sentinel}" in strings

    image = _image_bytes(7)
    members = [
        (f"{_key(0, 0)}.jpg", image),
        (f"{_key(0, 0)}.pkl", payload),
        (f"{_key(0, 0)}.pt", payload),
        ("evil.pkl", payload),
        ("evil.npy", payload),
    ]
    path = tmp_path / "00000.tar"
    path.write_bytes(_tar_bytes(members))

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    records = list(read_unit(list_units(str(path))[0]))

    assert not sentinel.exists()
    assert records[0]["image_id"] == f"00000.tar/{_key(0, 0)}" and records[0]["data"] == image
    assert records[0]["error"] is None
    assert records[1]["image_id"] == "00000.tar/evil" and records[1]["data"] is None
    assert "no image in sample" in records[1]["error"]
    assert all(payload != r["data"] for r in records)


# ----------------------------------------------------------------------------------------------
# Brace patterns and globs
# ----------------------------------------------------------------------------------------------


def test_expand_braces():
    assert expand_braces("s3://b/{00000..00003}.tar") == [f"s3://b/0000{i}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]  # no padding without a leading zero
    assert expand_braces("{1..010}") == [f"{i:03d}" for i in range(1, 11)]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("x{a,b{1..2}}") == ["xa", "xb1", "xb2"]
    assert expand_braces("plain/{x}/path") == ["plain/{x}/path"]
    with pytest.raises(SourceError, match="expands to more than"):
        expand_braces("{0..99999999}")


def test_brace_pattern_keeps_padding_and_skips_missing_shards(bucket):
    for shard in (0, 1, 3):  # 00002 is missing
        members, table, _ = _img2dataset_shard(shard)
        _write(f"{bucket}/laion/{shard:05d}.tar", _tar_bytes(members))
        _write(f"{bucket}/laion/{shard:05d}.parquet", _parquet_bytes(table))
    units = list_units(f"{bucket}/laion/{{00000..00003}}.tar")
    base = "memory:///" + bucket.removeprefix("memory://")  # memory paths are absolute: the canonical URI has 3 slashes
    assert units == [Unit("tar", f"{base}/laion/{s:05d}.tar", f"{base}/laion") for s in (0, 1, 3)]
    records = _all(units)
    assert len(records) == 9 and all(r["error"] is None for r in records)
    assert records[0]["caption"] == "a photo 0-0"

    assert list_units(f"{bucket}/laion/{{00003,00000}}.tar") == [units[0], units[2]]
    with pytest.raises(SourceError, match=r"\{00004\.\.00009\}"):
        list_units(f"{bucket}/laion/{{00004..00009}}.tar")
    with pytest.raises(SourceError, match="no such source"):
        list_units(f"{bucket}/nowhere/{{00000..00002}}.tar")


def test_brace_pattern_on_local_disk(shard_folder):
    folder, expected = shard_folder
    units = list_units(str(folder / "{00001..00005}.tar"))
    assert units == [Unit("tar", str(folder / f"0000{s}.tar"), str(folder)) for s in (1, 2)]
    assert _all(units)[0]["image_id"].startswith("00001.tar/")  # relative to the pattern's folder


def test_glob_with_relative_ids(bucket):
    for name in ("imgs/a.png", "imgs/b.png", "imgs/c.jpg", "imgs/sub/d.png"):
        _write(f"{bucket}/{name}", _image_bytes(len(name), "PNG"))
    units = list_units(f"{bucket}/imgs/*.png")
    assert [u.kind for u in units] == ["image", "image"]
    records = _all(units)
    assert [r["image_id"] for r in records] == ["a.png", "b.png"]
    assert records[0]["data"] == _image_bytes(len("imgs/a.png"), "PNG")

    deep = _all(list_units(f"{bucket}/imgs/**/*.png"))
    assert "sub/d.png" in [r["image_id"] for r in deep]
    with pytest.raises(SourceError, match="no such source"):
        list_units(f"{bucket}/imgs/*.gif")


def test_glob_over_a_shard_folder_skips_sibling_parquets_and_stats(shard_folder):
    folder, _ = shard_folder
    units = list_units(str(folder / "*"))
    assert [u.kind for u in units] == ["tar", "tar", "tar"]


# ----------------------------------------------------------------------------------------------
# Folders and single images
# ----------------------------------------------------------------------------------------------


def _image_tree(write, base: str) -> dict[str, bytes]:
    files = {
        "b.jpg": _image_bytes(1),
        "a.JPEG": _image_bytes(2),
        "sub/c.png": _image_bytes(3, "PNG"),
        "sub/deeper/d.webp": _image_bytes(4, "WEBP"),
        "sub/e.TIFF": _image_bytes(5, "TIFF"),
        "g.gif": _image_bytes(6, "GIF"),
        "h.bmp": _image_bytes(7, "BMP"),
    }
    for name, data in files.items():
        write(f"{base}/{name}", data)
    write(f"{base}/notes.txt", b"not an image")
    write(f"{base}/.ipynb_checkpoints/b-checkpoint.jpg", _image_bytes(1))
    write(f"{base}/._b.jpg", b"AppleDouble")
    return files


@pytest.mark.parametrize("where", ["local", "file-url", "memory"])
def test_folder_recursion_and_relative_ids(where, tmp_path, bucket):
    base = {"local": str(tmp_path / "imgs"), "file-url": f"file://{tmp_path}/imgs", "memory": f"{bucket}/imgs"}[where]
    files = _image_tree(_write, base)
    units = list_units(base)
    assert [u.kind for u in units] == ["image"] * len(files)
    assert all(u.root is not None for u in units)
    if where == "local":
        assert units[0].uri == str(tmp_path / "imgs" / "a.JPEG")
    if where == "file-url":
        assert units[0].uri == f"file://{tmp_path}/imgs/a.JPEG"

    records = _all(units)
    assert [r["image_id"] for r in records] == sorted(files)
    for record in records:
        assert record["data"] == files[record["image_id"]]
        assert record["error"] is None and record["caption"] is None
        assert record["uri"] == record["source"] and record["uri"].endswith(record["image_id"])

    # naming the same folder with a trailing slash changes nothing
    assert list_units(base + "/") == units


def test_relative_local_source_gives_absolute_uris(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_image_bytes(1, "PNG"))
    monkeypatch.chdir(tmp_path)
    units = list_units("imgs")
    assert units == [Unit("image", str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs"))]
    monkeypatch.chdir("/")  # a Ray worker runs elsewhere
    assert [r["image_id"] for r in _all(units)] == ["a.png"]


def test_single_image_file_id_is_its_name(tmp_path, bucket):
    path = tmp_path / "cat.PNG"
    path.write_bytes(_image_bytes(1, "PNG"))
    units = list_units(str(path))
    assert units == [Unit("image", str(path))]
    (record,) = _all(units)
    assert record["image_id"] == "cat.PNG" and record["data"] == path.read_bytes()

    _write(f"{bucket}/x/dog.jpg", _image_bytes(2))
    (record,) = _all(list_units(f"{bucket}/x/dog.jpg"))
    assert record["image_id"] == "dog.jpg" and record["uri"].startswith("memory://")


def test_image_read_error_is_a_record(tmp_path):
    (record,) = read_unit(Unit("image", str(tmp_path / "imgs" / "gone.jpg"), str(tmp_path / "imgs")))
    assert record["image_id"] == "gone.jpg" and record["data"] is None
    assert "gone.jpg" in record["error"]
    (tmp_path / "dir.jpg").mkdir()
    (record,) = read_unit(Unit("image", str(tmp_path / "dir.jpg")))
    assert record["data"] is None and record["error"]


def test_empty_image_file_is_read_as_empty_bytes(tmp_path):
    (tmp_path / "zero.jpg").write_bytes(b"")
    (record,) = read_unit(Unit("image", str(tmp_path / "zero.jpg")))
    assert record["data"] == b"" and record["error"] is None  # the decoder reports it, with its reason


def test_missing_sources(tmp_path, bucket):
    for source in (str(tmp_path / "nope"), f"file://{tmp_path}/nope.tar", f"{bucket}/nope/"):
        with pytest.raises(SourceError, match="no such source: "):
            list_units(source)
    with pytest.raises(SourceError):
        list_units("")
    assert issubclass(SourceError, ValueError)


def test_unusable_sources(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no image files"):
        list_units(str(tmp_path / "empty"))
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(SourceError, match="unsupported source file"):
        list_units(str(tmp_path / "model.pkl"))


def test_order_is_deterministic(bucket):
    names = ["z.png", "m/b.png", "a.png", "m/a.png", "0.png"]
    for name in names:  # written out of order
        _write(f"{bucket}/d/{name}", _image_bytes(1, "PNG"))
    first = list_units(f"{bucket}/d")
    assert first == list_units(f"{bucket}/d")
    assert [u.uri for u in first] == sorted(u.uri for u in first)
    assert [stable_path_id(u.uri, u.root) for u in first] == sorted(names)


def test_stable_path_id():
    assert stable_path_id("/data/imgs/sub/a.jpg", "/data/imgs") == "sub/a.jpg"
    assert stable_path_id("/data/imgs/sub/a.jpg", "/data/imgs/") == "sub/a.jpg"
    assert stable_path_id("file:///data/imgs/a.jpg", "/data/imgs") == "a.jpg"
    assert stable_path_id("s3://b/imgs/x/y.png", "s3://b/imgs") == "x/y.png"
    assert stable_path_id("s3://b/imgs/x/y.png", None) == "y.png"
    assert stable_path_id("memory:///b/a.png", "memory:///b") == "a.png"
    with pytest.raises(ValueError):
        stable_path_id("/other/a.jpg", "/data/imgs")
    assert stable_path_id("/data/imgsX/a.jpg", None) == "a.jpg"
    with pytest.raises(ValueError):
        stable_path_id("/data/imgsX/a.jpg", "/data/imgs")


# ----------------------------------------------------------------------------------------------
# img2dataset parquet with image bytes
# ----------------------------------------------------------------------------------------------


def _image_parquet(with_key: bool = True) -> tuple[pa.Table, list[bytes]]:
    images = [_image_bytes(i) for i in range(4)]
    columns = {
        "url": [f"http://example.com/{i}.jpg" for i in range(5)],
        "caption": ["zero", "one", None, "three", "four"],
        "status": ["success", "success", "failed_to_download", "success", "success"],
        "jpg": [images[0], images[1], None, images[2], images[3]],
        "width": [8, 8, None, 8, 8],
    }
    if with_key:
        columns = {"key": [_key(0, i) for i in range(5)], **columns}
    return pa.table(columns), images


def test_img2dataset_parquet_streams_bytes_and_skips_failed_rows(tmp_path, bucket):
    table, images = _image_parquet()
    path = f"{bucket}/pq/00000.parquet"
    _write(path, _parquet_bytes(table))
    (unit,) = list_units(path)
    assert unit.kind == "parquet"
    records = list(read_unit(unit))
    assert [r["image_id"] for r in records] == [f"00000.parquet/{_key(0, i)}" for i in (0, 1, 3, 4)]
    assert [r["data"] for r in records] == images
    assert [r["caption"] for r in records] == ["zero", "one", "three", "four"]
    assert records[0]["source"] == f"{unit.uri}#{_key(0, 0)}" and records[0]["uri"] is None

    keyless, _ = _image_parquet(with_key=False)
    local = tmp_path / "shard7.parquet"
    local.write_bytes(_parquet_bytes(keyless))
    ids = [r["image_id"] for r in read_unit(list_units(str(local))[0])]
    assert ids == [f"shard7.parquet/{i}" for i in (0, 1, 3, 4)]  # row numbers in the file


def test_image_parquet_without_status_and_other_column_shapes(tmp_path):
    data = _image_bytes(1)
    hf = pa.table(
        {
            "image": pa.array([{"bytes": data, "path": "a.jpg"}, {"bytes": None, "path": "b.jpg"}]),
            "text": ["hello", "world"],
        }
    )
    (tmp_path / "hf.parquet").write_bytes(_parquet_bytes(hf))
    records = _all(list_units(str(tmp_path / "hf.parquet")))
    assert records[0]["data"] == data and records[0]["caption"] == "hello"
    assert records[1]["data"] is None and "no image bytes" in records[1]["error"]

    raw = pa.table({"bytes": pa.array([data], pa.large_binary())})
    (tmp_path / "raw.parquet").write_bytes(_parquet_bytes(raw))
    assert [r["data"] for r in _all(list_units(str(tmp_path / "raw.parquet")))] == [data]


def test_folder_of_image_parquets(tmp_path):
    table, images = _image_parquet()
    for shard in range(2):
        (tmp_path / f"{shard:05d}.parquet").write_bytes(_parquet_bytes(table))
        (tmp_path / f"{shard:05d}_stats.json").write_text("{}")
    # a manifest in an image folder is not a unit of its own: it usually lists that same folder
    (tmp_path / "meta.parquet").write_bytes(_parquet_bytes(pa.table({"uri": ["a.jpg"]})))
    units = list_units(str(tmp_path))
    assert [(u.kind, Path(u.uri).name) for u in units] == [("parquet", "00000.parquet"), ("parquet", "00001.parquet")]
    assert len(_all(units)) == 8


def test_corrupt_parquet_is_an_error_record(tmp_path):
    table, _ = _image_parquet()
    good = _parquet_bytes(table)
    (tmp_path / "cut.parquet").write_bytes(good[: len(good) // 2])
    (record,) = read_unit(Unit("parquet", str(tmp_path / "cut.parquet")))
    assert record["image_id"] == "cut.parquet#unreadable" and record["data"] is None
    with pytest.raises(SourceError, match="not a readable parquet"):
        list_units(str(tmp_path / "cut.parquet"))


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------


def _csv(rows: list[dict]) -> bytes:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()


def test_csv_manifest_with_ids_and_relative_uris(tmp_path):
    (tmp_path / "m" / "imgs").mkdir(parents=True)
    (tmp_path / "m" / "imgs" / "cat.jpg").write_bytes(_image_bytes(1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "dog.png").write_bytes(_image_bytes(2, "PNG"))
    rows = [
        {"id": "cat", "uri": "imgs/cat.jpg", "caption": "a cat"},
        {"id": "", "uri": "../other/dog.png", "caption": ""},
        {"id": "abs", "uri": "/srv/abs.jpg", "caption": "x"},
        {"id": "web", "uri": "https://example.com/w.jpg", "caption": "y"},
        {"id": "hole", "uri": "", "caption": "z"},
        {"id": "gone", "uri": "imgs/gone.jpg", "caption": ""},
    ]
    manifest = tmp_path / "m" / "list.csv"
    manifest.write_bytes(_csv(rows))
    (unit,) = list_units(str(manifest))
    assert unit == Unit("manifest", str(manifest), allowed=(str(tmp_path / "m") + "/",))
    records = list(read_unit(unit))
    assert [r["image_id"] for r in records] == ["cat", "../other/dog.png", "abs", "web", "hole", "gone"]
    # the manifest's own folder is read (bytes in the record, for the resume key)
    assert records[0]["uri"] == str(tmp_path / "m" / "imgs" / "cat.jpg") and records[0]["error"] is None
    assert records[0]["data"] == _image_bytes(1) and records[0]["caption"] == "a cat"
    assert records[0]["source"] == records[0]["uri"]
    # everything else a manifest names is refused unread, with the way to allow it
    for refused, target in zip(records[1:4], ["other/dog.png", "/srv/abs.jpg", "https://example.com/w.jpg"]):
        assert refused["data"] is None and "--allow-uri-prefix" in refused["error"] and target in refused["error"]
    assert records[1]["caption"] is None
    assert records[4]["uri"] is None and "has no uri" in records[4]["error"]
    assert "missing file" in records[5]["error"]
    allowed = list_units(str(manifest), allow_uri_prefixes=(str(tmp_path / "other"),))[0]
    assert list(read_unit(allowed))[1]["data"] == _image_bytes(2, "PNG")


def test_jsonl_manifest_without_id_on_memory_fs(bucket):
    lines = [
        json.dumps({"url": "imgs/a.jpg", "caption": "first"}),
        "",
        "{broken",
        json.dumps({"url": "s3://elsewhere/b.jpg"}),
        json.dumps(["not", "an", "object"]),
    ]
    _write(f"{bucket}/m/list.jsonl", "\n".join(lines).encode())
    (unit,) = list_units(f"{bucket}/m/list.jsonl")
    assert unit.kind == "manifest"
    records = list(read_unit(unit))
    assert [r["image_id"] for r in records] == [
        "imgs/a.jpg",
        "list.jsonl#row1",
        "s3://elsewhere/b.jpg",
        "list.jsonl#row3",
    ]
    assert records[0]["uri"] == f"{bucket}/m/imgs/a.jpg"  # in normal form (memray.data.uris)
    assert records[0]["caption"] == "first" and records[2]["caption"] is None
    assert "not JSON" in records[1]["error"] and "not a JSON object" in records[3]["error"]
    assert "missing file" in records[0]["error"]  # in the manifest's own bucket: read (and missing)
    assert "--allow-uri-prefix" in records[2]["error"]  # another bucket: refused unread
    # the resolved uri reads back through the same filesystem
    _write(records[0]["uri"], b"bytes of a")
    with fsspec.open(records[0]["uri"], "rb") as handle:
        assert handle.read() == b"bytes of a"


def test_parquet_manifest_with_path_column_and_ids(tmp_path):
    table = pa.table({"image_id": [1, 2], "PATH": ["x/1.jpg", "x/2.jpg"], "TEXT": ["one", None]})
    (tmp_path / "list.parquet").write_bytes(_parquet_bytes(table))
    (unit,) = list_units(str(tmp_path / "list.parquet"))
    assert unit.kind == "manifest"
    records = list(read_unit(unit))
    assert [(r["image_id"], r["uri"], r["caption"]) for r in records] == [
        ("1", str(tmp_path / "x" / "1.jpg"), "one"),
        ("2", str(tmp_path / "x" / "2.jpg"), None),
    ]


def test_manifests_without_uri_column_are_refused(tmp_path):
    (tmp_path / "a.csv").write_text("name,caption\nx,y\n")
    (tmp_path / "b.jsonl").write_text('{"name": "x"}\n')
    (tmp_path / "c.parquet").write_bytes(_parquet_bytes(pa.table({"name": ["x"]})))
    for name in ("a.csv", "b.jsonl", "c.parquet"):
        with pytest.raises(SourceError, match="uri column"):
            list_units(str(tmp_path / name))


def test_glob_of_manifests(tmp_path):
    for i in range(2):
        (tmp_path / f"part-{i}.csv").write_text(f"uri\nimg{i}.jpg\n")
    units = list_units(str(tmp_path / "part-*.csv"))
    assert [u.kind for u in units] == ["manifest", "manifest"]
    assert [r["image_id"] for r in _all(units)] == ["img0.jpg", "img1.jpg"]


def test_gzip_csv_is_not_mistaken_for_a_manifest(tmp_path):
    (tmp_path / "x.csv.gz").write_bytes(gzip.compress(b"uri\na.jpg\n"))
    with pytest.raises(SourceError, match="unsupported"):
        list_units(str(tmp_path / "x.csv.gz"))


# ----------------------------------------------------------------------------------------------
# The readers and their registry
# ----------------------------------------------------------------------------------------------


def test_each_format_has_one_reader_found_by_its_units_kind(tmp_path, shard_folder):
    folder, _ = shard_folder
    table, _ = _image_parquet()
    (tmp_path / "img.parquet").write_bytes(_parquet_bytes(table))
    (tmp_path / "list.parquet").write_bytes(_parquet_bytes(pa.table({"uri": ["a.jpg"]})))
    (tmp_path / "list.csv").write_text("uri\na.jpg\n")
    (tmp_path / "a.jpg").write_bytes(_image_bytes(1))
    kinds = {name: list_units(str(tmp_path / name))[0].kind for name in ("img.parquet", "list.parquet", "list.csv")}
    kinds["a.jpg"], kinds["00000.tar"] = list_units(str(tmp_path / "a.jpg"))[0].kind, list_units(str(folder))[0].kind
    assert kinds == {"img.parquet": "parquet", "list.parquet": "manifest", "list.csv": "manifest", "a.jpg": "image",
                     "00000.tar": "tar"}  # fmt: skip
    for kind in set(kinds.values()) | {"located"}:
        assert readers.READERS[kind].kind == kind
    # an extension two formats share is told apart by content, in the registry's order
    assert [r.kind for r in readers.READERS.values() if r.owns("x.PARQUET")] == ["parquet", "manifest"]
    assert not readers.READERS["located"].owns("x.tar")  # located images come from catalog rows, never a listing


def test_a_file_of_no_format_is_refused_with_every_format_named(tmp_path):
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(SourceError) as refused:
        list_units(str(tmp_path / "model.pkl"))
    for reader in readers.READERS.values():
        for extension in reader.extensions:
            assert extension in str(refused.value)
    (tmp_path / "neither.parquet").write_bytes(_parquet_bytes(pa.table({"name": ["x"]})))
    with pytest.raises(SourceError, match="no image bytes column .*; not a manifest: no uri column"):
        list_units(str(tmp_path / "neither.parquet"))


def test_a_manifest_matched_by_a_pattern_names_its_rows_relative_to_the_patterns_root(tmp_path):
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "list.csv").write_text('uri,caption\n"",no uri\n')
    units = list_units(str(tmp_path / "*" / "list.csv"))
    assert [u.root for u in units] == [str(tmp_path)] * 2
    # two manifests of one name in two folders: their rows' ids differ, as two image files' do
    assert [r["image_id"] for r in _all(units)] == ["a/list.csv#row0", "b/list.csv#row0"]


def test_located_units_hold_their_rows_and_read_each_image_again(tmp_path):
    data = [_image_bytes(i) for i in range(3)]
    for i, image in enumerate(data):
        (tmp_path / f"{i}.jpg").write_bytes(image)
    rows = [
        {"image_id": f"img{i}", "image_sha256": hashlib.sha256(image).hexdigest(), "source": str(tmp_path / f"{i}.jpg")}
        for i, image in enumerate(data)
    ]
    rows[2]["image_sha256"] = "0" * 64  # changed since the screen
    units = readers.READERS["located"].units(rows, (str(tmp_path),), chunk=2)
    assert [(u.kind, u.uri, count_images(u)) for u in units] == [("located", "located:000000", 2),
                                                                  ("located", "located:000001", 1)]  # fmt: skip
    records = _all(units)
    assert [(r["image_id"], r["data"]) for r in records[:2]] == [("img0", data[0]), ("img1", data[1])]
    assert records[2]["data"] is None and "changed since the screen" in records[2]["error"]
    outside = readers.READERS["located"].units(rows[:1], (str(tmp_path / "elsewhere"),))
    assert "outside the sources" in _all(outside)[0]["error"]


# ----------------------------------------------------------------------------------------------
# Module rules
# ----------------------------------------------------------------------------------------------


def test_sources_and_readers_import_neither_ray_nor_pickle():
    modules = [Path(sources.__file__), *Path(readers.__file__).parent.glob("*.py")]
    assert len(modules) >= 8  # sources, the registry, base and one module per format
    for module in modules:
        imported = set()
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module.split(".")[0])
        assert not imported & {"ray", "pickle", "torch", "PIL", "numpy", "dill", "cloudpickle", "joblib"}, module


def test_unknown_unit_kind():
    with pytest.raises(ValueError, match="unknown unit kind"):
        read_unit(Unit("video", "x.mp4"))


def test_count_images_matches_what_read_unit_yields(tmp_path, shard_folder):
    folder, _ = shard_folder
    table, _ = _image_parquet()
    (tmp_path / "img.parquet").write_bytes(_parquet_bytes(table))
    (tmp_path / "raw.parquet").write_bytes(_parquet_bytes(pa.table({"jpg": [b"a", b"b"]})))
    (tmp_path / "list.parquet").write_bytes(_parquet_bytes(pa.table({"uri": ["a.jpg", "b.jpg", "c.jpg"]})))
    (tmp_path / "a.jpg").write_bytes(_image_bytes(1))
    for name in ("img.parquet", "raw.parquet", "list.parquet", "a.jpg"):
        (unit,) = list_units(str(tmp_path / name))
        assert count_images(unit) == len(list(read_unit(unit))), name
    assert count_images(list_units(str(folder))[0]) is None  # a tar is counted only by reading it
    (tmp_path / "list.csv").write_text("uri\na.jpg\nb.jpg\n")
    (tmp_path / "list.jsonl").write_text('{"uri": "a.jpg"}\n\n{"uri": "b.jpg", "caption": "x"}\nnot json\n')
    for name in ("list.csv", "list.jsonl"):
        unit = Unit("manifest", str(tmp_path / name))
        assert count_images(unit) == len(list(read_unit(unit))), name
    assert count_images(Unit("manifest", str(tmp_path / "gone.csv"))) is None
    assert count_images(Unit("parquet", str(tmp_path / "gone.parquet"))) is None
