"""The distributed audit with real parts: a local Ray cluster, a loopback S3 server, the real
`ray job submit` CLI, and a job killed half-way and rerun."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import fsspec
import pytest
from conftest import png_bytes, tiny_budgets, tiny_flags
from s3server import s3_environment

from memray.catalog.reader import Catalog
from memray.catalog.schema import AuditRow, rows_to_table
from memray.distributed.pipeline import PipelineOptions, ProgressLog, _calls, run_audit

pytestmark = pytest.mark.slow
pytest_plugins = ["s3server"]
REPO = Path(__file__).resolve().parent.parent
CONFIG = tiny_budgets().replace(measures=["invmm", "z0_error"])
SMALL_FLAGS = tiny_flags(measures=["invmm", "z0_error"])
OPTIONS = PipelineOptions(actors=1, slots=2, queue=1, cpus_per_actor=0.5, rows_per_file=3)  # calls of 2 rows


@pytest.fixture(scope="module")
def local_ray(s3_server):
    """A local Ray with 2 CPUs whose workers can reach the loopback S3 server; actors take half a
    CPU so the read tasks never starve."""
    import ray

    with s3_environment(s3_server):  # workers inherit the environment Ray starts with
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        yield
        ray.shutdown()


def write_shard(path: Path, samples: dict[str, bytes], captions: dict[str, str]) -> None:
    """An img2dataset-style webdataset shard: {key}.jpg + {key}.txt members."""
    with tarfile.open(path, "w") as tar:
        for key, data in samples.items():
            for name, payload in ((f"{key}.png", data), (f"{key}.txt", captions.get(key, "").encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def make_dataset(root: Path) -> dict[str, str]:
    """Two shards (one with a corrupt image), a truncated shard, and a folder of files.
    Returns the expected status per image id."""
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / "00000.tar", {"k0": png_bytes(1), "k1": png_bytes(2)}, {"k0": "a red circle"})
    write_shard(root / "00001.tar", {"k2": png_bytes(3), "k3": b"\x89PNG broken"}, {})
    write_shard(root / "00002.tar", {"k4": png_bytes(4), "k5": png_bytes(5)}, {})
    with tarfile.open(root / "00002.tar") as tar:
        last = tar.getmember("k5.png")
    data = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(data[: last.offset_data + last.size // 2])  # cut inside the last image
    return {
        "00000.tar/k0": "ok",
        "00000.tar/k1": "ok",
        "00001.tar/k2": "ok",
        "00001.tar/k3": "error",
        "00002.tar/k4": "ok",
        "00002.tar#truncated": "error",
    }


def rows_by_id(catalog: str) -> dict[str, list[str]]:
    table = Catalog(catalog).query("SELECT image_id, status FROM audits ORDER BY image_id")
    found: dict[str, list[str]] = {}
    for image_id, status in zip(table.column("image_id").to_pylist(), table.column("status").to_pylist()):
        found.setdefault(image_id, []).append(status)
    return found


def test_shards_are_audited_once_resumed_and_errors_retried_on_request(local_ray, tiny_sd_dir, tmp_path):
    expected = make_dataset(tmp_path / "shards")
    catalog = str(tmp_path / "catalog")
    source = str(tmp_path / "shards" / "{00000..00002}.tar")
    first = run_audit([source], str(tiny_sd_dir), catalog, CONFIG, OPTIONS)
    assert {k: v[0] for k, v in rows_by_id(catalog).items()} == expected
    assert first.rows == len(expected) and len(first.files) >= 2  # rows_per_file=3: several files
    assert not list(Path(catalog).rglob("*.tmp"))

    again = run_audit([source], str(tiny_sd_dir), catalog, CONFIG, OPTIONS)
    assert (again.rows, again.skipped) == (0, len(expected))

    retried = run_audit(
        [source], str(tiny_sd_dir), catalog, CONFIG, PipelineOptions(**{**OPTIONS.__dict__, "retry_errors": True})
    )
    assert retried.rows == 2  # k3 and the truncation record, nothing else
    latest = Catalog(catalog).query("SELECT image_id FROM latest ORDER BY image_id").column("image_id").to_pylist()
    assert latest == sorted(k for k, v in expected.items() if v == "ok")


def test_shards_in_s3_to_a_catalog_in_s3(local_ray, tiny_sd_dir, tmp_path, s3_bucket):
    expected = make_dataset(tmp_path / "shards")
    fs = fsspec.filesystem("s3")
    fs.put(str(tmp_path / "shards") + "/", f"{s3_bucket}/laion/", recursive=True)
    catalog = f"s3://{s3_bucket}/memray-catalog"
    run_audit([f"s3://{s3_bucket}/laion/{{00000..00002}}.tar"], str(tiny_sd_dir), catalog, CONFIG, OPTIONS)
    assert {k: v[0] for k, v in rows_by_id(catalog).items()} == expected
    assert fs.glob(f"{s3_bucket}/memray-catalog/model=*/*.parquet")
    table = Catalog(catalog).query("SELECT image_id, invmm_replicated FROM latest WHERE image_id = '00000.tar/k0'")
    assert table.num_rows == 1


def test_a_log_gets_each_progress_line_once_and_the_final_line_when_it_is_new():
    log = io.StringIO()
    progress = ProgressLog(total=3, every_seconds=0.0, stream=log)
    rows = rows_to_table([AuditRow(image_id="a", status="ok"), AuditRow(image_id="b", status="error")])
    progress.update(rows)  # printed: the interval is over
    progress.print(final=True)  # nothing new: not printed again
    progress.update(rows_to_table([AuditRow(image_id="c", status="ok")]))
    progress.every = 3600.0
    progress.update(rows_to_table([]))  # inside the interval: not printed
    progress.print(final=True)
    lines = log.getvalue().splitlines()
    assert [line.split(" images")[0] for line in lines] == ["audited 2/3", "audited 3/3"]
    assert "(1 errors)" in lines[0]


@pytest.mark.slow
def test_short_blocks_are_gathered_into_calls_that_fill_the_slots(local_ray):
    import ray

    dataset = ray.data.from_items([{"i": i} for i in range(10)], override_num_blocks=5)  # five blocks of two
    calls = list(_calls(dataset, 3))
    held = [[row["i"] for ref in refs for row in ray.get(ref).to_pylist()] for _, refs in calls]
    assert [len(images) for images in held] == [4, 4, 2]  # no call smaller than 3 but the last
    assert sorted(i for images in held for i in images) == list(range(10))
