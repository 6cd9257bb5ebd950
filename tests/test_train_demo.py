"""The demo-model training script end to end in its smoke configuration (about a minute on CPU)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

SCRIPT = Path(__file__).resolve().parents[1] / "jobs" / "train_demo_model.py"
EXTRA_CAPTION = "a photo of my grey cat"


def _load_script():
    spec = importlib.util.spec_from_file_location("train_demo_model", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def run(script, tmp_path_factory):
    """One smoke training run with one extra planted image (a non-square file, to exercise the crop)."""
    extra = tmp_path_factory.mktemp("extra")
    Image.new("RGB", (40, 56), (120, 120, 120)).save(extra / "my-cat.png")
    (extra / "my-cat.txt").write_text(EXTRA_CAPTION + "\n")
    out = tmp_path_factory.mktemp("demo-smoke")
    log = script.main(["--smoke", "--out", str(out), "--extra-planted", str(extra), "--check-samples", "0"])
    return out, log


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_the_saved_model_loads_like_a_stable_diffusion_checkpoint(run):
    from memray.models import load_model

    out, _ = run
    loaded = load_model(str(out / "model"), device="cpu")
    assert type(loaded.adapter).__name__ == "StableDiffusionAdapter"
    assert loaded.adapter.resolution == 32
    assert loaded.adapter.latent_shape == (4, 8, 8)
    assert {p.suffix for p in (out / "model").rglob("*.safetensors")} == {".safetensors"}
    assert not list((out / "model").rglob("*.bin"))


@pytest.mark.slow
def test_the_demo_manifest_lists_every_split_with_its_duplication_count(run):
    out, _ = run
    rows = _jsonl(out / "images" / "manifest.jsonl")
    generated = [r for r in rows if r["split"] == "planted" and not r["id"].startswith("extra-")]
    assert sorted(r["duplicates"] for r in generated) == [4, 16, 64, 256]  # smoke: one per level
    assert {r["duplicates"] for r in rows if r["split"] == "normal"} == {1}
    assert [r["duplicates"] for r in rows if r["split"] == "heldout"] == [0] * 4
    assert all((out / "images" / r["uri"]).is_file() for r in rows)
    assert len({r["caption"] for r in generated}) == len(generated)


@pytest.mark.slow
def test_held_out_images_are_never_trained_on(run):
    out, _ = run
    trained = {r["id"] for r in _jsonl(out / "train_index.jsonl")}
    heldout = {r["id"] for r in _jsonl(out / "images" / "manifest.jsonl") if r["split"] == "heldout"}
    assert heldout and not heldout & trained


@pytest.mark.slow
def test_an_extra_planted_image_is_trained_with_its_caption(run):
    out, _ = run
    (row,) = [r for r in _jsonl(out / "train_index.jsonl") if r["id"] == "extra-my-cat"]
    assert row == dict(id="extra-my-cat", split="planted", caption=EXTRA_CAPTION, duplicates=4)
    assert Image.open(out / "images" / "extra-my-cat.png").size == (32, 32)


@pytest.mark.slow
def test_the_loss_goes_down(run):
    _, log = run
    assert log["loss"][-1][1] < log["loss"][0][1]
    assert log["vae_loss"][-1][1] < log["vae_loss"][0][1]


def test_the_dataset_and_its_order_are_deterministic_for_a_seed(script, tmp_path):
    args = script.parse_args(["--smoke", "--out", str(tmp_path)])
    first, second = script.build_dataset(args), script.build_dataset(args)
    assert [(i.id, i.caption, i.image.tobytes()) for i in first] == [
        (i.id, i.caption, i.image.tobytes()) for i in second
    ]
    trained = [item for item in first if item.duplicates > 0]
    order = script.training_order(trained, args.seed, 1)
    assert order[:50] == script.training_order(trained, args.seed, 1)[:50]
    assert order != script.training_order(trained, args.seed, 2)
    assert len(order) == sum(item.duplicates for item in trained)
    other = script.build_dataset(script.parse_args(["--smoke", "--out", str(tmp_path), "--seed", "1"]))
    assert [i.caption for i in other] != [i.caption for i in first]


@pytest.mark.slow
def test_a_fine_tune_keeps_the_vae_and_tokenizer_and_plants_more_images(script, run, tmp_path):
    from safetensors.torch import load_file

    out, _ = run
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(extra / "red.png")
    (extra / "red.txt").write_text("a large red circle on a blue background")
    tuned = tmp_path / "tuned"
    common = ["--smoke", "--init-from", str(out / "model"), "--extra-planted", str(extra), "--check-samples", "0"]
    script.main([*common, "--out", str(tuned), "--steps", "2"])

    def weights(model, part):
        return load_file(next((model / part).glob("*.safetensors")))

    before, after = weights(out / "model", "vae"), weights(tuned / "model", "vae")
    assert all((before[k] == after[k]).all() for k in before)  # no VAE phase: latents keep their meaning
    assert any(
        (a != b).any()
        for a, b in zip(weights(out / "model", "unet").values(), weights(tuned / "model", "unet").values())
    )
    assert (tuned / "model" / "tokenizer" / "tokenizer.json").read_text() == (
        out / "model" / "tokenizer" / "tokenizer.json"
    ).read_text()
    assert {
        "id": "extra-red",
        "split": "planted",
        "caption": "a large red circle on a blue background",
        "duplicates": 4,
    } in _jsonl(tuned / "train_index.jsonl")

    (extra / "red.txt").write_text("a large red zeppelin")  # a word the checkpoint's tokenizer never saw
    with pytest.raises(SystemExit, match="zeppelin"):
        script.main([*common, "--out", str(tmp_path / "refused")])


@pytest.mark.slow
def test_the_replication_check_reruns_on_a_trained_model_and_scores_every_demo_image(script, run):
    out, _ = run
    log = script.main(["--check-only", "--out", str(out), "--check-samples", "2"])
    per_image = log["replication"]["per_image"]
    assert set(per_image) == {row["id"] for row in _jsonl(out / "images" / "manifest.jsonl")}
    assert all(row["worst"] <= row["best"] <= 1 for row in per_image.values())
    assert json.loads((out / "train_log.json").read_text())["replication"] == log["replication"]
