"""Does memray find the images a demo model memorized, and leave the others alone?

    python jobs/benchmark_demo.py --budget cpu                 # the shipped demo model and demo set
    python jobs/benchmark_demo.py --model DIR/model --manifest DIR/images/manifest.jsonl

The budget is a preset (memray/presets: cpu, bench, smoke, ...). The demo manifest carries each
image's graded ground truth (memray.evaluation.demo_training): the share of 16 noises from which
its own caption replicates it. Positives: caption rate >= 0.5.
Negatives: rate 0, training images and never-trained ones alike; a never-trained image is
always a negative (it cannot be memorized) and any ground-truth replication of one is flagged.
Training images with 0 < rate < 0.5 are borderline: listed, kept out of both classes.

Every measure is scored so that higher = more memorized and printed with its AUC (Mann-Whitney
U), TPR at 1% FPR, Spearman correlation with the graded rate (all images), and UNet forwards,
backwards and seconds per image. Two settings: the caption known (InvMM and the prompt
inversion start from it, Wen screens it) and the prompt unknown (no caption reaches memray:
InvMM from zero logits, prompt inversion from random tokens). Then the verdicts per class, and
the paper's unconditional check: noise inversion with the empty prompt on the planted images,
with and without the KL term, its KS p-values and whether DDIM from the result replicates.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy import stats

from memray.auditing.runner import audit, audit_batch, config_targets, model_null_bank
from memray.config import PRESETS, AuditConfig, apply_overrides, preset_config
from memray.data.records import ImageInput
from memray.demo import read_demo_manifest, trained_demo_manifest, trained_demo_model
from memray.measures import rng
from memray.measures.noise_inversion import invert_noise
from memray.measures.replication import replication_check
from memray.models import load_model


@dataclass(frozen=True)
class Measure:
    """A benchmarked measure: what it runs, how a row scores (higher = more memorized), in which settings."""

    runs: tuple[str, ...]
    score: object
    settings: tuple[str, ...] = ("caption", "unknown")


def _kl_score(row) -> float:
    return -row.invmm_kl if row.invmm_replicated and row.invmm_kl is not None else -np.inf


# InvMM's rows carry the unconditional rate too: it reuses the model null and costs no UNet call.
INVMM = ("invmm", "uncond_replication")
MEASURES = {
    "InvMM (-KL)": Measure(INVMM, _kl_score),
    "M4 relative shift": Measure(("prompt_inversion", "wasserstein"), lambda r: r.err_shift_relative),
    "M4 shift (sd)": Measure(("prompt_inversion", "wasserstein"), lambda r: r.wasserstein_shift_sd),
    "M4 W1": Measure(("prompt_inversion", "wasserstein"), lambda r: r.wasserstein),
    "caption screen (Wen)": Measure(("wen",), lambda r: r.wen_score, ("caption",)),
    "uncond replication rate": Measure(INVMM, lambda r: r.uncond_replication_rate, ("unknown",)),
    "z0 error (-)": Measure(("z0_error",), lambda r: -r.z0_error, ("unknown",)),
    "noise inversion error (-)": Measure(("noise_inversion",), lambda r: -r.noise_error, ("unknown",)),
}
SETTINGS = {"caption": "caption known", "unknown": "prompt unknown"}


def load_demo_set(manifest: Path) -> list[dict]:
    """The manifest's records with their image bytes."""
    records = read_demo_manifest(manifest)
    missing = [r["id"] for r in records if "truth_caption_rate" not in r]
    if missing:
        raise SystemExit(f"{manifest}: no ground truth for {missing[:3]}...; run jobs/train_demo_model.py --check-only")
    for record in records:
        record["data"] = (manifest.parent / record["uri"]).read_bytes()
    return records


def truth_class(trained: bool, caption_rate: float | None) -> str:
    """The demo benchmark's classes: positive (trained, its caption replicates it from at least half
    of the noises), negative (never trained, or a rate of 0), borderline otherwise."""
    if not trained or not caption_rate:
        return "negative"
    return "positive" if caption_rate >= 0.5 else "borderline"


def classes(records) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(positive, negative) masks and the borderline ids (truth_class)."""
    truth = [truth_class(r["duplicates"] > 0, r["truth_caption_rate"]) for r in records]
    positive = np.array([t == "positive" for t in truth])
    negative = np.array([t == "negative" for t in truth])
    borderline = [r["id"] for r, t in zip(records, truth) if t == "borderline"]
    return positive, negative, borderline


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half: Mann-Whitney U / (n1 n2)."""
    u = stats.mannwhitneyu(positives, negatives, alternative="greater").statistic
    return float(u / (len(positives) * len(negatives)))


def tpr_at_fpr(positives: np.ndarray, negatives: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of positives scored above the threshold that lets at most `fpr` of negatives through."""
    allowed = int(np.floor(fpr * len(negatives)))
    threshold = np.sort(negatives)[::-1][allowed]
    return float(np.mean(positives > threshold))


def run_audit(loaded, records, config: AuditConfig, with_caption: bool, *, batch_size: int, slots=None, progress=None):
    """Audit every record (runner.audit, no replicas drawn); rows in record order and seconds of wall time
    (the model null excluded)."""
    model_null_bank(loaded, config)  # once per model and config, not per image: timed apart
    items = [ImageInput(r["id"], data=r["data"], caption=r["caption"] if with_caption else None) for r in records]
    started = time.perf_counter()
    rows = audit(items, loaded, config, batch_size=batch_size, replicas=0, slots=slots, progress=progress)
    failed = [f"{r.image_id}: {r.error}" for r in rows if r.status != "ok"]
    if failed:
        raise SystemExit("audit errors:\n" + "\n".join(failed))
    return rows, time.perf_counter() - started


def measure_line(name: str, rows, records, seconds: float) -> str:
    """One table line: AUC, TPR@1%FPR, Spearman and cost per image."""
    score = np.array([np.nan if (v := MEASURES[name].score(r)) is None else v for r in rows], dtype=float)
    score = np.nan_to_num(score, nan=-np.inf)
    positive, negative, _ = classes(records)
    rate = np.array([r["truth_caption_rate"] for r in records])
    rho = stats.spearmanr(rate, score).statistic
    forwards = np.mean([r.unet_forwards for r in rows])
    backwards = np.mean([r.unet_backwards for r in rows])
    return (
        f"  {name:26s} {auc(score[positive], score[negative]):6.3f} {tpr_at_fpr(score[positive], score[negative]):7.3f} "
        f"{rho:9.3f} {forwards:13.0f} {backwards:14.0f} {seconds / len(rows):12.2f}"
    )


def invmm_lines(rows, records) -> list[str]:
    """What InvMM replicated, per class; replications of never-trained images named."""
    positive, negative, _ = classes(records)
    replicated = np.array([bool(r.invmm_replicated) for r in rows])
    readable = np.array([bool(r.invmm_prompt_replicated) for r in rows])
    never = np.array([r["duplicates"] == 0 for r in records])
    false = [r.image_id for r, hit, n in zip(rows, replicated, never) if hit and n]
    kls = [r.invmm_kl_nats for r, p in zip(rows, positive) if p and r.invmm_replicated]
    return [
        f"  InvMM replicated: positives {replicated[positive].sum()}/{positive.sum()} "
        f"(by the readable prompt too: {readable[positive].sum()}), negatives {replicated[negative].sum()}/{negative.sum()}, "
        f"never-trained {replicated[never].sum()}/{never.sum()} {false or ''}",
        f"  KL (nats) of replicated positives: {', '.join(f'{k:.3g}' for k in sorted(kls)) or '-'}",
    ]


def verdict_lines(rows, records) -> list[str]:
    """Verdict counts per class (the full chain's decision)."""
    positive, negative, _ = classes(records)
    lines = []
    for label, mask in (("positives", positive), ("negatives", negative), ("borderline", ~(positive | negative))):
        counts = {
            v: sum(1 for r, m in zip(rows, mask) if m and r.verdict == v)
            for v in ("memorized", "inconclusive", "not_memorized")
        }
        lines.append(f"  {label:10s} " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    return lines


@torch.no_grad()
def _replicates(model, z0, noise, similarity, targets, steps: int) -> np.ndarray:
    """Does DDIM with the empty prompt from this noise replicate each image (its own bar)?"""
    owner = torch.arange(len(z0), device=model.device)
    result = replication_check(
        model,
        z0,
        noise.unsqueeze(1),
        model.empty_condition(len(z0)),
        [1.0],
        similarity,
        targets,
        owner,
        num_steps=steps,
    )
    return result.replicated.cpu().numpy()


def unconditional_check(loaded, records, config: AuditConfig) -> list[str]:
    """The paper's check on planted images: noise inversion with the empty prompt, with and without KL."""
    model = loaded.adapter
    planted = [r for r in records if r["split"] == "planted"]
    # decoded and encoded by the runner; the unconditional rate costs no UNet call
    encoded = audit_batch(
        loaded,
        [ImageInput(r["id"], data=r["data"]) for r in planted],
        config.replace(measures=["uncond_replication"]),
        replicas=0,
    )
    z0 = torch.stack([a.z0 for a in encoded]).to(model.device)
    owner = torch.arange(len(planted), device=model.device)
    similarity, targets = config_targets(model, config, z0, model_null_bank(loaded, config))
    lines = []
    with model.counter.scope(len(planted)):
        for regularized in (False, True):
            gens = rng.image_generators([r["id"] for r in planted], config.seed, "bench_uncond", model.device)
            result = invert_noise(
                model,
                z0,
                model.empty_condition(len(planted)),
                gens,
                owner,
                config.noise_inversion,
                regularized=regularized,
            )
            replicated = _replicates(model, z0, result.noise, similarity, targets, config.invmm.sampling_steps)
            label = "with KL (N(mu, sigma^2))" if regularized else "without KL (a point eps*)"
            lines.append(
                f"  {label:28s} mean KS p {np.mean(result.ks_p):.3g} (p < 0.05 for {np.mean(result.ks_p < 0.05):.0%}), "
                f"replicated by DDIM from {'mu*' if regularized else 'eps*'}: {int(replicated.sum())}/{len(planted)}"
            )
    return lines


def main(argv=None) -> int:
    """Print the tables of both settings, the verdicts and the unconditional check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(trained_demo_model()))
    parser.add_argument("--manifest", default=str(trained_demo_manifest()))
    parser.add_argument("--budget", choices=PRESETS, default="cpu", help="the preset the benchmark runs")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--measures", nargs="*", default=list(MEASURES), choices=list(MEASURES))
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a setting")
    parser.add_argument("--no-uncond-check", action="store_true", help="skip the paper's unconditional check")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 when other work shares the cores)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    records = load_demo_set(Path(args.manifest))
    loaded = load_model(args.model, device=args.device)
    base = apply_overrides(preset_config(args.budget), args.set)
    positive, negative, borderline = classes(records)
    never = sum(r["duplicates"] == 0 for r in records)
    print(f"demo set {args.manifest}: {len(records)} images, {positive.sum()} positives (caption rate >= 0.5), "
          f"{negative.sum()} negatives ({never} never trained), borderline {borderline}")  # fmt: skip
    flagged = [r["id"] for r in records if r["duplicates"] == 0 and r["truth_caption_rate"] > 0]
    if flagged:
        print(f"  ground truth replicates never-trained images (a fault of the similarity): {flagged}")
    print(f"model {args.model}; budget {args.budget} (config {base.hash()}) {args.set or ''}")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {loaded.adapter.device}"
    )
    for setting in args.settings:
        config = base.replace(
            invmm={"prompt_init": "caption" if setting == "caption" else "zero"},
            prompt_inversion={"init": "caption" if setting == "caption" else "random"},
        )
        print(f"\n{SETTINGS[setting]}")
        print(f"  {'measure':26s} {'AUC':>6s} {'TPR@1%':>7s} {'Spearman':>9s} {'forwards/img':>13s} "
              f"{'backwards/img':>14s} {'seconds/img':>12s}")  # fmt: skip
        done: dict[tuple, tuple] = {}
        for name in args.measures:
            measure = MEASURES[name]
            if setting not in measure.settings:
                continue
            if measure.runs not in done:
                measured = config.replace(measures=list(measure.runs))
                done[measure.runs] = run_audit(
                    loaded, records, measured, setting == "caption", batch_size=args.batch_size
                )
            rows, seconds = done[measure.runs]
            print(measure_line(name, rows, records, seconds), flush=True)
            if name == "InvMM (-KL)":
                for line in invmm_lines(rows, records):
                    print(line, flush=True)
        if INVMM in done:
            print(f"  verdicts ({' + '.join(INVMM)}):")
            for line in verdict_lines(done[INVMM][0], records):
                print(line, flush=True)
    bank_cost = sum(loaded.null_bank_costs.values())
    print(f"\nmodel null: {bank_cost} UNet forwards per model and configuration, shared by every image")
    if not args.no_uncond_check:
        print("unconditional check (empty prompt, planted images):")
        for line in unconditional_check(loaded, records, base):
            print(line, flush=True)
    return 0
