"""A node that dies mid-run: a real multi-node Ray cluster on this machine, the catalog and the images
in an S3-compatible server on loopback, the worker node's raylet killed with SIGKILL while an actor on
it audits, in seeded trials.

The cluster is Ray's own `ray.cluster_utils.Cluster`: every node is its own set of processes (GCS and
raylet on the head; a raylet, its agents and its workers on the worker node), so SIGKILL to the
worker's raylet is what a machine that vanishes does to the cluster, and the head stays up across the
trials while only the worker node is added and lost. The driver is this process, connected to the head
(as a job on the head node is), and runs the same `run_audit` as `memray audit`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import threading
import time

import fsspec
import psutil
import pytest
from conftest import png_bytes, tiny_budgets
from s3server import create_bucket, s3_environment

from memray.catalog.reader import Catalog
from memray.distributed.pipeline import PipelineOptions, run_audit

pytestmark = pytest.mark.slow
pytest_plugins = ["s3server"]

IMAGES = 4
TRIALS = 5
CONFIG = tiny_budgets().replace(measures=["invmm", "z0_error"], invmm={"steps": 20})
# One actor per node (the pool spreads them), half a CPU each so the read tasks never starve;
# a row file per image, so the kill can wait for a given number of rows.
OPTIONS = PipelineOptions(actors=2, slots=1, queue=1, cpus_per_actor=0.5, rows_per_file=1)
RERUN = dataclasses.replace(OPTIONS, actors=1)  # the head alone is left: one actor does


@pytest.fixture(scope="module")
def cluster(s3_server):
    """A Ray head (2 CPUs) whose processes, and those of every node added later, reach the S3 server.

    The head checks the raylets every second and gives one up after two missed checks (Ray's defaults:
    every 3 s, five misses): a lost node is noticed in about 2 s instead of 15 to 30, the rest is the same.
    """
    import ray
    from ray.cluster_utils import Cluster

    health_checks = {
        "health_check_period_ms": 1000,
        "health_check_timeout_ms": 1000,
        "health_check_failure_threshold": 2,
    }
    with s3_environment(s3_server):  # nodes inherit the environment they start with
        head = Cluster(
            initialize_head=True,
            connect=True,
            head_node_args={"num_cpus": 2, "include_dashboard": False, "_system_config": health_checks},
        )
        yield head
        ray.shutdown()
        head.shutdown()


class _RayletKiller(threading.Thread):
    """SIGKILLs the worker node's raylet `delay` seconds after an actor runs on that node, an image is in
    flight (a crash-journal marker) and `rows` rows are in the catalog; records how many there were then."""

    def __init__(self, node, catalog: str, rows: int, delay: float):
        super().__init__(daemon=True)
        from ray._private import ray_constants

        self.node, self.catalog, self.rows, self.delay = node, catalog.removeprefix("s3://"), rows, delay
        self.raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        self.rows_at_kill: int | None = None
        self.stop = threading.Event()

    def run(self):
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        actors: list[psutil.Process] = []
        while not self.stop.wait(0.2):
            with contextlib.suppress(psutil.Error):
                actors = [p for p in self.raylet.children() if "Auditor" in " ".join(p.cmdline())]
            fs.invalidate_cache()
            in_flight = fs.glob(f"{self.catalog}/_inflight/*/*.json")
            if actors and in_flight and len(fs.glob(f"{self.catalog}/model=*/*.parquet")) >= self.rows:
                break
        if self.stop.wait(self.delay):
            return
        fs.invalidate_cache()
        self.rows_at_kill = len(fs.glob(f"{self.catalog}/model=*/*.parquet"))
        self.node.kill_raylet()  # SIGKILL


def _rows(catalog: str) -> dict[str, list[str]]:
    table = Catalog(catalog).query("SELECT image_id, status FROM audits ORDER BY image_id, status")
    found: dict[str, list[str]] = {}
    for row in table.to_pylist():
        found.setdefault(row["image_id"], []).append(row["status"])
    return found


def test_a_worker_node_killed_mid_run_loses_duplicates_and_fails_nothing(cluster, s3_server, tiny_sd_dir):
    with s3_environment(s3_server):
        bucket = create_bucket(s3_server)
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        expected = [f"img{i}.png" for i in range(IMAGES)]
        for i, name in enumerate(expected):
            fs.pipe_file(f"{bucket}/images/{name}", png_bytes(900 + i))
        source, model = f"s3://{bucket}/images", str(tiny_sd_dir)
        draw = random.Random(19)
        outcomes = []
        started = time.monotonic()
        for trial in range(TRIALS):
            catalog = f"s3://{bucket}/catalog-{trial}"
            worker = cluster.add_node(num_cpus=1)
            killer = _RayletKiller(worker, catalog, rows=draw.choice([0, 1]), delay=round(draw.uniform(0.0, 2.0), 1))
            killer.start()
            trial_started = time.monotonic()
            try:
                first = run_audit([source], model, catalog, CONFIG, OPTIONS)
            finally:
                killer.stop.set()
                killer.join()
                cluster.remove_node(worker, allow_graceful=False)  # what is left of it: agents, workers
            assert killer.rows_at_kill is not None and killer.rows_at_kill < IMAGES, "the kill must land mid-run"
            after_first = _rows(catalog)
            # green with every image's row, or non-green naming exactly the images without one
            assert first.unfinished == sorted(set(expected) - set(after_first)), first.unfinished
            rerun_started = time.monotonic()
            rerun = run_audit([source], model, catalog, CONFIG, RERUN)  # on the head alone: the node is gone
            found = _rows(catalog)
            outcomes.append(
                {
                    "trial": trial,
                    "kill": f"{killer.delay} s after {killer.rows} rows and an image in flight: {killer.rows_at_kill} rows",
                    "first run": "green" if not first.unfinished else f"non-green, without rows: {first.unfinished}",
                    "rerun rows": rerun.rows,
                    "ok rows": sum(statuses.count("ok") for statuses in found.values()),
                    "duplicates": sum(len(statuses) - 1 for statuses in found.values()),
                    "error rows": sum(statuses.count("error") for statuses in found.values()),
                    "seconds (run, rerun)": (
                        round(rerun_started - trial_started),
                        round(time.monotonic() - rerun_started),
                    ),
                }
            )
            assert sorted(found) == expected and not rerun.unfinished, outcomes
            assert all(statuses == ["ok"] for statuses in found.values()), outcomes  # 0 duplicates, 0 errors
        print(f"node-death trials ({time.monotonic() - started:.0f} s):", *outcomes, sep="\n  ")
