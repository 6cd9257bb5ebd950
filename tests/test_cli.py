"""The command line end to end on the tiny model: inspect, audit a folder, config (demo: test_demo_assets.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
from conftest import png_bytes, tiny_flags
from PIL import Image

from memray.catalog.schema import AuditRow
from memray.catalog.writer import CatalogWriter
from memray.cli import main

QUICK = tiny_flags()


def test_inspect_prints_every_measure_and_writes_figures(tiny_sd_dir, tmp_path, capsys):
    image = tmp_path / "target.png"
    image.write_bytes(png_bytes(1, size=(40, 40)))
    out = tmp_path / "inspect"
    code = main(
        [
            "inspect",
            str(image),
            "--model",
            str(tiny_sd_dir),
            "--caption",
            "a red circle",
            "--out",
            str(out),
            "--samples",
            "2",
            *QUICK,
        ]
    )
    assert code == 0
    printed = capsys.readouterr()
    for field in ("invmm_kl", "wasserstein", "noise_ks_p", "z0_error", "wen_score", "verdict", "unet_forwards"):
        assert field in printed.out
    assert "InvMM: 4/4" in printed.err  # progress of the long optimisations
    with Image.open(out / "samples.png") as samples:
        assert samples.width > samples.height  # target + 2 replicas side by side
    with Image.open(out / "error_distributions.png") as plot:
        assert plot.size[0] > 300
    row = json.loads((out / "row.json").read_text())
    assert row["status"] == "ok" and row["caption"] == "a red circle" and row["unet_forwards"] > 0


def test_inspect_of_an_unreadable_image_exits_non_zero(tiny_sd_dir, tmp_path, capsys):
    image = tmp_path / "broken.jpg"
    image.write_bytes(b"")
    assert main(["inspect", str(image), "--model", str(tiny_sd_dir), *QUICK]) == 1
    assert "empty" in capsys.readouterr().out


def test_query_prints_tables_csv_json_and_writes_parquet(tmp_path, capsys):
    catalog = tmp_path / "catalog"
    with CatalogWriter(str(catalog)) as writer:
        writer.add([AuditRow(image_id=f"i{k}", model="m", model_fingerprint="f", config_hash="c", run_id="r",
                             audited_at="2026-11-22T00:00:00+00:00", invmm_kl=0.1 * k) for k in range(3)])  # fmt: skip
    sql = "SELECT image_id, invmm_kl FROM latest ORDER BY invmm_kl DESC"
    assert main(["query", str(catalog), sql]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "i2"  # header, rule, first row
    assert main(["query", str(catalog), sql, "--format", "json"]) == 0
    assert [r["image_id"] for r in json.loads(capsys.readouterr().out)] == ["i2", "i1", "i0"]
    assert main(["query", str(catalog), sql, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "image_id,invmm_kl"
    out = tmp_path / "top.parquet"
    assert main(["query", str(catalog), sql, "--format", "parquet", "--out", str(out)]) == 0
    assert duckdb.sql(f"SELECT count(*) FROM '{out}'").fetchall() == [(3,)]


def test_query_refuses_writes_with_exit_code_2(tmp_path, capsys):
    code = main(["query", str(tmp_path / "catalog"), f"COPY (SELECT 1) TO '{tmp_path / 'x.csv'}'"])
    assert code == 2 and not (tmp_path / "x.csv").exists()
    assert "memray:" in capsys.readouterr().err


def test_bad_configuration_exits_2_with_the_reason(tiny_ddpm_dir, tmp_path, capsys):
    code = main(
        [
            "audit",
            str(tmp_path),
            "--model",
            str(tiny_ddpm_dir),
            "--catalog",
            str(tmp_path / "c"),
            "--set",
            "invmm.steps=-1",
        ]
    )
    assert code == 2
    assert "invmm.steps: must be > 0" in capsys.readouterr().err


def test_console_script_prints_the_config_and_its_hash():
    result = subprocess.run(
        [sys.executable, "-m", "memray.cli", "config", "--preset", "quick"], capture_output=True, text=True, check=True
    )
    printed = json.loads(result.stdout)
    from memray.config import preset_config

    assert printed["config_hash"] == preset_config("quick").hash()
    assert printed["invmm"]["steps"] == preset_config("quick").invmm.steps


def test_the_command_line_starts_without_torch():
    probe = "import sys, memray.cli, memray.catalog.reader; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"  # --help, query, status, compare, report: no torch


def test_status_shows_models_verdicts_failures_and_the_last_run(tmp_path, capsys):
    with CatalogWriter(tmp_path / "c") as writer:
        writer.add(
            [
                AuditRow(image_id="a", model="m-1", run_id="r1", audited_at="2026-11-01", verdict="memorized"),
                AuditRow(image_id="b", model="m-1", run_id="r1", audited_at="2026-11-01", verdict="not_memorized"),
                AuditRow(image_id="c", model="m-1", run_id="r1", audited_at="2026-11-01", status="error", error="x"),
            ]
        )
    assert main(["status", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    header, _, row = out.splitlines()[1:4]
    values = dict(zip(header.split(), row.split()))
    assert values["model"] == "m-1" and values["images"] == "2" and values["memorized"] == "1"
    assert values["not_memorized"] == "1" and values["failed"] == "1" and values["runs"] == "1"
    assert "last run r1 (m-1): 3 rows, 1 errors" in out


def test_model_demo_names_the_shipped_demo_model():
    from memray.demo import trained_demo_model
    from memray.models.loading import resolve_checkpoint

    assert resolve_checkpoint("demo") == trained_demo_model()
