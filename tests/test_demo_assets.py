"""The shipped demo model and demo set (memray/demo_assets): what they are, and `memray demo` on them."""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np
import pytest
from PIL import Image

from memray.catalog.reader import Catalog
from memray.cli import main
from memray.demo import DEMO_ASSETS, demo_group, read_demo_manifest, trained_demo_manifest, trained_demo_model
from memray.evaluation import demo_training

MANIFEST = read_demo_manifest(trained_demo_manifest())
TRAIN_LOG = json.loads((DEMO_ASSETS / "train_log.json").read_text())


def _trained() -> dict[str, dict]:
    with gzip.open(DEMO_ASSETS / "train_index.jsonl.gz", "rt") as index:
        return {row["id"]: row for row in map(json.loads, index)}


def test_the_shipped_model_is_small_safetensors_in_the_stable_diffusion_layout():
    from memray.models import load_model

    files = [p for p in trained_demo_model().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assets = [p for p in DEMO_ASSETS.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in assets) <= 30 * 2**20  # model, demo images, index and log together
    assert {p.suffix for p in files if p.stat().st_size > 2**20} == {".safetensors"}  # weights: safetensors only
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    loaded = load_model("demo", device="cpu")
    assert type(loaded.adapter).__name__ == "StableDiffusionAdapter"
    assert loaded.adapter.latent_shape == (4, 8, 8)


def test_every_group_is_in_the_demo_set_with_its_training_count_and_graded_truth():
    args = TRAIN_LOG["args"]
    groups = [demo_group(record) for record in MANIFEST]
    for level in args["levels"]:
        assert groups.count(f"planted x{level}") == args["planted_per_level"]
    assert groups.count(f"planted x{args['uncond_copies']}") == 1  # the image trained without a caption
    assert groups.count("held-out") == args["heldout"]
    assert groups.count("normal") == args["demo_normal"]
    trained = _trained()
    for record in MANIFEST:
        assert 0 <= record["truth_caption_rate"] <= 1 and 0 <= record["truth_uncond_rate"] <= 1
        if record["split"] in ("heldout", "hard"):
            assert record["id"] not in trained and record["duplicates"] == 0
        else:
            assert trained[record["id"]]["copies"] == record["duplicates"]
            assert trained[record["id"]]["caption"] == record["caption"]
    assert sum(row["split"] == "normal" for row in trained.values()) == TRAIN_LOG["data"]["distinct_normal"]


def test_the_demo_images_are_the_plans_images_for_the_training_arguments():
    trained, never = demo_training.build_plan(argparse.Namespace(**TRAIN_LOG["args"]))
    items = {item.id: item for item in demo_training.demo_set(trained, never, TRAIN_LOG["args"]["demo_normal"])}
    assert sorted(items) == sorted(record["id"] for record in MANIFEST)
    for record in MANIFEST:
        expected = items[record["id"]].image(TRAIN_LOG["args"]["resolution"])
        shipped = Image.open(trained_demo_manifest().parent / record["uri"])
        assert np.array_equal(np.asarray(shipped), np.asarray(expected)), record["id"]
        assert items[record["id"]].caption_kind == record["caption_kind"]


@pytest.mark.slow
def test_memray_demo_audits_a_sample_of_every_group_and_prints_the_truth_next_to_the_verdict(tmp_path, capsys):
    config = tmp_path / "fast.toml"
    config.write_text('preset = "quick"\nmeasures = ["z0_error", "invmm", "uncond_replication"]\n')
    assert main(["demo", "--out", str(tmp_path / "out"), "--per-group", "1", "--config", str(config)]) == 0
    printed = capsys.readouterr().out.splitlines()
    groups = sorted({demo_group(record) for record in MANIFEST})
    start = next(i for i, line in enumerate(printed) if line.split()[:2] == ["image_id", "verdict"])
    header, rows, summary = (
        printed[start],
        printed[start + 1 : start + 1 + len(groups)],
        printed[start + 1 + len(groups) :],
    )
    assert header.split()[-1] == "truth" and "stage" in header.split()
    assert sorted(next(g for g in groups if f" {g} (" in row) for row in rows) == groups
    assert all("caption " in row and "empty " in row for row in rows)  # the graded truth
    assert any("cascade run" in line for line in summary) and any("screen recall" in line for line in summary)
    (counts,) = (
        Catalog(str(tmp_path / "out" / "catalog"))
        .query(
            "SELECT count(*) AS n, count(DISTINCT image_id) AS ids, min(status) AS status,"
            " count(*) FILTER (WHERE stage = 'confirm') AS confirmed FROM audits"
        )
        .to_pylist()
    )
    # every image screened once, and those the cascade chose (at least the calibration minimum) confirmed once
    assert counts == {
        "n": len(groups) + counts["confirmed"],
        "ids": len(groups),
        "status": "ok",
        "confirmed": counts["confirmed"],
    }
    assert counts["confirmed"] >= 2
