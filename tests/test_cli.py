"""The command line end to end on the tiny model: inspect, audit a folder, config, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import duckdb
from conftest import png_bytes
from PIL import Image

from memray.catalog.schema import COLUMNS
from memray.cli import main

SMALL = (
    "invmm.steps=20",
    "invmm.check_every=10",
    "noise_inversion.steps=5",
    "noise_inversion.regularized_steps=5",
    "prompt_inversion.steps=5",
    "wasserstein.noises=8",
    "hard_prompt.restarts=1",
)
QUICK = ["--preset", "quick", *(arg for setting in SMALL for arg in ("--set", setting))]


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
    assert "InvMM: 20/20" in printed.err  # progress of the long optimisations
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


def test_audit_a_folder_writes_a_duckdb_readable_parquet(tiny_ddpm_dir, tmp_path, capsys):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(png_bytes(2, size=(20, 20)))
    (folder / "sub" / "b.png").write_bytes(png_bytes(3, size=(24, 20)))
    (folder / "sub" / "c.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("ignored")
    out = tmp_path / "rows.parquet"
    assert main(["audit", str(folder), "--model", str(tiny_ddpm_dir), "--out", str(out), *QUICK]) == 0
    rows = duckdb.sql(f"SELECT image_id, status, verdict, invmm_steps FROM '{out}' ORDER BY image_id").fetchall()
    assert [r[:2] for r in rows] == [("a.png", "ok"), ("b.png", "ok"), ("c.jpg", "error")]
    assert rows[0][2] in ("memorized", "not_memorized", "inconclusive")
    assert tuple(duckdb.sql(f"SELECT * FROM '{out}'").columns) == COLUMNS
    assert "a.png" in capsys.readouterr().out  # the ranked table


def test_bad_configuration_exits_2_with_the_reason(tiny_ddpm_dir, tmp_path, capsys):
    code = main(["audit", str(tmp_path), "--model", str(tiny_ddpm_dir), "--set", "invmm.steps=-1"])
    assert code == 2
    assert "invmm.steps: must be > 0" in capsys.readouterr().err


def test_console_script_prints_the_config_and_its_hash():
    result = subprocess.run(
        [sys.executable, "-m", "memray.cli", "config", "--preset", "quick"], capture_output=True, text=True, check=True
    )
    printed = json.loads(result.stdout)
    from memray.config import quick_config

    assert printed["config_hash"] == quick_config().hash()
    assert printed["invmm"]["steps"] == quick_config().invmm.steps


def test_demo_runs_the_chain_on_the_built_in_model_and_writes_its_rows(tmp_path, capsys):
    out = tmp_path / "demo.parquet"
    assert main(["demo", "--cache", str(tmp_path / "model"), "--out", str(out)]) == 0
    ranked = capsys.readouterr().out.splitlines()
    assert ranked[0].split()[:2] == ["image_id", "verdict"] and len(ranked) == 7
    (counts,) = duckdb.sql(f"SELECT count(*), count(DISTINCT image_id), min(status) FROM '{out}'").fetchall()
    assert counts == (6, 6, "ok")
