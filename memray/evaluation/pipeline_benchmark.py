"""Throughput benchmark of the distributed audit: images per hour and UNet evaluations per second
per actor, with 1 and 2 actors, and rows per second written to the catalog.

    python jobs/benchmark_pipeline.py --images 16 --actors 1 2 --preset quick

Runs the real pipeline (local Ray, Auditor actors, Parquet catalog) on the demo images; every
actor count gets a fresh catalog, so nothing is skipped by resume. UNet evaluations (forwards plus
backwards, as counted in the rows) are the machine-independent cost; the rates depend on the
machine, printed with them.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

from memray.catalog.reader import Catalog
from memray.catalog.schema import AuditRow
from memray.catalog.writer import CatalogWriter
from memray.config import PRESETS, preset_config
from memray.demo import demo_model_dir, write_demo_images
from memray.distributed.pipeline import PipelineOptions, run_audit


def audit_throughput(model: Path, manifest: Path, catalog: Path, config, options: PipelineOptions) -> str:
    """One pipeline run; a result line with images/h and UNet evaluations/s per actor."""
    summary = run_audit([str(manifest)], str(model), str(catalog), config, options)
    sql = "SELECT CAST(sum(unet_forwards + unet_backwards) AS BIGINT) AS evaluations FROM audits"
    evaluations = Catalog(str(catalog)).query(sql).column("evaluations")[0].as_py()
    per_actor = evaluations / summary.seconds / options.actors
    return (
        f"{options.actors:6d} {summary.rows:7d} {summary.errors:6d} {summary.seconds:9.1f} "
        f"{summary.rows / summary.seconds * 3600:10.0f} {evaluations / summary.rows:12.0f} {per_actor:14.1f}"
    )


def catalog_write_rate(folder: Path, rows: int, rows_per_file: int) -> str:
    """Rows per second through CatalogWriter (atomic Parquet files), with realistic row contents."""
    template = AuditRow(
        image_id="x", model="bench", model_fingerprint="f" * 64, config_hash="c" * 16, config="{}" * 200,
        caption="a photo of a red circle on a blue background", invmm_kl=0.3, verdict="not_memorized",
    )  # fmt: skip
    batch = [AuditRow(**{**template.to_dict(), "image_id": f"img{i:08d}"}) for i in range(rows)]
    started = time.perf_counter()
    with CatalogWriter(folder, target_rows=rows_per_file, max_seconds=3600) as writer:
        for start in range(0, rows, 64):  # as the driver receives them: a batch at a time
            writer.add(batch[start : start + 64])
    seconds = time.perf_counter() - started
    return f"catalog writes: {rows} rows in {len(writer.files)} files, {rows / seconds:.0f} rows/s ({folder})"


def main(argv=None) -> int:
    """Print one line per actor count, then the catalog write rate."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--slots", type=int, default=4, help="images an actor optimises at once")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--gpus-per-actor", type=float)
    parser.add_argument("--preset", choices=PRESETS, default="quick")
    parser.add_argument("--model", help="checkpoint directory (default: the demo model)")
    parser.add_argument("--catalog-rows", type=int, default=100_000)
    parser.add_argument("--out", default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)

    out = Path(args.out or tempfile.mkdtemp(prefix="memray-bench-"))
    model = Path(args.model) if args.model else demo_model_dir(out / "demo-model")
    manifest = write_demo_images(out / "images", count=args.images)
    config = preset_config(args.preset)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; model {model}; preset {args.preset}")
    print(f"{'actors':>6s} {'images':>7s} {'errors':>6s} {'seconds':>9s} {'images/h':>10s} {'UNet ev/img':>12s} "
          f"{'UNet ev/s/act':>14s}")  # fmt: skip
    for actors in args.actors:
        options = PipelineOptions(
            actors=actors,
            slots=args.slots,
            cpus_per_actor=args.cpus_per_actor,
            gpus_per_actor=args.gpus_per_actor,
        )
        print(audit_throughput(model, manifest, out / f"catalog-{actors}", config, options), flush=True)
    print(catalog_write_rate(out / "catalog-writes", args.catalog_rows, rows_per_file=2000))
    return 0
