"""Does memray tell the demo model's planted (memorized) images from normal and held-out ones?

    python jobs/benchmark_demo.py                     # the shipped demo model and demo set
    python jobs/benchmark_demo.py --model DIR --manifest DIR/images/manifest.jsonl

Each measure runs on every image of the demo set and is scored so that higher = more memorized:
InvMM -KL (never replicated ranks last), Wasserstein W1, z0 error and noise-inversion error with
the empty prompt (negated: a memorized image is easier to reconstruct), and the caption screen
(Wen's score under the image's own caption). Printed per measure: AUC and TPR at 1% FPR of
planted images duplicated >= --positive-min times against normal and held-out images (AUC from
scipy's Mann-Whitney U), Spearman correlation of the score with the duplication count (held-out
0, normal 1), and UNet forwards/backwards and seconds per image. Then the paper's unconditional
check: noise inversion with the empty prompt on the planted images, with and without the KL term,
its KS normality p-values, and whether DDIM from the inverted noise replicates the image.

Budgets: the reference hyperparameters, cut where --budget says (printed with the table): the
reference budgets cost ~58k UNet forwards per image for InvMM alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from memray.auditing.runner import audit_batch
from memray.config import AuditConfig
from memray.data.records import ImageInput
from memray.demo import read_demo_manifest, trained_demo_manifest, trained_demo_model
from memray.measures import rng
from memray.measures.noise_inversion import invert_noise
from memray.measures.replication import replication_check
from memray.measures.similarity import build_similarity
from memray.models import load_model

# Budgets: the reference values with fewer steps and noises, same measures and same algorithms.
BUDGETS = {
    "bench": dict(
        invmm={
            "steps": 400,
            "check_every": 50,
            "check_noises": 4,
            "sampling_steps": 25,
            "loss_window": 50,
            "guidance_scales": [1.0, 3.0, 5.0, 7.0],
        },
        prompt_inversion={"steps": 200},
        wasserstein={"noises": 200, "timesteps": 25},
        z0_error={"timesteps": 50, "noises": 16},
        noise_inversion={"steps": 300, "regularized_steps": 300, "ks_samples": 200},
        wen={"generations": 4},
    ),  # fmt: skip
    "cpu": dict(  # what a 2-core CPU audits 36 images with in about half an hour
        invmm={
            "steps": 150,
            "samples_per_step": 8,
            "check_every": 50,
            "check_noises": 4,
            "sampling_steps": 20,
            "loss_window": 50,
            "guidance_scales": [1.0, 3.0, 5.0, 7.0],
        },
        prompt_inversion={"steps": 100, "samples_per_step": 8},
        wasserstein={"noises": 64, "timesteps": 10},
        z0_error={"timesteps": 50, "noises": 16},
        noise_inversion={"steps": 100, "regularized_steps": 100, "samples_per_step": 8, "ks_samples": 200},
        wen={"generations": 4},
    ),
    "reference": {},
    "smoke": dict(
        invmm={
            "steps": 4,
            "check_every": 2,
            "check_noises": 2,
            "sampling_steps": 3,
            "loss_window": 2,
            "samples_per_step": 2,
            "guidance_scales": [1.0, 3.0],
        },
        prompt_inversion={"steps": 3, "samples_per_step": 2},
        wasserstein={"noises": 8, "timesteps": 3},
        z0_error={"timesteps": 3, "noises": 2},
        noise_inversion={"steps": 3, "regularized_steps": 3, "samples_per_step": 2, "ks_samples": 10},
        wen={"generations": 1, "sampling_steps": 3},
    ),  # a seconds-long run of every step, for checking the script itself
}
# name: (measures run, score of a row: higher = more memorized)
MEASURES = {
    "InvMM (-KL)": (("invmm",), lambda r: -r.invmm_kl if r.invmm_replicated and r.invmm_kl is not None else -np.inf),
    "Wasserstein W1": (("prompt_inversion", "wasserstein"), lambda r: r.wasserstein),
    "z0 error (-)": (("z0_error",), lambda r: -r.z0_error),
    "noise inversion error (-)": (("noise_inversion",), lambda r: -r.noise_error),
    "caption screen (Wen)": (("wen",), lambda r: r.wen_score),
}


def load_demo_set(manifest: Path) -> list[dict]:
    """The manifest's records (id, uri, caption, split, duplicates) with their image bytes."""
    records = read_demo_manifest(manifest)
    for record in records:
        record["data"] = (manifest.parent / record["uri"]).read_bytes()
    return records


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half: Mann-Whitney U / (n1 n2)."""
    u = stats.mannwhitneyu(positives, negatives, alternative="greater").statistic
    return float(u / (len(positives) * len(negatives)))


def tpr_at_fpr(positives: np.ndarray, negatives: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of positives scored above the threshold that lets at most `fpr` of negatives through."""
    allowed = int(np.floor(fpr * len(negatives)))
    threshold = np.sort(negatives)[::-1][allowed]
    return float(np.mean(positives > threshold))


def run_measure(loaded, records, config: AuditConfig, batch_size: int):
    """Audit every record with `config`; rows in record order and seconds of wall time."""
    items = [ImageInput(image_id=r["id"], data=r["data"], caption=r["caption"]) for r in records]
    started = time.perf_counter()
    rows = []
    for start in range(0, len(items), batch_size):
        rows += [a.row for a in audit_batch(loaded, items[start : start + batch_size], config, replicas=0)]
    failed = [f"{r.image_id}: {r.error}" for r in rows if r.status != "ok"]
    if failed:
        raise SystemExit("audit errors:\n" + "\n".join(failed))
    return rows, time.perf_counter() - started


def measure_line(name: str, rows, records, seconds: float, positive_min: int) -> str:
    """One table line: AUC, TPR@1%FPR, Spearman and cost per image."""
    score = np.array([MEASURES[name][1](r) for r in rows], dtype=float)
    duplicates = np.array([r["duplicates"] for r in records])
    split = np.array([r["split"] for r in records])
    positive = (split == "planted") & (duplicates >= positive_min)
    negative = split != "planted"
    rho = stats.spearmanr(duplicates, score).statistic
    forwards = np.mean([r.unet_forwards for r in rows])
    backwards = np.mean([r.unet_backwards for r in rows])
    return (
        f"{name:26s} {auc(score[positive], score[negative]):6.3f} {tpr_at_fpr(score[positive], score[negative]):8.3f} "
        f"{rho:9.3f} {forwards:13.0f} {backwards:14.0f} {seconds / len(rows):12.2f}"
    )


@torch.no_grad()
def _replicates(model, z0, noise, similarity, steps: int) -> np.ndarray:
    """Does DDIM with the empty prompt from this (aligned) noise replicate each image?"""
    owner = torch.arange(len(z0), device=model.device)
    result = replication_check(
        model, z0, noise.unsqueeze(1), model.empty_condition(len(z0)), [1.0], similarity, owner, num_steps=steps
    )
    return result.replicated.cpu().numpy()


def unconditional_check(loaded, records, config: AuditConfig) -> list[str]:
    """The paper's check on planted images: noise inversion with the empty prompt, with and without KL."""
    from memray.data.images import decode_image, to_model_tensor

    model = loaded.adapter
    planted = [r for r in records if r["split"] == "planted"]
    pixels = torch.stack([to_model_tensor(decode_image(r["data"]), model.resolution) for r in planted])
    z0 = model.encode_images(pixels.to(model.device)).detach()
    owner = torch.arange(len(planted), device=model.device)
    model.counter.reset(len(planted))  # the check's own batch, not the last audited one
    similarity = build_similarity(config.similarity.kind, threshold=config.similarity.threshold)
    lines = []
    for regularized in (False, True):
        gens = rng.image_generators([r["id"] for r in planted], config.seed, "bench_uncond", model.device)
        result = invert_noise(
            model, z0, model.empty_condition(len(planted)), gens, owner, config.noise_inversion, regularized=regularized
        )
        replicated = _replicates(model, z0, result.noise, similarity, config.invmm.sampling_steps)
        label = "with KL (N(mu, sigma^2))" if regularized else "without KL (a point eps*)"
        lines.append(
            f"  {label:28s} mean KS p {np.mean(result.ks_p):.3g} (p < 0.05 for {np.mean(result.ks_p < 0.05):.0%}), "
            f"replicated by DDIM from {'mu*' if regularized else 'eps*'}: {int(replicated.sum())}/{len(planted)}"
        )
    return lines


def main() -> None:
    """Print the measure table and the unconditional check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(trained_demo_model()))
    parser.add_argument("--manifest", default=str(trained_demo_manifest()))
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="bench")
    parser.add_argument("--measures", nargs="*", default=list(MEASURES), choices=list(MEASURES))
    parser.add_argument("--positive-min", type=int, default=16, help="planted images duplicated at least this often")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 when other work shares the cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        records = load_demo_set(Path(args.manifest))
    except FileNotFoundError as error:
        raise SystemExit(f"{error}, or pass --model and --manifest") from None
    loaded = load_model(args.model, device=args.device)
    base = AuditConfig().replace(**BUDGETS[args.budget])
    splits = {s: sum(r["split"] == s for r in records) for s in ("planted", "normal", "heldout")}
    print(f"demo set {args.manifest}: {splits}; positives: planted with >= {args.positive_min} copies")
    print(f"model {args.model}; budget {args.budget} {json.dumps(BUDGETS[args.budget])}")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {loaded.adapter.device}"
    )
    print(f"{'measure':26s} {'AUC':>6s} {'TPR@1%':>8s} {'Spearman':>9s} {'forwards/img':>13s} "
          f"{'backwards/img':>14s} {'seconds/img':>12s}")  # fmt: skip
    for name in args.measures:
        config = base.replace(measures=list(MEASURES[name][0]))
        rows, seconds = run_measure(loaded, records, config, args.batch_size)
        print(measure_line(name, rows, records, seconds, args.positive_min), flush=True)
    print("unconditional check (empty prompt, planted images):")
    for line in unconditional_check(loaded, records, base):
        print(line, flush=True)


if __name__ == "__main__":
    main()
