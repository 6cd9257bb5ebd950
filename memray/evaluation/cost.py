"""Cost benchmark: UNet forwards/backwards and wall time per image, per measure group, at a preset.

    python jobs/benchmark_cost.py --preset reference --images 2

Counts are the machine-independent cost; seconds depend on the machine (printed with it).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time

import torch

from memray.auditing.runner import audit_batch
from memray.config import PRESETS, V1_CHAIN, preset_config
from memray.data.records import ImageInput
from memray.demo import demo_images
from memray.models import load_model
from memray.models.tiny import build_tiny_sd

GROUPS = {"invmm": ("invmm",), "v1 chain": V1_CHAIN, "wen screen": ("wen",)}


def main(argv=None) -> int:
    """Print one line per measure group: forwards, backwards and seconds per image."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="reference")
    parser.add_argument("--model", help="checkpoint directory (default: a tiny SD built in code)")
    parser.add_argument("--images", type=int, default=2, help="images audited together in one batch")
    parser.add_argument("--device", default=None)
    parser.add_argument("--groups", nargs="*", default=list(GROUPS), choices=list(GROUPS))
    args = parser.parse_args(argv)

    model_dir = args.model or str(build_tiny_sd(tempfile.mkdtemp() + "/tiny-sd"))
    loaded = load_model(model_dir, device=args.device)
    device = loaded.adapter.device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"{platform.processor() or 'cpu'} x{torch.get_num_threads()} threads"
    )
    print(
        f"model {loaded.slug} ({loaded.adapter.resolution}px), preset {args.preset}, {args.images} images per batch, device {name}"
    )
    print(f"{'measures':12s} {'forwards/img':>13s} {'backwards/img':>14s} {'seconds/img':>12s}  verdicts")
    images = [ImageInput(**item) for item in demo_images(args.images)]
    for group in args.groups:
        config = preset_config(args.preset).replace(measures=list(GROUPS[group]))
        started = time.perf_counter()
        audits = audit_batch(loaded, images, config)
        seconds = time.perf_counter() - started
        rows = [a.row for a in audits]
        errors = [r.error for r in rows if r.status != "ok"]
        if errors:
            raise SystemExit(f"{group}: {errors}")
        fwd = sum(r.unet_forwards for r in rows) / len(rows)
        bwd = sum(r.unet_backwards for r in rows) / len(rows)
        verdicts = ",".join(sorted({str(r.verdict) for r in rows}))
        print(f"{group:12s} {fwd:13.0f} {bwd:14.0f} {seconds / len(rows):12.2f}  {verdicts}", flush=True)
    return 0
