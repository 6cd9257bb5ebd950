"""Calibrate InvMM's early stop and check gate against full-budget runs on a demo model.

    python jobs/calibrate_early_stop.py collect --steps 300 --out traces.json    # full budget, every check traced
    python jobs/calibrate_early_stop.py analyze traces.json                      # agreement and cost per rule
    python jobs/calibrate_early_stop.py confirm --traces traces.json             # the defaults, run for real

jobs/calibration/demo-traces-300-steps.json is `collect --steps 300` on the shipped demo model (an
hour on 2 CPU cores), kept so `analyze` and `confirm --traces` reproduce the calibration at once.

`collect` audits the demo set (InvMM and the unconditional rate, caption known and prompt
unknown) with the early stop off and the gate computed at every check but never skipping the full
check, and keeps each image's check trace (invmm.TRACE_COLUMNS), its bar and nulls, the row's
verdict and its UNet evaluations. Because an image's result does not depend on the others, the
run under any stopping rule is the full run cut at the check where the rule fires: `analyze`
replays every rule on the traces, exactly, and prints the verdict agreement with the full budget
and the UNet evaluations per image against the reference protocol's. `confirm` runs the engine
itself with memray's defaults (early stop and gate on) on the whole set as one queue in `--slots`
slots: its verdicts against the traces' full runs, its evaluations, and the share of slots kept
busy; with `--against fp32` (on a GPU) it runs again in fp32 and compares the verdicts.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from benchmark_demo import BUDGETS, classes, load_demo_set  # noqa: E402

from memray.config import AuditConfig, apply_overrides  # noqa: E402
from memray.measures.replication import failing_check_forwards  # noqa: E402

GATE_STEPS = 5
RULE_SETTINGS = ("early_stop", "stop_after", "stop_progress", "gate_steps", "gate_margin")


def collect(args) -> None:
    """Full-budget runs with every check traced (module docstring)."""
    import torch

    from memray.auditing.runner import audit_batch, model_null_bank
    from memray.data.records import ImageInput
    from memray.demo import trained_demo_manifest, trained_demo_model
    from memray.models import load_model

    torch.set_num_threads(args.threads)
    manifest = Path(args.manifest) if args.manifest else trained_demo_manifest()
    loaded = load_model(args.model or str(trained_demo_model()))
    records = load_demo_set(manifest)
    # the gate traced at every check, never deciding
    config = demo_config(args.steps, early_stop=False, gate_steps=GATE_STEPS, gate_margin=1e9)
    config = apply_overrides(config, args.set or [])
    model_null_bank(loaded, config)
    out = {"config": json.loads(config.to_json()), "settings": {}}
    for setting in args.settings:
        items = [
            ImageInput(image_id=r["id"], data=r["data"], caption=r["caption"] if setting == "caption" else None)
            for r in records
        ]
        rows = []
        for start in range(0, len(items), args.queue):
            audits = audit_batch(loaded, items[start : start + args.queue], config, replicas=0, slots=args.slots)
            for a in audits:
                row = dataclasses.asdict(a.row)
                row.pop("replicas_png")
                rows.append({"row": row, "trace": a.invmm_trace.tolist()})
            print(f"{setting}: {len(rows)}/{len(items)}", file=sys.stderr, flush=True)
        out["settings"][setting] = rows
    out["records"] = [{k: v for k, v in r.items() if k != "data"} for r in records]
    Path(args.out).write_text(json.dumps(out))
    print(f"wrote {args.out}")


def demo_config(steps: int, **invmm) -> AuditConfig:
    """InvMM and the unconditional rate at the CPU budget's checks, `steps` steps, other InvMM settings as given."""
    config = AuditConfig(measures=("invmm", "uncond_replication"))
    return config.replace(
        invmm={**BUDGETS["cpu"]["invmm"], "steps": steps, **invmm}, similarity=BUDGETS["cpu"]["similarity"]
    )


def run_engine(loaded, records, config: AuditConfig, with_caption: bool, slots: int):
    """InvMM on every record in one queue of `slots` slots, as an actor runs it: (result, rows, seconds).

    The rows carry what the verdict reads: InvMM's columns and the unconditional rate.
    """
    import time

    import torch

    from memray.auditing.run_measures import Batch
    from memray.auditing.runner import config_targets, model_null_bank
    from memray.auditing.verdict import decide
    from memray.catalog.schema import AuditRow
    from memray.data.images import decode_image, to_model_tensor
    from memray.measures.invmm import invmm

    model = loaded.adapter
    pixels = torch.stack([to_model_tensor(decode_image(r["data"]), model.resolution) for r in records])
    z0 = model.encode_images(pixels.to(model.device))
    similarity, targets = config_targets(model, config, z0, model_null_bank(loaded, config))
    batch = Batch(
        model=model,
        config=config,
        ids=[r["id"] for r in records],
        captions=[r["caption"] if with_caption else None for r in records],
        z0=z0,
        owner=torch.arange(len(records), device=model.device),
        rows=[],
    )
    every = list(range(len(records)))
    model.counter.reset(len(records))
    started = time.perf_counter()
    result = invmm(
        model,
        z0,
        batch.gens("invmm", every),
        batch.owner,
        config.invmm,
        similarity,
        targets,
        start_ids=batch.caption_start(every, config.invmm.prompt_init),
        context=batch.caption_context(every),
        slots=slots,
    )
    seconds = time.perf_counter() - started
    rows = []
    for i, record in enumerate(records):
        replicated = bool(result.replicated[i])
        row = AuditRow(
            image_id=record["id"],
            invmm_replicated=replicated,
            invmm_kl_nats=float(result.kl_nats[i]) if replicated else None,
            invmm_steps=int(result.steps[i]),
            uncond_replication_rate=float(targets.bank_replicas[i]),
            unet_forwards=int(model.counter.forwards[i]),
            unet_backwards=int(model.counter.backwards[i]),
        )
        row.verdict = decide(row, config.verdict)[0]
        rows.append(row)
    return result, rows, seconds


def confirm(args) -> None:
    """The defaults run for real against the traces' full runs (module docstring)."""
    import torch

    from memray.demo import trained_demo_manifest, trained_demo_model
    from memray.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    manifest = Path(args.manifest) if args.manifest else trained_demo_manifest()
    records = load_demo_set(manifest)
    full = json.loads(Path(args.traces).read_text()) if args.traces else None
    steps = full["config"]["invmm"]["steps"] if full else args.steps
    config = demo_config(steps)  # InvMMConfig's defaults for the early stop and the gate
    print(f"defaults: {json.dumps({k: getattr(config.invmm, k) for k in RULE_SETTINGS})}, {args.slots} slots")
    for setting in args.settings:
        outcome = {}
        for precision in [args.precision, *([args.against] if args.against else [])]:
            loaded = load_model(args.model or str(trained_demo_model()), device=args.device, precision=precision)
            outcome[precision] = run_engine(loaded, records, config, setting == "caption", args.slots)
        result, rows, seconds = outcome[args.precision]
        evals = np.mean([r.unet_forwards + r.unet_backwards for r in rows])
        stops = {reason: result.stop_reason.count(reason) for reason in sorted(set(result.stop_reason))}
        print(
            f"\n{setting}: {len(rows)} images in {args.slots} slots, {seconds:.0f} s; {result.busy:.1%} of slots busy; "
            f"{evals:.0f} UNet evaluations/image ({evals / sum(reference_cost()):.3f} of the reference protocol's); stops {stops}"
        )
        positive, _, _ = classes(records)
        memorized = [r.image_id for r in rows if r.verdict == "memorized"]
        print(
            f"  memorized: {len(memorized)} (positives {sum(p for p, r in zip(positive, rows) if r.verdict == 'memorized')}/{positive.sum()})"
        )
        if full:
            by_id = {e["row"]["image_id"]: e["row"] for e in full["settings"][setting]}
            reference = [verdict(by_id[r.image_id], by_id[r.image_id]["invmm_replicated"]) for r in rows]
            same = [a == r.verdict for a, r in zip(reference, rows)]
            print(
                f"  verdicts as the full {steps}-step run: {sum(same)}/{len(same)}",
                [r.image_id for r, ok in zip(rows, same) if not ok] or "",
            )
        if args.against:
            other = outcome[args.against][1]
            same = [a.verdict == b.verdict for a, b in zip(rows, other)]
            print(
                f"  verdicts {args.precision} as {args.against}: {sum(same)}/{len(same)}",
                [a.image_id for a, ok in zip(rows, same) if not ok] or "",
            )


def reference_cost(conditional: bool = True) -> tuple[int, int]:
    """(forwards, backwards) per image of the reference protocol for an image that never replicates."""
    ref = dataclasses.asdict(AuditConfig().invmm)
    checks = ref["steps"] // ref["check_every"] + 1
    steps = ref["steps"] * ref["samples_per_step"]
    return steps + checks * failing_check_forwards(ref["guidance_scales"], ref["sampling_steps"], conditional), steps


def replay(entry: dict, invmm: dict, rule) -> tuple[bool, int, int]:
    """(replicated, forwards, backwards) of one image under `rule` (trace, bar) -> stop at check j or None.

    Exact for the decision; the cost of a replicated image is the full run's (it leaves at the same check).
    """
    row, trace = entry["row"], np.array(entry["trace"]).reshape(-1, 4)
    stop = rule(trace, row)
    if stop is None or (row["invmm_replicated"] and len(trace) - 1 <= stop):
        return bool(row["invmm_replicated"]), row["unet_forwards"], row["unet_backwards"]
    own_steps = int(trace[stop, 0])
    passed = np.nan_to_num(trace[: stop + 1, 2], nan=-np.inf) >= row["replication_threshold"]
    per_check = failing_check_forwards(invmm["guidance_scales"], invmm["sampling_steps"])
    forwards = own_steps * invmm["samples_per_step"] + (stop + 1) * per_check
    forwards += int(passed.sum()) * per_check * (invmm["check_noises"] - 1)  # staged: a passing scale costs more
    return False, forwards, own_steps * invmm["samples_per_step"]


def verdict(row: dict, replicated: bool) -> str:
    """The verdict of the row had InvMM ended with `replicated` (verdict.decide on a copy)."""
    from memray.auditing.verdict import decide
    from memray.catalog.schema import AuditRow
    from memray.config import VerdictConfig

    copy = dict(row)
    if not replicated:
        copy.update(invmm_replicated=False, invmm_kl=None, invmm_kl_nats=None)
    return decide(AuditRow(**copy), VerdictConfig())[0]


def gap_rule(after: int, gap: float):
    """The alternative in similarity units: stop at the first check from `after` steps on whose best
    similarity so far is `gap` under the bar (it does not carry over between kinds of similarity)."""

    def rule(trace, row):
        best = np.maximum.accumulate(np.nan_to_num(trace[:, 2], nan=-np.inf))
        late = (trace[:, 0] >= after) & (best < row["replication_threshold"] - gap)
        return int(np.argmax(late)) if late.any() else None

    return rule


def gate_lines(entries, invmm: dict, margins) -> str:
    """How the gate's few-step similarity tracks the full check, and what each margin would skip."""
    rows = [(np.array(e["trace"]).reshape(-1, 4), e["row"]) for e in entries]
    # the checks that replicated: the last check of each replicated image (a gate must never skip one)
    hits = [row["replication_threshold"] - trace[-1, 3] for trace, row in rows if row["invmm_replicated"]]
    checks = np.concatenate([row["replication_threshold"] - trace[:, 3] for trace, row in rows])
    full_cost = failing_check_forwards(invmm["guidance_scales"], invmm["sampling_steps"])
    gate_cost = failing_check_forwards(invmm["guidance_scales"], GATE_STEPS)
    lines = [
        f"  gate ({GATE_STEPS} DDIM steps): bar - gate similarity at the {len(hits)} replicating checks: "
        + ", ".join(f"{h:.3f}" for h in sorted(hits, reverse=True))
    ]
    for margin in margins:
        skipped = np.mean(checks > margin)
        missed = sum(h > margin for h in hits)
        cost = gate_cost + (1 - skipped) * full_cost
        lines.append(
            f"  gate margin {margin:5.2f}: skips {skipped:6.1%} of full checks, misses {missed} replications; "
            f"a failing check costs {cost:.0f} forwards instead of {full_cost}"
        )
    return "\n".join(lines)


def null_level(row: dict) -> float:
    """The higher of the image's two nulls (0 where neither was measured)."""
    nulls = [v for v in (row["null_content_similarity"], row["null_model_similarity"]) if v is not None]
    return max(nulls, default=0.0)


def progress_rule(after: int, share: float):
    """memray's early stop (invmm.out_of_reach) with `stop_after` = after and `stop_progress` = share."""
    from memray.measures.invmm import InvMMConfig, out_of_reach

    config = InvMMConfig(stop_after=after, stop_progress=share)

    def rule(trace, row):
        bar, null = row["replication_threshold"], null_level(row)
        fired = [j for j in range(len(trace)) if out_of_reach(trace[: j + 1], bar, null, config)]
        return fired[0] if fired else None

    return rule


def analyze(args) -> None:
    """Agreement and cost of each rule on the traces (module docstring)."""
    data = json.loads(Path(args.traces).read_text())
    invmm = data["config"]["invmm"]
    ref_f, ref_b = reference_cost()
    print(f"reference protocol, an image that never replicates: {ref_f} forwards + {ref_b} backwards")
    for setting, entries in data["settings"].items():
        positive, negative, _ = classes(data["records"])
        full = [verdict(e["row"], e["row"]["invmm_replicated"]) for e in entries]
        full_cost = np.mean([e["row"]["unet_forwards"] + e["row"]["unet_backwards"] for e in entries])
        print(
            f"\n{setting}: {len(entries)} images, full budget {invmm['steps']} steps, {full_cost:.0f} evaluations/image"
        )
        print(f"  {'rule':28s} {'agree':>6s} {'memorized kept':>15s} {'evals/img':>10s} {'of ref':>7s} {'of full':>8s}")
        rules = [(f"after {a:4d} gap {g:5.2f}", gap_rule(a, g)) for a, g in itertools.product(args.after, args.gap)]
        rules += [
            (f"after {a:4d} progress {p:4.2f}", progress_rule(a, p))
            for a, p in itertools.product(args.after, args.progress)
        ]
        for name, rule in rules:
            outcomes = [replay(e, invmm, rule) for e in entries]
            verdicts = [verdict(e["row"], r) for e, (r, _, _) in zip(entries, outcomes)]
            agree = np.mean([a == b for a, b in zip(verdicts, full)])
            kept = sum(a == b == "memorized" for a, b in zip(verdicts, full))
            evals = np.mean([f + b for _, f, b in outcomes])
            print(
                f"  {name:28s} {agree:6.1%} {kept:>7d}/{full.count('memorized'):<7d} "
                f"{evals:10.0f} {evals / (ref_f + ref_b):7.3f} {evals / full_cost:8.3f}"
            )
        del positive, negative
        print(gate_lines(entries, invmm, args.gate_margin))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--steps", type=int, default=400)
    c.add_argument("--settings", nargs="+", default=["caption", "unknown"], choices=["caption", "unknown"])
    c.add_argument("--model")
    c.add_argument("--manifest")
    c.add_argument("--slots", type=int, default=8)
    c.add_argument("--queue", type=int, default=16)
    c.add_argument("--threads", type=int, default=2)
    c.add_argument("--set", action="append")
    c.add_argument("--out", default="traces.json")
    f = sub.add_parser("confirm")
    f.add_argument("--traces", help="the full runs to compare with (collect's output)")
    f.add_argument("--steps", type=int, default=300, help="the InvMM budget where there are no traces")
    f.add_argument("--settings", nargs="+", default=["caption", "unknown"], choices=["caption", "unknown"])
    f.add_argument("--model")
    f.add_argument("--manifest")
    f.add_argument("--slots", type=int, default=8)
    f.add_argument("--device")
    f.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    f.add_argument("--against", choices=["fp32", "bf16"], help="run again in this precision and compare verdicts")
    f.add_argument("--threads", type=int)
    a = sub.add_parser("analyze")
    a.add_argument("traces")
    a.add_argument("--after", type=int, nargs="+", default=[25, 50, 100, 200])
    a.add_argument("--gap", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, math.inf])
    a.add_argument("--progress", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    a.add_argument("--gate-margin", type=float, nargs="+", default=[0.02, 0.05, 0.1, 0.2])
    args = parser.parse_args(argv)
    {"collect": collect, "analyze": analyze, "confirm": confirm}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
