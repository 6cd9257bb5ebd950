"""Jobs as separate processes: the real `ray job submit` CLI against a real `ray start --head`, a
job killed half-way and rerun, and an image that kills its worker every time it is audited."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import png_bytes, tiny_flags
from test_distributed import SMALL_FLAGS, rows_by_id, write_shard

from memray.catalog.reader import Catalog
from memray.evaluation.laion import write_laion_set

pytestmark = pytest.mark.slow
pytest_plugins = ["s3server"]
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real `ray start --head --block` on loopback with token auth: (env, dashboard address, GCS address).

    Stopped by ending its process group, not `ray stop`, which would stop every Ray on the machine.
    """
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
    port, dashboard = _free_port(), _free_port()
    head = subprocess.Popen(
        ["ray", "start", "--head", "--block", "--num-cpus", "2", "--port", str(port), "--dashboard-port",
         str(dashboard), "--dashboard-host", "127.0.0.1", "--node-ip-address", "127.0.0.1",
         "--include-dashboard", "true", "--disable-usage-stats",
         "--temp-dir", str(tmp_path_factory.mktemp("ray"))],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.monotonic() + 180
    # Ready when a job runs: `ray job list` answers before the head's job agent has registered, and a
    # submission then fails with "No available agent to submit job".
    ready = ["ray", "job", "submit", "--address", address, "--", "true"]
    while subprocess.run(ready, env=env, capture_output=True).returncode:
        assert head.poll() is None and time.monotonic() < deadline, "ray start --head did not come up"
        time.sleep(1)
    yield env, address, f"127.0.0.1:{port}"
    _stop(head)


def _stop(process: subprocess.Popen) -> None:
    """End a process started with start_new_session and everything in its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_ray_job_submit_runs_the_audit_job(ray_head, tiny_sd_dir, tmp_path):
    env, address, _ = ray_head
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(png_bytes(40 + i))
    catalog = tmp_path / "catalog"
    command = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "jobs/audit.py", str(folder), "--model", str(tiny_sd_dir), "--catalog", str(catalog),
               "--cpus-per-actor", "0.5", *SMALL_FLAGS]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "audited 3/3 images" in result.stdout
    assert sorted(rows_by_id(str(catalog))) == ["img0.png", "img1.png", "img2.png"]


def test_ray_job_submit_runs_a_cascade_over_laion_shards_in_s3(ray_head, s3_bucket, s3_endpoint, tmp_path):
    """The card's main use: img2dataset shards in object storage, the demo model (its memorization is
    known), `ray job submit` to a `ray start` cluster, the catalog in object storage, then SQL."""
    env, address, _ = ray_head
    laion = f"s3://{s3_bucket}/laion"
    write_laion_set(laion, 48, shard_size=24, copies=2)
    catalog = f"s3://{s3_bucket}/memray-catalog"
    aws = {key: os.environ[key] for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    runtime = json.dumps({"env_vars": {**aws, "AWS_ENDPOINT_URL": s3_endpoint}})
    command = ["ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--runtime-env-json",
               runtime, "--", "python", "jobs/audit.py", f"{laion}/{{00000..00001}}.tar", "--model", "demo",
               "--catalog", catalog, "--calibration-min", "3", "--cpus-per-actor", "0.5", *tiny_flags(),
               "--set", 'measures=["invmm","uncond_replication"]', "--set", "similarity.null_samples=16"]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "a cascade: screen, then confirm" in result.stdout  # shards: the cascade by default
    assert "cascade run" in result.stdout and "screen recall" in result.stdout
    view = (
        Catalog(catalog)
        .query("SELECT image_id, flagged, selected_by, confirmed_verdict, dup_count FROM cascade ORDER BY image_id")
        .to_pylist()
    )
    assert len(view) == 42  # 48 rows: 4 failed downloads and 2 truncated JPEGs (error rows) have no selection
    assert all((r["confirmed_verdict"] is not None) == (r["selected_by"] is not None) for r in view)
    assert any(r["confirmed_verdict"] == "memorized" for r in view)  # a planted image the demo model memorized
    assert max(r["dup_count"] for r in view) >= 2  # the copies of a planted image form a group


def _audit_job(folder: Path, model: Path, catalog: Path, *flags: str) -> list[str]:
    """One stage on every image (shards count as an unknown number of images, which would start a cascade)."""
    return [sys.executable, str(REPO / "jobs" / "audit.py"), str(folder), "--model", str(model),
            "--catalog", str(catalog), "--cpus-per-actor", "0.5", "--cascade", "off", *SMALL_FLAGS, *flags]  # fmt: skip


def test_a_killed_job_rerun_ends_with_exactly_one_ok_row_per_image(tiny_sd_dir, tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    ids = [f"k{i:02d}" for i in range(12)]
    for shard in range(2):  # two shards of six: rows must stream out batch by batch, not shard by shard
        chunk = ids[shard * 6 : (shard + 1) * 6]
        write_shard(folder / f"{shard:05d}.tar", {key: png_bytes(100 + ids.index(key)) for key in chunk}, {})
    catalog = tmp_path / "catalog"
    command = _audit_job(folder, tiny_sd_dir, catalog, "--slots", "1", "--rows-per-file", "1")
    job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while len(list(catalog.rglob("*.parquet"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)  # the driver and the local Ray it started, mid-run
    job.wait()
    written_before = len(list(catalog.rglob("*.parquet")))
    assert 3 <= written_before < len(ids), "the kill must land half-way"

    subprocess.run(command, check=True, capture_output=True, timeout=600)
    found = rows_by_id(str(catalog))
    assert sorted(found) == [f"{i // 6:05d}.tar/{key}" for i, key in enumerate(ids)]  # no loss
    assert all(statuses == ["ok"] for statuses in found.values())  # no duplicates


def _markers(catalog: Path) -> dict[str, int]:
    """The crash journal as it is now: image id -> deaths recorded in its marker."""
    found = {}
    for path in catalog.glob("_inflight/*/*.json"):
        with contextlib.suppress(OSError, ValueError):  # caught mid-rename or mid-delete
            marker = json.loads(path.read_text())
            found[marker["image_id"]] = marker["deaths"]
    return found


def _kill_auditor(job: subprocess.Popen | None) -> bool:
    """SIGKILL the auditor actor of this job's own local Ray (None: of the one job on a shared
    cluster); True if one was found."""
    processes = psutil.Process(job.pid).children(recursive=True) if job else psutil.process_iter()
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if "Auditor" in " ".join(process.cmdline()):
                process.kill()
                return True
    return False


def test_an_image_that_kills_its_worker_becomes_an_error_row_after_bounded_retries(tiny_sd_dir, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    ids = [f"img{i}.png" for i in range(4)]
    for i, name in enumerate(ids):
        (folder / name).write_bytes(png_bytes(200 + i))
    poison = "img1.png"  # second in the first batch of two
    catalog = tmp_path / "catalog"
    # Enough InvMM steps that an image is in flight for a while: the test kills the worker then.
    command = _audit_job(folder, tiny_sd_dir, catalog, "--slots", "2", "--set", "invmm.steps=80")
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    kills, deadline = 0, time.monotonic() + 400
    try:
        while job.poll() is None and time.monotonic() < deadline:
            deaths = _markers(catalog).get(poison, 0)
            if deaths > kills and _kill_auditor(job):  # every time the poison image is in flight
                kills = deaths
            time.sleep(0.01)
        output = job.communicate(timeout=60)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode == 0, output[-3000:]
    assert kills == 2  # once with its batch, once alone; the third attempt does not run it
    table = Catalog(str(catalog)).query("SELECT image_id, status, error FROM audits ORDER BY image_id")
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert sorted(rows) == ids and table.num_rows == len(ids)
    assert rows[poison]["status"] == "error"
    assert "worker died 2 times" in rows[poison]["error"]
    assert all(rows[i]["status"] == "ok" for i in ids if i != poison)
    assert _markers(catalog) == {}


def test_random_kills_of_the_actor_and_the_driver_never_lose_or_duplicate_a_row(ray_head, tiny_sd_dir, tmp_path):
    """5 trials: kill the auditor actor or the whole driver at a random moment, then rerun: every
    image has exactly one row after the rerun, whatever the kill hit. The drivers join one running
    cluster, as jobs on a real one do (and no trial pays for starting Ray)."""
    import random

    folder = tmp_path / "shards"
    folder.mkdir()
    for shard in range(2):
        write_shard(folder / f"{shard:05d}.tar", {f"k{i}": png_bytes(300 + 4 * shard + i) for i in range(4)}, {})
    expected = sorted(f"{shard:05d}.tar/k{i}" for shard in range(2) for i in range(4))
    env, _, gcs = ray_head
    job_env = {**env, "RAY_ADDRESS": gcs}
    draw = random.Random(20261130)
    outcomes = []
    for trial in range(5):
        catalog = tmp_path / f"catalog-{trial}"
        command = _audit_job(folder, tiny_sd_dir, catalog, "--slots", "1", "--rows-per-file", "1")
        target, delay = draw.choice(["actor", "driver"]), draw.uniform(2.0, 12.0)
        job = subprocess.Popen(
            command, env=job_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        try:
            deadline = time.monotonic() + delay
            killed = False
            while job.poll() is None and not killed and time.monotonic() < deadline + 60:
                if time.monotonic() >= deadline:
                    if target == "driver":
                        os.killpg(job.pid, signal.SIGKILL)
                        killed = True
                    else:
                        killed = _kill_auditor(None)  # no actor yet: try again in a moment
                time.sleep(0.05)
            job.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        rerun = subprocess.run(command, env=job_env, capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-2000:]
        found = rows_by_id(str(catalog))
        outcomes.append((target, round(delay, 1), killed, sum(len(v) for v in found.values())))
        assert sorted(found) == expected, outcomes  # rows expected = rows found
        assert all(statuses == ["ok"] for statuses in found.values()), outcomes  # 0 duplicates, 0 errors
    print("kill trials (target, delay s, killed, rows):", outcomes)
