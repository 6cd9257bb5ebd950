"""The nightly release gate: audit a checkpoint on the protected set, compare it with the model
audited before it, write a report, and exit 1 when the comparison violates the policy.

    ray job submit --working-dir . -- python jobs/nightly.py \
        --checkpoints-prefix s3://bucket/checkpoints --protected 's3://bucket/protected/{00000..00009}.tar' \
        --catalog s3://bucket/memray-catalog --report /reports/nightly.html

Which checkpoint: `--checkpoint PATH_OR_URL`, or with `--checkpoints-prefix` the folder directly
under the prefix that holds a model_index.json and comes last by name, so checkpoint folders
must be named in the order they are made (ckpt-000123, 2026-11-02, ...: zero-padded).
The catalog names a model by its slug, the checkpoint folder's name and its weights' fingerprint
(ckpt-000123-3f2a9c1d); the checkpoint compared with is the model audited before this one.

A second run the same night does no new work: the audit resumes (every image already has a row
for this checkpoint's fingerprint and the config), and the comparison, report and JSON summary
are written again. Exit codes: 0 passed or nothing to compare yet, 1 policy violated or images
left without a row (a batch failed past its retries), 2 bad arguments or inputs. The audit
configuration takes the flags of `memray audit` (--preset, --set, --config, --sscd, --seed,
--device, --precision, --allow-pickle).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import posixpath

from memray.catalog.compare import Comparison, compare_models, previous_model
from memray.catalog.files import open_fs, write_bytes
from memray.catalog.reader import Catalog
from memray.cli import (
    add_model_args,
    add_pipeline_args,
    add_policy_args,
    audit_config,
    pipeline_options,
    policy_from_args,
    run_command,
)
from memray.distributed.pipeline import run_audit
from memray.models import adapter_class
from memray.models.loading import MODEL_INDEX, CheckpointError, resolve_checkpoint
from memray.report.html import write_report


def newest_checkpoint(prefix: str) -> str:
    """The folder directly under `prefix` (a path or fsspec URL) holding a model_index.json, last by name."""
    fs, root = open_fs(prefix)
    indexes = fs.glob(f"{root}/*/{MODEL_INDEX}")
    if not indexes:
        raise CheckpointError(f"no checkpoint folder (one holding {MODEL_INDEX}) directly under {prefix!r}")
    names = [posixpath.basename(posixpath.dirname(index)) for index in indexes]
    return f"{prefix.rstrip('/')}/{max(names)}"


def parse_args(argv) -> tuple[argparse.Namespace, list[str]]:
    """The job's own flags, and the rest: the audit configuration flags of `memray audit`."""
    parser = argparse.ArgumentParser(
        prog="jobs/nightly.py",
        description=__doc__.split("\n\n")[0],
        epilog="Audit configuration: --preset, --set, --config, --sscd, --seed, --device, --precision, "
        "--allow-pickle, as for `memray audit`.",
        allow_abbrev=False,  # the audit flags pass through: no abbreviation may swallow one
    )
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="the checkpoint to audit: local directory or fsspec URL")
    which.add_argument("--checkpoints-prefix", help="audit the checkpoint folder under this one that is last by name")
    parser.add_argument("--protected", nargs="+", required=True, metavar="SOURCE", help="image sources to protect")
    parser.add_argument("--catalog", required=True, help="catalog folder or URL")
    parser.add_argument("--report", required=True, help="HTML report to write")
    parser.add_argument("--summary", help="JSON summary to write (default: the report's path with .json)")
    add_pipeline_args(parser)
    add_policy_args(parser)
    return parser.parse_known_args(argv)


def parse_audit_args(audit_argv: list[str], checkpoint: str) -> argparse.Namespace:
    """The audit configuration flags, parsed as `memray audit` parses them."""
    parser = argparse.ArgumentParser(prog="jobs/nightly.py", allow_abbrev=False)
    add_model_args(parser)
    return parser.parse_args([*audit_argv, "--model", checkpoint])


def audit(args, audit_argv: list[str], checkpoint: str):
    """Audit the protected set with the checkpoint (resuming); returns (AuditSummary, config hash)."""
    audit_args = parse_audit_args(audit_argv, checkpoint)
    config = audit_config(audit_args, adapter_class(resolve_checkpoint(checkpoint)))
    options = pipeline_options(argparse.Namespace(**vars(args), **vars(audit_args)))
    print(f"nightly: auditing {', '.join(args.protected)} with {checkpoint} (config {config.hash()})", flush=True)
    return run_audit(args.protected, checkpoint, args.catalog, config, options), config.hash()


def write_summary(url: str, summary: dict) -> None:
    """The run's outcome as indented JSON, to a local path or fsspec URL."""
    write_bytes(url, json.dumps(summary, indent=2, allow_nan=False).encode())


def nightly(args, audit_argv: list[str]) -> int:
    """Audit, compare with the previous model, report; the exit code."""
    checkpoint = args.checkpoint or newest_checkpoint(args.checkpoints_prefix)
    summary, config_hash = audit(args, audit_argv, checkpoint)
    model = summary.model
    catalog = Catalog(args.catalog)
    base = previous_model(catalog, model)
    comparison: Comparison | None = None
    if base is not None:
        comparison = compare_models(catalog, base, model, policy_from_args(args))
    report = write_report(args.catalog, args.report, base=base, new=model, comparison=comparison)
    # An audit that left images without a row cannot clear a release, whatever the comparison says.
    passed = not summary.unfinished and (comparison is None or not comparison.violations)
    out = args.summary or f"{os.path.splitext(args.report)[0]}.json"  # a URL too: no Path
    write_summary(
        out,
        {
            "checkpoint": checkpoint,
            "model": model,
            "config_hash": config_hash,
            "audit": dataclasses.asdict(summary),
            "base": base,
            "passed": passed,
            "comparison": comparison.to_dict() if comparison else None,
            "report": str(report),
        },
    )
    if comparison is None:
        print(f"nightly: {model} is the first model in {args.catalog}: nothing to compare it with")
    else:
        print(comparison.to_text())
    if summary.unfinished:
        print(f"nightly: {len(summary.unfinished)} images have no row yet (their batch failed): not passed; rerun")
    print(f"nightly: wrote {report} and {out}")
    return 0 if passed else 1


def main(argv=None) -> int:
    """Entry point: `python jobs/nightly.py ...`."""
    args, audit_argv = parse_args(argv)
    return run_command("nightly", lambda: nightly(args, audit_argv))
