"""Does the cascade find what InvMM on every image finds, at a fraction of the cost, and say how much it missed?

    python jobs/benchmark_cascade.py                                  # demo set and a 2,000-image LAION-shaped set
    python jobs/benchmark_cascade.py --sets demo --settings caption   # a part of it
    python jobs/benchmark_cascade.py --truth-of ROWS.parquet          # the graded truth of a kept run's judged negatives
    python jobs/benchmark_cascade.py --sweep start_check.steps 4 6 8  # the screen alone at each value of a setting

For a set of images with ground truth, in one setting (caption known or not):

1. stage 1, the screens (AuditConfig.screen_config) on every image;
2. the selection (memray.cascade.selection): the flagged images and a calibration sample;
3. stage 2, the full chain on the selection; where InvMM on every image was affordable and ran,
   its rows are the selected images' stage-2 rows (an image's result does not depend on its
   batch: tests/test_invariants.py), so both are measured from one set of InvMM runs;
4. the run's summary (memray.catalog.cascade.summarize): the screen's recall and its interval;
5. the screen's detection probability of each memorized image, over fresh seeds (`screen_detection`):
   the recall a run can expect, where one run's recall on a few images is one draw of it.

Everything goes through the runner (memray.auditing.runner.audit), the selection and the
summary the product uses; no step is re-implemented here. Cost is counted in UNet
sample-evaluations (forward and backward), the machine-independent cost, and projected to
GPU-hours per million images for Stable Diffusion 1.5 from its FLOPs per evaluation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from memray.auditing.runner import audit
from memray.cascade.selection import CascadeOptions, Screened, select
from memray.catalog.cascade import CascadeSummary, summarize
from memray.catalog.files import write_parquet
from memray.catalog.schema import AuditRow, rows_to_table
from memray.config import PRESETS, AuditConfig, apply_overrides, preset_config
from memray.data.records import ImageInput
from memray.evaluation.demo_benchmark import truth_class
from memray.evaluation.laion import write_laion_set
from memray.models import load_model

# Stable Diffusion 1.5's UNet at 512 px, GFLOP per sample-evaluation, counted by torch.utils.flop_counter
# (python jobs/benchmark_throughput.py --arch sd15 --unet-only --batch 2, on this project's CPU).
SD15_GFLOP_FORWARD = 677.2
SD15_GFLOP_FORWARD_BACKWARD = 1351.4
H100_BF16_PEAK_TFLOPS = 989.0


@dataclass
class Labelled:
    """An image of a benchmark set: its input, its ground truth ("positive", "negative", "borderline" or
    "unmeasured"), what the training did with it (`split`: planted, normal, heldout or hard) and how many
    times it was seen (a trained image whose caption never replicates it is a negative too)."""

    item: ImageInput
    truth: str
    split: str
    copies: int

    @property
    def trained(self) -> bool:
        """Whether the model saw it at all."""
        return self.copies > 0


@dataclass
class CascadeOutcome:
    """One cascade over one set in one setting, beside InvMM on every image where that ran."""

    screen: list[AuditRow]
    selected: dict[str, str]  # image_id -> selected_by
    stage2: dict[str, AuditRow]  # image_id -> its stage-2 row
    summary: CascadeSummary
    everyone: dict[str, AuditRow] | None  # InvMM on every image, where it ran
    seconds: dict[str, float]


def run_cascade(
    loaded,
    items: list[ImageInput],
    config: AuditConfig,
    options: CascadeOptions,
    *,
    everyone: list[AuditRow] | None = None,
    batch_size: int = 16,
    slots: int | None = None,
) -> CascadeOutcome:
    """Screen, select, confirm (or take the selected images' rows of `everyone`), summarize."""
    seconds = {}
    started = time.perf_counter()
    screen = audit(items, loaded, config.screen_config(), batch_size=batch_size, replicas=0, stage="screen")
    seconds["screen"] = time.perf_counter() - started
    ok = [row for row in screen if row.status == "ok"]
    selection = select(
        [Screened(r.image_id, r.image_sha256, bool(r.screen_flagged), r.screen_progress, r.phash) for r in ok],
        options,
        config.seed,
    )
    selected = {s.image_id: s.selected_by for s in selection if s.selected_by}
    if everyone is not None:
        by_id = {row.image_id: row for row in everyone}
        stage2 = {image_id: by_id[image_id] for image_id in selected}
        seconds["stage2"] = sum(by_id[image_id].seconds for image_id in selected)
    else:
        chosen = [item for item in items if item.image_id in selected]
        started = time.perf_counter()
        rows = audit(chosen, loaded, config, batch_size=batch_size, replicas=0, slots=slots, stage="confirm")
        seconds["stage2"] = time.perf_counter() - started
        stage2 = {row.image_id: row for row in rows}
    table = [
        {
            "flagged": s.flagged,
            "selected_by": s.selected_by,
            "confirmed_via": s.confirmed_via,
            "calibration_rate": s.calibration_rate,
            "verdict": stage2[s.image_id].verdict
            if s.image_id in stage2 and stage2[s.image_id].status == "ok"
            else None,
        }
        for s in selection
    ]
    summary = summarize("benchmark", loaded.slug, table, options.confidence)
    return CascadeOutcome(
        screen, selected, stage2, summary, None if everyone is None else {r.image_id: r for r in everyone}, seconds
    )


def evaluations(rows) -> tuple[float, float]:
    """Total UNet (forward, backward) sample-evaluations of rows."""
    rows = list(rows)  # read twice
    return float(sum(r.unet_forwards or 0 for r in rows)), float(sum(r.unet_backwards or 0 for r in rows))


def gpu_hours_per_million(forwards: float, backwards: float, utilisation: float) -> float:
    """GPU-hours a million images take on an H100 in bf16 at `utilisation`, for SD 1.5, given per-image
    forward and backward sample-evaluations."""
    flops = forwards * SD15_GFLOP_FORWARD + backwards * (SD15_GFLOP_FORWARD_BACKWARD - SD15_GFLOP_FORWARD)
    return flops * 1e9 * 1e6 / (H100_BF16_PEAK_TFLOPS * 1e12 * utilisation) / 3600


def screen_detection(loaded, items: list[ImageInput], config: AuditConfig, draws: int) -> dict[str, float]:
    """How often the screen flags each of `items` over `draws` seeds other than the run's: its detection probability.

    A new seed draws new noises and a new model null, everything random in the screen, so the mean over
    the images a run judges memorized is the recall that run could expect from its screen.
    """
    flags: Counter[str] = Counter()
    for draw in range(1, draws + 1):
        screen = config.screen_config().replace(seed=config.seed + draw)
        rows = audit(items, loaded, screen, batch_size=16, replicas=0, stage="screen")
        flags.update(row.image_id for row in rows if row.status == "ok" and row.screen_flagged)
    return {item.image_id: flags[item.image_id] / draws for item in items}


def detection_line(label: str, detection: dict[str, float], draws: int) -> str:
    """One report line: the mean detection probability of a group of images and its weakest member."""
    weakest = min(detection, key=detection.get)
    return (
        f"  screen detection over {draws} seeds of {label} ({len(detection)}): expected recall "
        f"{np.mean(list(detection.values())):.3f}, lowest {detection[weakest]:.2f} ({weakest})"
    )


def sweep_screen(loaded, labelled: list[Labelled], config: AuditConfig, key: str, values, draws: int) -> Iterator[str]:
    """The screen alone at each value of one setting (SECTION.KEY, values in TOML syntax), a line as each is
    measured: its cost, what it flags of each kind of image, and its detection of the positives over `draws` seeds."""
    kinds = {
        "positives": lambda x: x.truth == "positive",
        "borderline": lambda x: x.truth == "borderline",
        "never-trained": lambda x: not x.trained,
        "normal training images": lambda x: x.split == "normal",
    }
    items = [x.item for x in labelled]
    positives = [x.item for x in labelled if x.truth == "positive"]
    for value in values:
        setting = apply_overrides(config, [f"{key}={value}"])
        rows = {r.image_id: r for r in audit(items, loaded, setting.screen_config(), batch_size=16, replicas=0)}
        ok = [x for x in labelled if rows[x.item.image_id].status == "ok"]
        forwards, _ = evaluations([rows[x.item.image_id] for x in ok])
        flagged = []
        for kind, member in kinds.items():
            group = [x for x in ok if member(x)]
            hits = sum(bool(rows[x.item.image_id].screen_flagged) for x in group)
            if group:
                flagged.append(f"{kind} {hits}/{len(group)} ({hits / len(group):.1%})")
        yield f"  {key}={value}: {forwards / len(ok):.0f} UNet forwards per image; flagged {', '.join(flagged)}"
        if positives and draws:
            yield "  " + detection_line("the positives", screen_detection(loaded, positives, setting, draws), draws)


def cost_floor(outcome: CascadeOutcome, screened: int) -> tuple[float, float, float]:
    """Per screened image: what the screen and the calibration sample cost, and the least the cascade could cost
    with this screen and sample, had the screen flagged exactly the images judged memorized (by InvMM on every
    image where that ran, else by stage 2)."""
    screen = sum(evaluations([row for row in outcome.screen if row.status == "ok"]))
    calibration = {i for i, by in outcome.selected.items() if by == "calibration"}
    sampled = sum(evaluations([outcome.stage2[i] for i in calibration]))
    judged = outcome.everyone if outcome.everyone is not None else outcome.stage2
    memorized = sum(
        evaluations([row for i, row in judged.items() if row.verdict == "memorized" and i not in calibration])
    )
    return screen / screened, sampled / screened, (screen + sampled + memorized) / screened


def progress_by_kind(labelled: list[Labelled], screen: list[AuditRow], flags=(0.5, 0.8, 1.0)) -> list[str]:
    """Where each kind of image lands on the screen's progress scale: its median, 99th percentile and
    range, and how many reach each flag (what sets `start_check.flag_progress`)."""
    progress = {r.image_id: r.screen_progress for r in screen if r.status == "ok" and r.screen_progress is not None}
    kinds: dict[str, list[float]] = {}
    for x in labelled:
        if x.item.image_id in progress:
            kind = f"{x.split} {x.truth}" if x.split == "planted" else x.split
            kinds.setdefault(kind, []).append(progress[x.item.image_id])
    lines = []
    for kind, values in sorted(kinds.items()):
        v = np.array(values)
        reach = ", ".join(f">= {f:g}: {int((v >= f).sum())}" for f in flags)
        lines.append(
            f"    {kind} ({len(v)}): median {np.median(v):.2f}, 99th percentile {np.quantile(v, 0.99):.2f}, "
            f"range {v.min():.2f} to {v.max():.2f}; {reach}"
        )
    return ["  screen progress by kind:", *lines]


def report(
    name: str,
    labelled: list[Labelled],
    outcome: CascadeOutcome,
    utilisation: float,
    detect=None,
    draws: int = 0,
) -> list[str]:
    """The benchmark's lines for one set and setting: cost and its floor, selection, recall against the truth
    and against InvMM on every image, the recall estimate and whether it covers the truth. `detect(items)`,
    where given, is screen_detection's probabilities for the images of those ids over `draws` seeds."""
    truth = {x.item.image_id: x.truth for x in labelled}
    never_trained = {x.item.image_id for x in labelled if not x.trained}
    ok = [row for row in outcome.screen if row.status == "ok"]
    n = len(ok)
    screen_f, screen_b = evaluations(ok)
    stage2_f, stage2_b = evaluations(outcome.stage2.values())
    flagged = {r.image_id for r in ok if r.screen_flagged}
    calibration = sum(v == "calibration" for v in outcome.selected.values())
    lines = [
        f"{name}: {n} images screened ({len(outcome.screen) - n} error rows), "
        f"{sum(t == 'positive' for t in truth.values())} positives, {sum(t == 'borderline' for t in truth.values())} borderline",
        f"  screen: {screen_f / n:.0f} UNet forwards per image; flagged {len(flagged)} ({len(flagged) / n:.1%}); "
        f"stage 2: {len(outcome.selected)} images ({len(outcome.selected) / n:.1%}: {calibration} calibration)",
        *progress_by_kind(labelled, outcome.screen),
    ]
    memorized = {image_id for image_id, row in outcome.stage2.items() if row.verdict == "memorized"}
    found = memorized & flagged
    positives = {i for i, t in truth.items() if t == "positive"}
    lines.append(
        f"  truth: positives flagged {len(positives & flagged)}/{len(positives)}, judged memorized "
        f"{len(positives & found)}/{len(positives)}; borderline flagged "
        f"{len({i for i, t in truth.items() if t == 'borderline'} & flagged)}; "
        f"negatives judged memorized {sum(truth.get(i) == 'negative' for i in memorized)} "
        f"(never trained: {len(memorized & never_trained)} of {len(never_trained)})"
    )
    unmeasured = [x for x in labelled if x.truth == "unmeasured"]
    if unmeasured:
        judged = [x for x in unmeasured if x.item.image_id in memorized]
        lines.append(
            f"  training images whose truth was not measured: {len(judged)} of {len(unmeasured)} judged memorized"
            f"{': ' + seen_counts(judged) if judged else ''}"
        )
    total_f, total_b = screen_f + stage2_f, screen_b + stage2_b
    if outcome.everyone is not None:
        every = [row for row in outcome.everyone.values() if row.status == "ok"]
        every_f, every_b = evaluations(every)
        invmm_memorized = {r.image_id for r in every if r.verdict == "memorized"}
        true_recall = len(invmm_memorized & flagged) / len(invmm_memorized) if invmm_memorized else float("nan")
        lines.append(
            f"  against InvMM on every image: it judges {len(invmm_memorized)} memorized, the cascade finds "
            f"{len(invmm_memorized & memorized)} of them (screen recall {true_recall:.3f}); evaluations per image "
            f"{(every_f + every_b) / n:.0f} against the cascade's {(total_f + total_b) / n:.0f} "
            f"({(every_f + every_b) / (total_f + total_b):.1f}x fewer)"
        )
        reference = (every_f / n, every_b / n)
    else:  # the calibration sample is a simple random sample of the cleared: their mean cost estimates the rest's
        cleared = [outcome.stage2[i] for i, by in outcome.selected.items() if by == "calibration"]
        mean = np.mean([(r.unet_forwards, r.unet_backwards) for r in cleared], axis=0) if cleared else (np.nan, np.nan)
        flagged_rows = [outcome.stage2[i] for i in flagged if i in outcome.stage2]
        flagged_f, flagged_b = evaluations(flagged_rows)
        rest = n - len(flagged_rows)
        reference = ((flagged_f + rest * mean[0]) / n, (flagged_b + rest * mean[1]) / n)
        lines.append(
            f"  InvMM on every image, estimated from the calibration sample's cost: {sum(reference):.0f} evaluations "
            f"per image against the cascade's {(total_f + total_b) / n:.0f} ({sum(reference) * n / (total_f + total_b):.1f}x fewer)"
        )
    screen_cost, sample_cost, floor = cost_floor(outcome, n)
    lines.append(
        f"  its floor: flagging exactly the images judged memorized, this screen ({screen_cost:.0f}) and calibration "
        f"sample ({sample_cost:.0f}) would cost {floor:.0f} per image, {sum(reference) / floor:.1f}x fewer than InvMM on every image"
    )
    # What the interval estimates is the screen's recall of stage 2's verdicts: InvMM on every image knows it
    # exactly; without that run the ground-truth positives stand in for it.
    estimate, truth_recall = outcome.summary.recall, None
    if outcome.everyone is not None and invmm_memorized:
        truth_recall, against = true_recall, "InvMM on every image"
    elif outcome.everyone is None and positives:
        truth_recall, against = len(positives & flagged) / len(positives), "the positives"
    covered = ""
    if estimate.recall is not None and truth_recall is not None:
        inside = estimate.recall_low <= truth_recall <= estimate.recall_high
        covered = (
            f"; the recall against {against}, {truth_recall:.3f}, is {'inside' if inside else 'OUTSIDE'} the interval"
        )
    lines.append(f"  screen {estimate.statement()}{covered}")
    if detect is not None and draws:
        groups = {"the positives": sorted(positives)}
        if outcome.everyone is not None:
            groups["the images InvMM on every image judges memorized"] = sorted(invmm_memorized)
        groups = {label: ids for label, ids in groups.items() if ids}
        if groups:
            detection = detect(sorted(set().union(*groups.values())))
            lines += [detection_line(label, {i: detection[i] for i in ids}, draws) for label, ids in groups.items()]
    lines.append(
        f"  SD 1.5 at {utilisation:.0%} of an H100's bf16 peak: the cascade "
        f"{gpu_hours_per_million(total_f / n, total_b / n, utilisation):,.0f} GPU-hours per million images, "
        f"InvMM on every image {gpu_hours_per_million(*reference, utilisation):,.0f}"
    )
    return lines


def measure_truth(rows_path: str, laion: str, config: AuditConfig) -> list[str]:
    """The graded truth of the images a kept run (--rows) judged memorized or inconclusive although the set calls
    them never trained or does not measure them: the demo model's own procedure (demo_training.ground_truth,
    at the settings the model was trained with), so a verdict can be checked against what the caption does;
    and beside it the same count under the audit's own bar and `config`'s check steps (a start check of as
    many noises), where the two definitions of a replica can part."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    from memray.demo import DEMO_ASSETS, trained_demo_model
    from memray.evaluation.demo_training import TRUTH_SCALES, Item, ground_truth, training_arguments

    labelled = {x.item.image_id: x for x in laion_set(laion, with_caption=True)}
    judged = [
        r
        for r in pq.read_table(rows_path).to_pylist()
        if r["stage"] != "screen"
        and r["verdict"] in ("memorized", "inconclusive")
        and labelled[r["image_id"]].split in ("normal", "heldout")  # unmeasured, and never trained
    ]
    args = training_arguments(json.loads((DEMO_ASSETS / "train_log.json").read_text()), "cpu")
    items = []
    for r in judged:
        x = labelled[r["image_id"]]
        picture = Image.open(io.BytesIO(x.item.data)).convert("RGB").resize((args.resolution,) * 2)
        items.append(Item(x.item.image_id, x.split, x.item.caption, "", x.copies, picture=picture))
    truth = ground_truth(trained_demo_model(), items, args)
    steps = config.invmm.sampling_steps
    own = config.screen_config().replace(
        start_check={"noises": args.truth_noises, "steps": steps, "guidance_scales": list(TRUTH_SCALES)}
    )
    audited = {
        r.image_id: r
        for r in audit([labelled[r["image_id"]].item for r in judged], load_model("demo"), own, replicas=0)
    }
    lines = [
        f"ground truth ({args.truth_noises} noises x {len(TRUTH_SCALES)} scales, {args.truth_steps} DDIM steps) "
        f"of {len(items)} images; the audit's own bar, {args.truth_noises} noises at {steps} steps, at the scale "
        f"the start check's pilot chose:"
    ]
    for r, item in sorted(zip(judged, items), key=lambda pair: (pair[1].split, pair[0]["verdict"], pair[1].id)):
        seen = "never trained" if not item.copies else f"seen {item.copies}x"
        lines.append(
            f"  {item.id} ({item.split}, {seen}) {r['verdict']}: caption rate {truth[item.id]['truth_caption_rate']:.2f}, "
            f"empty prompt {truth[item.id]['truth_uncond_rate']:.2f}; audit's bar {audited[item.id].screen_replicas}"
            f"/{args.truth_noises} at guidance {audited[item.id].screen_guidance:g}; {item.caption!r}"
        )
    return lines


def seen_counts(images: list[Labelled]) -> str:
    """How often images were seen in training: "2 seen once, 1 seen 3x"."""
    seen = Counter(x.copies for x in images)
    return ", ".join(f"{n} seen {'once' if copies == 1 else f'{copies}x'}" for copies, n in sorted(seen.items()))


def write_rows(path: Path, labelled: list[Labelled], outcome: CascadeOutcome) -> None:
    """Every row of one cascade, in the catalog schema with each image's truth: its screen rows, then its stage-2
    rows (InvMM's on every image, where that ran) marked with why the cascade selected them."""
    by_id = {x.item.image_id: x for x in labelled}
    second = outcome.everyone if outcome.everyone is not None else outcome.stage2
    confirmed = [dataclasses.replace(row, selected_by=outcome.selected.get(i)) for i, row in second.items()]
    rows = outcome.screen + confirmed
    table = rows_to_table(rows)
    for name, values in (
        ("truth", [by_id[r.image_id].truth for r in rows]),
        ("truth_split", [by_id[r.image_id].split for r in rows]),
        ("truth_copies", [by_id[r.image_id].copies for r in rows]),
    ):
        table = table.append_column(name, pa.array(values))
    write_parquet(table, path)


def demo_set(with_caption: bool) -> list[Labelled]:
    """The shipped demo set with its ground truth (memray/demo_assets/images)."""
    from memray.demo import read_demo_manifest, trained_demo_manifest

    manifest = trained_demo_manifest()
    return [
        Labelled(
            ImageInput(
                record["id"],
                data=(manifest.parent / record["uri"]).read_bytes(),
                caption=(record["caption"] or None) if with_caption else None,
            ),
            truth_class(record["duplicates"] > 0, record["truth_caption_rate"]),
            record["split"],
            record["duplicates"],
        )
        for record in read_demo_manifest(manifest)
    ]


def laion_set(url: str, with_caption: bool) -> list[Labelled]:
    """A set written by evaluation.laion.write_laion_set, read through memray's own shard reader.

    Normal training images, whose replication rate the set does not measure, are "unmeasured": the
    report counts their verdicts apart, neither as negatives nor as positives (seen once, a caption
    that fully describes a plain scene can still generate it)."""
    from memray.data.sources import list_units, read_unit
    from memray.evaluation.laion import read_truth, training_copies

    truth = {row["key"]: row for row in read_truth(url)}
    copies = training_copies()
    labelled = []
    for unit in list_units(f"{url.rstrip('/')}/*.tar"):
        for record in read_unit(unit):
            row = truth.get(record["image_id"].rsplit("/", 1)[-1])
            if row is None or record["data"] is None:
                continue
            item = ImageInput(**record)
            if not with_caption:
                item.caption = None
            seen, rate = copies.get(row["source_id"], 0), row["truth_caption_rate"]
            label = "unmeasured" if seen and rate is None else truth_class(seen > 0, rate if seen else 0.0)
            labelled.append(Labelled(item, label, row["split"], seen))
    return labelled


SETTINGS = {"caption": True, "unknown": False}


def main(argv=None) -> int:
    """Print the benchmark's lines for every set and setting asked for (jobs/benchmark_cascade.py)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="+", choices=["demo", "laion"], default=["demo", "laion"])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--laion", default="memray-out/laion-2000", help="folder of the LAION-shaped set")
    parser.add_argument("--laion-images", type=int, default=2000)
    parser.add_argument(
        "--budget", choices=PRESETS, default="cpu", help="the preset stage 2 runs at (as benchmark_demo)"
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--calibration-rate", type=float, default=0.01)
    parser.add_argument("--calibration-min", type=int, default=20)
    parser.add_argument("--utilisation", type=float, default=0.4, help="assumed share of the H100's bf16 peak")
    parser.add_argument("--threads", type=int)
    parser.add_argument(
        "--sweep",
        nargs="+",
        metavar=("SECTION.KEY", "VALUE"),
        help="instead of the cascade: the screen alone at each VALUE of one setting, on every set and setting asked for",
    )
    parser.add_argument(
        "--detection-draws", type=int, default=16, help="seeds to re-screen the memorized images with (0: none)"
    )
    parser.add_argument("--rows", help="folder to keep every row in, with its truth: {set}-{setting}.parquet")
    parser.add_argument(
        "--truth-of", metavar="ROWS", help="instead: the graded truth of a kept LAION-shaped run's judged negatives"
    )
    args = parser.parse_args(argv)
    if args.sweep and len(args.sweep) < 2:
        parser.error("--sweep takes a setting and at least one value, e.g. --sweep start_check.steps 4 6 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.truth_of:
        print(
            "\n".join(measure_truth(args.truth_of, args.laion, apply_overrides(preset_config(args.budget), args.set)))
        )
        return 0
    config = apply_overrides(preset_config(args.budget), args.set).replace(measures=["invmm", "uncond_replication"])
    options = CascadeOptions(calibration_rate=args.calibration_rate, calibration_min=args.calibration_min)
    loaded = load_model("demo")
    print(
        f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; "
        f"budget {args.budget}, config {config.hash()}"
    )
    invmm = config.invmm
    print(
        f"screen {config.start_check}; stage 2 {config.measures}, InvMM {invmm.steps} steps, {invmm.confirm_noises} confirming noises; {options}"
    )
    if "laion" in args.sets and not (Path(args.laion) / "truth.parquet").exists():
        write_laion_set(args.laion, args.laion_images)
    for name in args.sets:
        for setting in args.settings:
            labelled = demo_set(SETTINGS[setting]) if name == "demo" else laion_set(args.laion, SETTINGS[setting])
            items = [x.item for x in labelled]
            setting_config = config.replace(invmm={"prompt_init": "caption" if SETTINGS[setting] else "zero"})
            if args.sweep:
                key, *values = args.sweep
                print(f"{name} / {setting}: the screen alone, at each {key}")
                for line in sweep_screen(loaded, labelled, setting_config, key, values, args.detection_draws):
                    print(line, flush=True)
                continue
            everyone = None
            if name == "demo":
                everyone = audit(items, loaded, setting_config, batch_size=16, replicas=0)
                reference = setting_config.replace(verdict={"evidence": "all"})
                verdicts = {
                    label: [row.verdict for row in rows]
                    for label, rows in (
                        ("counting", everyone),
                        ("all-K", audit(items, loaded, reference, batch_size=16, replicas=0)),
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

            def detect(image_ids, items=items, config=setting_config):
                wanted = set(image_ids)
                chosen = [item for item in items if item.image_id in wanted]
                return screen_detection(loaded, chosen, config, args.detection_draws)

            lines = report(f"{name} / {setting}", labelled, outcome, args.utilisation, detect, args.detection_draws)
            for line in lines:
                print(line, flush=True)
            if args.rows:
                write_rows(Path(args.rows) / f"{name}-{setting}.parquet", labelled, outcome)
    return 0
