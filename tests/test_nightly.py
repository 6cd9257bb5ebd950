"""The nightly job (memray.nightly, jobs/nightly.py) end to end: tiny checkpoints under a prefix, a real local Ray,
a real catalog."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from conftest import png_bytes
from test_distributed import SMALL_FLAGS

from memray import nightly
from memray.catalog.reader import Catalog
from memray.models.tiny import build_tiny_sd

pytest_plugins = ["s3server"]
REPO = Path(__file__).resolve().parent.parent
# The similarity threshold decides InvMM's success check: never met, or met at the first check.
NEVER_REPLICATED = [*SMALL_FLAGS, "--set", "similarity.threshold=1.0"]  # only an exact copy
ALWAYS_REPLICATED = [*SMALL_FLAGS, "--set", "similarity.threshold=1e-9", "--set", "similarity.nulls=false"]


def make_prefix(fs, root: str, names: list[str]) -> None:
    """Folders under `root`; those named ckpt-* hold a model_index.json."""
    for name in names:
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        fs.pipe_file(f"{root}/{name}/{'model_index.json' if name.startswith('ckpt') else 'notes.txt'}", b"{}")


def test_newest_checkpoint_is_last_by_name_among_checkpoint_folders(tmp_path):
    make_prefix(fsspec.filesystem("file"), str(tmp_path), ["ckpt-009", "ckpt-010", "ckpt-002", "zz-notes"])
    assert nightly.newest_checkpoint(str(tmp_path)) == f"{tmp_path}/ckpt-010"
    assert nightly.newest_checkpoint(f"{tmp_path}/") == f"{tmp_path}/ckpt-010"


def test_newest_checkpoint_in_object_storage(s3_bucket):
    make_prefix(fsspec.filesystem("s3"), f"{s3_bucket}/ckpts", ["ckpt-001", "ckpt-002", "zz-notes"])
    assert nightly.newest_checkpoint(f"s3://{s3_bucket}/ckpts") == f"s3://{s3_bucket}/ckpts/ckpt-002"


def test_no_checkpoint_under_the_prefix_is_a_usage_error(tmp_path, capsys):
    make_prefix(fsspec.filesystem("file"), str(tmp_path / "prefix"), ["notes"])
    argv = ["--checkpoints-prefix", str(tmp_path / "prefix"), "--protected", str(tmp_path)]
    assert nightly.main([*argv, "--catalog", str(tmp_path / "catalog"), "--report", str(tmp_path / "r.html")]) == 2
    assert "no checkpoint folder" in capsys.readouterr().err


@pytest.mark.slow
def test_nightly_audits_the_newest_checkpoint_compares_and_gates(local_ray, tmp_path, capsys):
    prefix, protected, catalog = tmp_path / "ckpts", tmp_path / "protected", tmp_path / "catalog"
    protected.mkdir()
    for i in range(2):
        (protected / f"img{i}.png").write_bytes(png_bytes(70 + i))
    build_tiny_sd(prefix / "ckpt-001", seed=1)
    report = tmp_path / "reports" / "nightly.html"
    job = ["--protected", str(protected), "--catalog", str(catalog), "--report", str(report), "--cpus-per-actor", "0.5"]

    def run(*extra):
        code = nightly.main([*job, *extra])
        return code, json.loads(report.with_suffix(".json").read_text()), capsys.readouterr().out

    # The first night: nothing audited before, nothing to compare.
    code, summary, out = run("--checkpoints-prefix", str(prefix), *NEVER_REPLICATED)
    assert code == 0 and "nothing to compare" in out
    first = summary["model"]  # the folder name, then the weights' fingerprint: ckpt-001-<8 hex digits>
    assert first.startswith("ckpt-001-") and len(first) == len("ckpt-001-") + 8
    assert (summary["base"], summary["audit"]["rows"]) == (None, 2)
    assert report.read_text().startswith("<!DOCTYPE html>")

    # The next night: a newer checkpoint, compared with the first; no regression.
    build_tiny_sd(prefix / "ckpt-002", seed=2)
    code, summary, out = run("--checkpoints-prefix", str(prefix), *NEVER_REPLICATED)
    assert code == 0 and "policy: passed" in out
    assert summary["model"].startswith("ckpt-002-")
    assert (summary["base"], summary["audit"]["rows"]) == (first, 2)
    assert summary["passed"] and summary["comparison"]["counts"]["compared"] == 2

    # The same night again: resume leaves nothing to audit, and the verdict stands.
    code, again, _ = run("--checkpoints-prefix", str(prefix), *NEVER_REPLICATED)
    assert code == 0 and (again["audit"]["rows"], again["audit"]["skipped"]) == (0, 2)
    assert again["comparison"]["counts"] == summary["comparison"]["counts"]

    # A config under which InvMM replicates every image at once: newly memorized, the gate fails.
    command = [sys.executable, str(REPO / "jobs" / "nightly.py"), *job, "--checkpoint", str(prefix / "ckpt-002")]
    result = subprocess.run([*command, *ALWAYS_REPLICATED], capture_output=True, text=True, timeout=600)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "VIOLATION: 2 images newly memorized" in result.stdout
    failed = json.loads(report.with_suffix(".json").read_text())
    assert not failed["passed"] and failed["comparison"]["counts"]["newly_replicated"] == 2
    assert "different configs" in failed["comparison"]["warnings"][0]
    models = Catalog(catalog).query("SELECT DISTINCT model FROM audits ORDER BY model").column("model").to_pylist()
    assert models == [first, summary["model"]]
