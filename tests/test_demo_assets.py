"""The shipped demo model and demo set (memray/demo_assets): what they are, and `memray demo` on them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from memray.catalog.reader import Catalog
from memray.cli import main
from memray.demo import (
    DEMO_ASSETS,
    demo_group,
    generated_scene,
    read_demo_manifest,
    render_scene,
    trained_demo_manifest,
    trained_demo_model,
)

MANIFEST = read_demo_manifest(trained_demo_manifest())
TRAIN_LOG = json.loads((DEMO_ASSETS / "train_log.json").read_text())
TRAINED = {row["id"]: row for row in map(json.loads, (DEMO_ASSETS / "train_index.jsonl").read_text().splitlines())}


def test_the_shipped_model_is_small_safetensors_in_the_stable_diffusion_layout():
    from memray.models import load_model

    files = [p for p in trained_demo_model().rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 25 * 2**20
    assert {p.suffix for p in files if p.stat().st_size > 2**20} == {".safetensors"}  # weights: safetensors only
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".ckpt", ".pkl")]
    loaded = load_model(str(trained_demo_model()), device="cpu")
    assert type(loaded.adapter).__name__ == "StableDiffusionAdapter"
    assert loaded.adapter.latent_shape == (4, 8, 8)


def test_every_split_and_level_is_in_the_demo_set_with_its_training_count():
    args = TRAIN_LOG["args"]
    groups = [demo_group(record) for record in MANIFEST]
    for level in args["levels"]:
        assert groups.count(f"planted x{level}") == args["planted_per_level"]
    assert groups.count("held-out") == args["heldout"]
    assert groups.count("normal") > 0
    for record in MANIFEST:
        if record["split"] == "heldout":
            assert record["id"] not in TRAINED and record["duplicates"] == 0
        else:
            assert TRAINED[record["id"]]["duplicates"] == record["duplicates"]
            assert TRAINED[record["id"]]["caption"] == record["caption"]
    assert sum(row["split"] == "normal" for row in TRAINED.values()) == args["normal"]


def test_the_demo_images_are_the_generators_scenes_for_the_training_seed():
    seed = TRAIN_LOG["args"]["seed"]
    for record in MANIFEST:
        stream, index = record["split"], int(record["id"].rsplit("-", 1)[1])
        expected = render_scene(generated_scene(seed, stream, index), TRAIN_LOG["args"]["resolution"])
        shipped = Image.open(trained_demo_manifest().parent / record["uri"])
        assert np.array_equal(np.asarray(shipped), np.asarray(expected)), record["id"]


@pytest.mark.slow
def test_memray_demo_audits_a_sample_of_every_group_and_prints_the_truth_next_to_the_verdict(tmp_path, capsys):
    config = tmp_path / "fast.toml"
    config.write_text('preset = "quick"\nmeasures = ["z0_error", "invmm"]\n')
    assert main(["demo", "--out", str(tmp_path / "out"), "--per-group", "1", "--config", str(config)]) == 0
    printed = capsys.readouterr().out.splitlines()
    groups = ["held-out", "normal"] + [f"planted x{level}" for level in TRAIN_LOG["args"]["levels"]]
    header, *rows = printed[-len(groups) - 1 :]
    assert header.split()[:2] == ["image_id", "verdict"] and header.split()[-1] == "truth"
    assert sorted(next(g for g in groups if row.rstrip().endswith(" " + g)) for row in rows) == sorted(groups)
    (counts,) = (
        Catalog(str(tmp_path / "out" / "catalog"))
        .query("SELECT count(*) AS n, count(DISTINCT image_id) AS ids, min(status) AS status FROM audits")
        .to_pylist()
    )
    assert counts == {"n": len(groups), "ids": len(groups), "status": "ok"}
