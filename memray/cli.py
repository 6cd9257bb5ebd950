"""Command line: `memray audit | query | compare | report | inspect | demo | config`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from memray.config import PRECISIONS, PRESETS, apply_overrides, load_config, preset_config
from memray.errors import USAGE_ERRORS, ConfigError, Terminated, is_storage_access_error
from memray.formatting import format_value, log_to_stderr, printable

# Everything else is imported by the command that needs it: `memray --help` and `memray query`
# never load torch (memray.config does not).


class Progress:
    """Progress of long optimisations on stderr: a redrawn line on a terminal, every 10% otherwise."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.last = None
        self.started = time.monotonic()

    def __call__(self, label: str, done: int, total: int) -> None:
        decile = done * 10 // total
        if self.tty:
            self.stream.write(f"\r  {label}: {done}/{total} ({time.monotonic() - self.started:.0f} s)   ")
            if done == total:
                self.stream.write("\n")
        elif (label, decile) != self.last:
            self.stream.write(f"  {label}: {done}/{total} ({time.monotonic() - self.started:.0f} s)\n")
        self.last = (label, decile)
        self.stream.flush()


def build_config(args):
    """The AuditConfig of the flags: preset or file, then --set overrides, then the shortcut flags."""
    base = load_config(args.config) if args.config else preset_config(args.preset)
    shortcuts = {}
    if args.sscd:
        shortcuts["similarity"] = {"kind": "sscd", "sscd_path": args.sscd}
    if args.seed is not None:
        shortcuts["seed"] = args.seed
    if args.precision is not None:
        shortcuts["precision"] = args.precision
    return apply_overrides(base, args.set or [], **shortcuts)


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and audit configuration flags; shared with jobs/nightly.py."""
    parser.add_argument(
        "--model",
        required=True,
        help="checkpoint: local diffusers directory, fsspec URL, hub id, or demo (the shipped demo model)",
    )
    parser.add_argument("--config", help="TOML/YAML/JSON audit configuration")
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="default",
        help="base configuration (memray/presets): default (reference hyperparameters with the calibrated early stop), "
        "reference (the reference protocol: no early stop), quick, cpu and bench (the demo benchmark's budgets), smoke",
    )
    parser.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override one setting, e.g. --set invmm.steps=500"
    )
    parser.add_argument("--sscd", help="SSCD TorchScript file: decide replication by SSCD similarity")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument(
        "--precision",
        choices=list(PRECISIONS),
        help="autocast precision on GPU (part of the config: it changes results; default fp32)",
    )
    parser.add_argument(
        "--allow-pickle", action="store_true", help="allow pickle (.bin/.ckpt) weights: they can execute code on load"
    )


def _load(args, config):
    from memray.models import load_model

    return load_model(args.model, device=args.device, precision=config.precision, allow_pickle=args.allow_pickle)


def audit_config(args, model):
    """The AuditConfig of the flags of add_model_args, fitted to the model (an adapter or its class):
    an unconditional model cannot run prompt measures, so they are dropped, unless the user named
    the measures (then a mismatch is an error at start-up)."""
    from memray.auditing.runner import supported_measures

    config = build_config(args)
    if args.config or any(s.startswith("measures=") for s in args.set or []):
        return config
    return config.replace(measures=list(supported_measures(config, model)))


def cmd_inspect(args) -> int:
    """Audit one image and write its figures."""
    from memray.auditing.runner import ImageInput, audit_batch, replica_samples
    from memray.data.sources import stable_path_id
    from memray.report.plots import save_error_distributions, save_image_row

    config = build_config(args)
    loaded = _load(args, config)
    config = audit_config(args, loaded.adapter)
    image = Path(args.image)
    item = ImageInput(
        image_id=stable_path_id(str(image), None), uri=str(image), caption=args.caption, source=str(image)
    )
    print(
        f"memray inspect {image} with {loaded.ref} ({loaded.adapter.family}, {loaded.adapter.prediction_type}, "
        f"{loaded.adapter.resolution}px, config {config.hash()})",
        file=sys.stderr,
    )
    # No replicas_png: inspect draws its own, larger samples.png below (and row.json stays JSON).
    (result,) = audit_batch(loaded, [item], config, progress=Progress(), replicas=0)
    row = result.row
    for key, value in row.to_dict().items():
        if key != "config":
            print(f"{key:28s} {printable(format_value(value))}")
    if row.status != "ok":
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if result.invmm_mu is not None:
        target = loaded.adapter.decode_latents(result.z0.unsqueeze(0).to(loaded.adapter.device))[0]
        samples, _ = replica_samples(loaded, result, config, count=args.samples)
        written.append(
            save_image_row([target, *samples], out / "samples.png", scale=max(1, 256 // loaded.adapter.resolution))
        )
    if result.err_uncond is not None:
        title = f"{row.image_id}: W1 = {row.wasserstein:.4g}, shift = {row.wasserstein_shift_sd:.3g} sd"
        written.append(
            save_error_distributions(result.err_uncond, result.err_cond, out / "error_distributions.png", title=title)
        )
    (out / "row.json").write_text(json.dumps(row.to_dict(), indent=2))
    written.append(out / "row.json")
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def print_rows(rows, stream=None, truth: dict[str, str] | None = None) -> None:
    """Rows as an aligned table in the order given; `truth` adds a column."""
    stream = stream or sys.stdout
    columns = [
        "image_id",
        "verdict",
        "stage",
        "screen_progress",
        "uncond_replication_rate",
        "invmm_kl",
        "invmm_similarity",
        "replication_threshold",
        "invmm_prompt_replicated",
        "err_shift_relative",
        "wen_score",
        "unet_forwards",
        "seconds",
    ]
    table = [
        [
            printable(
                format_value(getattr(row, c))
                if row.status == "ok" or c == "image_id"
                else (row.error if c == "verdict" else "")
            )
            for c in columns
        ]
        + ([truth.get(row.image_id, "-")] if truth else [])
        for row in rows
    ]
    columns += ["truth"] if truth else []
    widths = [max(len(c), *(len(r[i]) for r in table)) if table else len(c) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=stream)
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)), file=stream)


class _RenamedFlag(argparse.Action):
    """A flag's former name: still accepted, with one line on stderr naming the flag it is now."""

    def __init__(self, option_strings, dest, *, now: str, **kwargs):
        super().__init__(option_strings, dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)
        self.now = now

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: {option_string} is deprecated, use {self.now} (the same setting)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_pipeline_args(parser: argparse.ArgumentParser) -> None:
    """How an audit is spread over Ray (none of it changes a result); shared with jobs/nightly.py."""
    parser.add_argument("--actors", type=int, default=1, help="auditor actors, each holding one model")
    parser.add_argument(
        "--slots",
        type=int,
        default=4,
        help="images an actor optimises at once in shared UNet calls (size it by GPU memory, docs/throughput.md)",
    )
    parser.add_argument(
        "--queue", type=int, default=4, help="each actor call brings slots x queue images, to keep its slots full"
    )
    parser.add_argument(
        "--screen-slots",
        type=int,
        default=64,
        help="slots in a cascade's stage 1, whose screens keep no optimiser state (size it by GPU memory)",
    )
    parser.add_argument("--batch-size", dest="slots", type=int, action=_RenamedFlag, now="--slots")
    parser.add_argument("--screen-batch-size", dest="screen_slots", type=int, action=_RenamedFlag, now="--screen-slots")
    parser.add_argument("--gpus-per-actor", type=float, help="default: 1 where the cluster has GPUs, else 0")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--retry-errors", action="store_true", help="audit again images whose row is an error")
    parser.add_argument("--rows-per-file", type=int, default=2000, help="catalog rows buffered per Parquet file")
    parser.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    parser.add_argument(
        "--allow-uri-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="let manifests point under PREFIX too (default: only the manifest's own folder or bucket)",
    )


def pipeline_options(args):
    """PipelineOptions from the flags of add_pipeline_args and add_model_args."""
    from memray.distributed.pipeline import PipelineOptions

    return PipelineOptions(
        actors=args.actors,
        slots=args.slots,
        screen_slots=args.screen_slots,
        queue=args.queue,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        device=args.device,
        allow_pickle=args.allow_pickle,
        retry_errors=args.retry_errors,
        rows_per_file=args.rows_per_file,
        allow_uri_prefixes=tuple(args.allow_uri_prefix),
        verbose=args.verbose,
    )


def add_cascade_args(parser: argparse.ArgumentParser) -> None:
    """The cascade's flags (docs/laion.md): screen every image, confirm the flagged and a calibration sample."""
    group = parser.add_argument_group(
        "cascade", "Screen every image cheaply; confirm with the full chain where it matters."
    )
    group.add_argument(
        "--cascade",
        choices=["auto", "on", "off"],
        default="auto",
        help="auto (default): a cascade for 1,000 images or more, or shards; off: the full chain on every image",
    )
    group.add_argument(
        "--calibration-rate",
        type=float,
        default=0.01,
        help="share of cleared images confirmed at random (default 0.01)",
    )
    group.add_argument(
        "--calibration-min", type=int, default=20, help="at least this many of them, in expectation (default 20)"
    )
    group.add_argument("--per-group", action="store_true", help="confirm one flagged image per near-duplicate group")
    group.add_argument(
        "--duplicate-distance", type=int, default=6, help="pHash bits within which images are near-duplicates"
    )
    group.add_argument(
        "--screen-only", action="store_true", help="stop after the screen and the selection (memray confirm later)"
    )


def cascade_options(args):
    """CascadeOptions from the flags of add_cascade_args (a bad value is one line, exit 2)."""
    from memray.cascade.selection import CascadeOptions

    try:
        return CascadeOptions(
            calibration_rate=args.calibration_rate,
            calibration_min=args.calibration_min,
            per_group=args.per_group,
            duplicate_distance=args.duplicate_distance,
        )
    except ValueError as error:
        raise ConfigError(str(error)) from error


def print_cascade(summary, stream=None) -> None:
    """A cascade run's summary lines."""
    for line in summary.lines():
        print(printable(line), file=stream or sys.stdout)


def cmd_audit(args) -> int:
    """Audit every image of the sources on Ray (a local cluster is started on demand) into a catalog."""
    from memray.distributed.pipeline import run_audit, run_cascade, wants_cascade
    from memray.models import adapter_class
    from memray.models.loading import resolve_checkpoint

    config = audit_config(args, adapter_class(resolve_checkpoint(args.model)))
    options = pipeline_options(args)
    cascade = args.cascade == "on" or (args.cascade == "auto" and wants_cascade(args.sources, options))
    how = "a cascade: screen, then confirm" if cascade else "the full chain on every image"
    print(f"auditing {', '.join(args.sources)} with {args.model} into {args.catalog} ({how}; config {config.hash()})")
    if not cascade:
        summary = run_audit(args.sources, args.model, args.catalog, config, options)
        print(json.dumps(dataclasses.asdict(summary)))
        unfinished = summary.unfinished
    else:
        run = run_cascade(
            args.sources, args.model, args.catalog, config, options, cascade_options(args), confirm=not args.screen_only
        )
        print(
            json.dumps(
                {
                    "screen": dataclasses.asdict(run.screen),
                    "confirm": run.confirm and dataclasses.asdict(run.confirm),
                    "selection": run.selection,
                }
            )
        )
        print_cascade(run.summary)
        unfinished = run.unfinished
    if unfinished:
        print(f"memray: {len(unfinished)} images have no row yet; run the same command again", file=sys.stderr)
        return 1
    return 0


def cmd_confirm(args) -> int:
    """Stage 2 of a cascade from the catalog alone: its selection, or more cleared images on request."""
    from memray.distributed.pipeline import run_confirm
    from memray.models import adapter_class
    from memray.models.loading import resolve_checkpoint

    config = audit_config(args, adapter_class(resolve_checkpoint(args.model)))
    stage2, summary = run_confirm(
        args.catalog,
        args.model,
        config,
        pipeline_options(args),
        top=args.top,
        threshold=args.threshold,
        run_id=args.run,
    )
    print(json.dumps(dataclasses.asdict(stage2)))
    print_cascade(summary)
    if stage2.unfinished:
        print(f"memray: {len(stage2.unfinished)} images have no row yet; run the same command again", file=sys.stderr)
        return 1
    return 0


def cmd_query(args) -> int:
    """Run read-only SQL over the catalog's views `audits` and `latest`."""
    from memray.catalog.files import write_parquet
    from memray.catalog.reader import Catalog
    from memray.formatting import format_table

    table = Catalog(args.catalog, must_exist=True).query(args.sql, timeout=args.timeout or None)
    if args.format == "parquet":
        if not args.out:
            raise ConfigError("--format parquet needs --out FILE")
        write_parquet(table, args.out)
        print(f"wrote {table.num_rows} rows to {args.out}", file=sys.stderr)
    else:
        text = format_table(table, args.format, escape=not args.out and sys.stdout.isatty())
        if args.out:
            Path(args.out).write_text(text)
        else:
            print(text)
    return 0


def cmd_status(args) -> int:
    """One screen on a catalog: its models, images, verdicts, failures and the last run."""
    from memray.catalog.cascade import cascade_summary
    from memray.catalog.reader import Catalog
    from memray.catalog.report_queries import catalog_status
    from memray.formatting import format_table

    catalog = Catalog(args.catalog, must_exist=True)
    models, last = catalog_status(catalog)
    print(f"catalog {args.catalog}: {models.num_rows} models")
    print(format_table(models, "table"))
    if last:
        line = (
            f"last run {last['run_id']} ({last['model']}): {last['rows']} rows, {last['errors']} errors, "
            f"{last['started']} .. {last['finished']}"
        )
        print(printable(line))
    for model in models.column("model").to_pylist():
        summary = cascade_summary(catalog, model=model)
        if summary is not None:
            print_cascade(summary)
    for problem in catalog.ignored:
        print(f"ignored: {printable(problem)}")
    if args.gc:
        from memray.distributed.bookkeeping import sweep_finished_runs

        for folder in sweep_finished_runs(args.catalog):
            print(f"removed: {printable(folder)} (the bookkeeping of a run that is over)")
    return 0


def cmd_migrate(args) -> int:
    """Rewrite a catalog's files of older schema versions in the current one."""
    from memray.catalog.schema import SCHEMA_VERSION
    from memray.catalog.writer import migrate_catalog

    migrated = migrate_catalog(args.catalog)
    print(f"migrated {len(migrated)} files to schema version {SCHEMA_VERSION}", file=sys.stderr)
    return 0


def cmd_demo(args) -> int:
    """The main job on the embedded default: the demo model with planted memorization, on its demo images,
    as a cascade: every image screened, the flagged ones and a calibration sample confirmed."""
    from memray.cascade.selection import CascadeOptions
    from memray.catalog.reader import Catalog
    from memray.catalog.report_queries import run_rows
    from memray.catalog.schema import AuditRow
    from memray.demo import demo_audit_config, write_demo_sample
    from memray.distributed.pipeline import PipelineOptions, run_cascade

    out = Path(args.out)
    manifest, truth = write_demo_sample(out / "demo-images", None if args.all else args.per_group)
    config = load_config(args.config or demo_audit_config())
    catalog = str(out / "catalog")
    options = PipelineOptions(cpus_per_actor=1, verbose=args.verbose)
    cascade = CascadeOptions(calibration_min=args.calibration_min)
    run = run_cascade([str(manifest)], "demo", catalog, config, options, cascade)
    rows = run_rows(Catalog(catalog), run.screen.run_id, *([run.confirm.run_id] if run.confirm else []))
    print_rows([AuditRow(**row) for row in rows], truth=truth)
    print_cascade(run.summary)
    print(f'catalog: {catalog}  (memray query {catalog} "SELECT * FROM latest")', file=sys.stderr)
    print(f"report: memray report {catalog} --out {out / 'report.html'}", file=sys.stderr)
    return 0 if not run.unfinished else 1


def cmd_config(args) -> int:
    """Print the effective configuration as JSON with its hash."""
    config = load_config(args.config) if args.config else preset_config(args.preset)
    print(json.dumps({"config_hash": config.hash(), **config.to_dict()}, indent=2))
    return 0


def _off_or(cast):
    """argparse type: a non-negative `cast` value, or `off` (None) to switch the check off."""

    def parse(text: str):
        if text.lower() == "off":
            return None
        value = cast(text)
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be a non-negative number or 'off', got {text!r}")
        return value

    parse.__name__ = cast.__name__  # argparse names the type in its error messages
    return parse


def add_policy_args(parser: argparse.ArgumentParser) -> None:
    """The ComparePolicy flags, shared by `memray compare` and jobs/nightly.py (every one takes `off`)."""
    from memray.catalog.policy import ComparePolicy

    default = ComparePolicy()
    group = parser.add_argument_group("policy (exit code 1 when violated)", "Every limit and threshold takes `off`.")
    limit, threshold = _off_or(int), _off_or(float)
    flags = [  # (field of ComparePolicy, type, metavar, what it bounds)
        ("max_newly_memorized", limit, "N", "images whose verdict became memorized"),
        (
            "max_newly_replicated",
            limit,
            "N",
            "images InvMM replicates under the new model but never did under the base",
        ),
        ("max_kl_regressions", limit, "N", "images whose InvMM KL fell beyond --kl-drop / --kl-drop-rel"),
        ("max_shift_regressions", limit, "N", "images whose Wasserstein shift rose beyond --shift-rise"),
        ("max_newly_uncond_replicated", limit, "N", "images newly replicated from the empty prompt"),
        ("max_missing", limit, "N", "images audited ok under the base model but not under the new one"),
        ("kl_drop", threshold, "X", "absolute fall of invmm_kl"),
        ("kl_drop_rel", threshold, "F", "fall of invmm_kl as a fraction of the base KL"),
        ("shift_rise", threshold, "SD", "rise of wasserstein_shift_sd in sd"),
    ]
    for field, kind, metavar, what in flags:
        value = getattr(default, field)
        shown = "off" if value is None else value
        group.add_argument(
            "--" + field.replace("_", "-"), type=kind, default=value, metavar=metavar, help=f"{what} (default: {shown})"
        )


def policy_from_args(args):
    """The ComparePolicy of the flags added by add_policy_args."""
    from memray.catalog.policy import ComparePolicy

    return ComparePolicy(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ComparePolicy)})


def cmd_compare(args) -> int:
    """Compare two audited models image by image; exit code 1 when the policy is violated."""
    from memray.catalog.compare import compare_models
    from memray.catalog.reader import Catalog

    comparison = compare_models(Catalog(args.catalog, must_exist=True), args.base, args.new, policy_from_args(args))
    if args.out:
        Path(args.out).write_text(comparison.to_json())
    print(comparison.to_json() if args.format == "json" else comparison.to_text(limit=args.limit))
    return 1 if comparison.violations else 0


def cmd_report(args) -> int:
    """Write the HTML report of a catalog."""
    from memray.catalog.reader import Catalog
    from memray.report.html import write_report

    Catalog(args.catalog, must_exist=True)  # a mistyped catalog is an error, not an empty report

    out = write_report(
        args.catalog, args.out, base=args.base, new=args.model, top=args.top, policy=policy_from_args(args)
    )
    print(f"wrote {out}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    """Entry point of the `memray` command."""
    parser = argparse.ArgumentParser(
        prog="memray", description="Audit diffusion checkpoints for memorized training images."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="every measure for one image, with figures")
    p.add_argument("image")
    p.add_argument("--caption", help="the image's caption (enables the prompt-based screen)")
    p.add_argument(
        "--out", default="memray-out/inspect", help="folder for samples.png, error_distributions.png, row.json"
    )
    p.add_argument("--samples", type=int, default=4, help="replicas to generate from the InvMM distribution")
    add_model_args(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("audit", help="audit image sources on Ray into a Parquet catalog (resumable)")
    p.add_argument(
        "sources", nargs="+", help="folders, globs, image files, shards ({00000..00099}.tar), parquet, manifests"
    )
    p.add_argument("--catalog", required=True, help="catalog folder or URL (s3://bucket/memray-catalog)")
    add_pipeline_args(p)
    add_cascade_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "confirm", help="stage 2 of a cascade from the catalog: its selection, or the most suspicious cleared images"
    )
    p.add_argument("catalog")
    p.add_argument("--top", type=int, help="also confirm the N cleared images closest to their bar")
    p.add_argument("--threshold", type=float, help="also confirm the cleared images at this screen progress or above")
    p.add_argument("--run", help="the cascade run (default: the model's newest)")
    add_pipeline_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_confirm)

    p = sub.add_parser("query", help="read-only SQL over a catalog (views: audits, latest, selections, cascade)")
    p.add_argument("catalog")
    p.add_argument("sql")
    p.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    p.add_argument("--out", help="write to this file instead of standard output")
    p.add_argument("--timeout", type=float, default=300, help="stop a query after this many seconds (0: no limit)")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("demo", help="the main job on the embedded demo model and images")
    p.add_argument("--out", default="memray-out", help="where the demo images and the catalog go")
    p.add_argument(
        "--per-group", type=int, default=1, help="images from each group (every planted level, normal, held-out, hard)"
    )
    p.add_argument("--all", action="store_true", help="the whole demo set")
    p.add_argument("--config", help="an audit configuration instead of the demo's (memray/demo_assets/audit.toml)")
    p.add_argument(
        "--calibration-min", type=int, default=2, help="cleared images confirmed at random to state the recall"
    )
    p.add_argument("--verbose", action="store_true", help="show Ray's own logs and progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("status", help="one screen on a catalog: models, images, verdicts, failures, last run")
    p.add_argument("catalog")
    p.add_argument(
        "--gc", action="store_true", help="remove the bookkeeping (_runs/, _inflight/) of runs that are over"
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("migrate", help="rewrite a catalog's older files in the current schema version")
    p.add_argument("catalog")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser("config", help="print the effective configuration and its hash")
    p.add_argument("--config")
    p.add_argument("--preset", choices=PRESETS, default="default")
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("compare", help="per-image changes between two audited models; exit 1 on regressions")
    p.add_argument("catalog")
    p.add_argument("--base", required=True, help="model slug audited before (the `model` column)")
    p.add_argument("--new", required=True, help="model slug to judge against it")
    p.add_argument("--format", choices=["table", "json"], default="table")
    p.add_argument("--out", help="also write the comparison as JSON to this file")
    p.add_argument("--limit", type=_off_or(int), default=20, help="rows of the per-image table (default 20; off: all)")
    add_policy_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="a self-contained HTML report of a catalog")
    p.add_argument("catalog")
    p.add_argument("--out", default="report.html", help="HTML file to write: local path or URL (default report.html)")
    p.add_argument("--model", help="model slug whose images are ranked and compared (default: the newest)")
    p.add_argument("--base", help="model slug to compare with (default: the one audited before --model)")
    p.add_argument("--top", type=int, default=10, help="most memorized images shown (default 10)")
    add_policy_args(p)
    p.set_defaults(func=cmd_report)

    args = parser.parse_args(argv)
    log_to_stderr()
    return run_command("memray", lambda: args.func(args))


def run_command(prog: str, command) -> int:
    """`command()`'s exit code, with a user's fault (USAGE_ERRORS, object storage without credentials) as
    one line on stderr and exit code 2, and Ctrl-C or SIGTERM (Terminated) as one line and 130 or 143."""
    try:
        return command()
    except USAGE_ERRORS as exc:
        print(f"{prog}: {printable(str(exc), keep_newlines=True)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        name, code = ("SIGTERM", 143) if isinstance(stop, Terminated) else ("Ctrl-C", 130)
        print(
            f"{prog}: stopped by {name} (an audit keeps the rows written so far: the same command resumes)",
            file=sys.stderr,
        )
        return code
    except Exception as exc:
        if not is_storage_access_error(exc):
            raise
        print(f"{prog}: cannot access object storage: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
