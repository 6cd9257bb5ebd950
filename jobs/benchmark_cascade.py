"""The cascade against InvMM on every image: cost, recall, and the recall a run states about itself.

    python jobs/benchmark_cascade.py                                  # demo set and a 2,000-image LAION-shaped set
    python jobs/benchmark_cascade.py --sets demo --settings caption   # a part of it

On the shipped demo set InvMM runs on every image too (both the counting verdict and the
reference's all-K evidence), and the cascade's stage 2 reuses those rows; on the LAION-shaped set
(memray.evaluation.laion, written to --laion if missing) only the cascade runs, and InvMM's cost
on every image is estimated from the calibration sample. Logic: memray.evaluation.cascade.
"""

from __future__ import annotations

import argparse
import os
import platform
from pathlib import Path

import torch

from memray.cascade.selection import CascadeOptions
from memray.config import apply_overrides, load_config
from memray.demo import demo_audit_config
from memray.evaluation.cascade import audit_rows, demo_set, laion_set, report, run_cascade
from memray.evaluation.laion import write_laion_set
from memray.models import load_model

SETTINGS = {"caption": True, "unknown": False}


def main() -> None:
    """Print the benchmark's lines for every set and setting asked for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=["demo", "laion"], default=["demo", "laion"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--laion", default="memray-out/laion-2000", help="folder of the LAION-shaped set")
    parser.add_argument("--laion-images", type=int, default=2000)
    parser.add_argument("--config", default=str(demo_audit_config()), help="the audit configuration (stage 2)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--calibration-rate", type=float, default=0.01)
    parser.add_argument("--calibration-min", type=int, default=20)
    parser.add_argument("--utilisation", type=float, default=0.4, help="assumed share of the H100's bf16 peak")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = apply_overrides(load_config(args.config), args.set).replace(measures=["invmm", "uncond_replication"])
    options = CascadeOptions(calibration_rate=args.calibration_rate, calibration_min=args.calibration_min)
    loaded = load_model("demo")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; config {config.hash()}"
    )
    print(f"screen {config.start_check}; stage 2 {config.measures}, InvMM {config.invmm.steps} steps; {options}")
    if "laion" in args.sets and not (Path(args.laion) / "truth.parquet").exists():
        write_laion_set(args.laion, args.laion_images)
    for name in args.sets:
        for setting in args.settings:
            labelled = demo_set(SETTINGS[setting]) if name == "demo" else laion_set(args.laion, SETTINGS[setting])
            items = [x.item for x in labelled]
            setting_config = config.replace(invmm={"prompt_init": "caption" if SETTINGS[setting] else "zero"})
            everyone = None
            if name == "demo":
                everyone = audit_rows(loaded, items, setting_config, stage="full", batch_size=16, slots=None)
                reference = setting_config.replace(verdict={"evidence": "all"})
                verdicts = {
                    label: [row.verdict for row in rows]
                    for label, rows in (
                        ("counting", everyone),
                        ("all-K", audit_rows(loaded, items, reference, stage="full", batch_size=16, slots=None)),
                    )
                }
                for label, found in verdicts.items():
                    counts = {
                        cls: {
                            v: sum(1 for x, f in zip(labelled, found) if x.truth == cls and f == v)
                            for v in ("memorized", "inconclusive", "not_memorized")
                        }
                        for cls in ("positive", "borderline", "negative")
                    }
                    print(f"{name} / {setting}: InvMM on every image, {label} evidence: {counts}")
            outcome = run_cascade(loaded, items, setting_config, options, everyone=everyone)
            for line in report(f"{name} / {setting}", labelled, outcome, args.utilisation):
                print(line, flush=True)


if __name__ == "__main__":
    main()
