"""The demo model's training (memray.evaluation.demo_training): its data plan (fast), and one smoke run end to end
(about two minutes on CPU)."""

from __future__ import annotations

import argparse
import gzip
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from memray.evaluation import demo_training

EXTRA_CAPTION = "a photo of my grey cat"


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:
        return [json.loads(line) for line in handle]


# -- the plan ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    args = demo_training.parse_args(
        ["--out", str(tmp_path_factory.mktemp("plan")), "--steps", "400", "--levels", "8", "32"]
    )
    args.uncond_copies = 64
    trained, never = demo_training.build_plan(args)
    return args, trained, never


def test_the_plan_fills_exactly_the_training_samples_with_a_small_planted_share(plan):
    args, trained, _ = plan
    assert sum(item.copies for item in trained) == args.steps * args.batch_size
    planted = [item for item in trained if item.split == "planted"]
    assert sorted(item.copies for item in planted) == [8, 8, 8, 32, 32, 32, 64]
    assert sum(item.copies for item in planted) / (args.steps * args.batch_size) < 0.01
    normal = [item for item in trained if item.split == "normal"]
    assert set(Counter(item.copies for item in normal)) <= {1, 2, 3, 4}
    assert Counter(item.copies for item in normal).most_common(1)[0][0] == 1  # mostly seen once
    assert set(Counter(item.caption_kind for item in normal)) == {"full", "partial", "loose"}


def test_planted_captions_come_in_both_kinds_and_one_image_is_trained_without_any(plan):
    _, trained, _ = plan
    planted = [item for item in trained if item.split == "planted"]
    normal_captions = Counter(item.caption for item in trained if item.split == "normal")
    kinds = [item.caption_kind for item in planted]
    assert kinds == ["unique", "template", "unique", "template", "unique", "template", "none"]
    for item in planted:
        if item.caption_kind == "unique":
            assert normal_captions[item.caption] == 0  # matching verbatim: the caption is its own
        elif item.caption_kind == "template":
            assert normal_captions[item.caption] > 0 and item.caption.startswith("shapes on ")  # shared, loose
        else:
            assert item.caption == ""
    assert len({item.caption for item in planted}) == len(planted)


def test_never_trained_images_include_hard_negatives_and_caption_lures(plan):
    args, trained, never = plan
    trained_ids = {item.id for item in trained}
    assert all(item.copies == 0 and item.id not in trained_ids for item in never)
    kinds = Counter(item.caption_kind for item in never if item.split == "hard")
    assert kinds == {"uniform": 2, "dark": 2, "plain": 2, "noise": 2, "shares objects": 2, "shares background": 2}
    planted = {item.caption: item for item in trained if item.split == "planted"}
    lures = [item for item in never if item.caption_kind == "shares background"]
    assert all(planted[item.caption].caption_kind == "template" for item in lures)  # the same template caption
    objects = [item for item in never if item.caption_kind == "shares objects"]
    sources = [p for p in planted.values() if p.caption_kind == "unique"]
    assert all(any(item.scene.groups == p.scene.groups for p in sources) for item in objects)
    assert sum(item.split == "heldout" for item in never) == args.heldout


def test_the_plan_and_the_order_are_deterministic_for_a_seed(plan):
    args, trained, never = plan
    again, never_again = demo_training.build_plan(args)
    assert [(i.id, i.caption, i.copies) for i in trained] == [(i.id, i.caption, i.copies) for i in again]
    for a, b in zip(never, never_again):
        assert np.array_equal(np.asarray(a.image(32)), np.asarray(b.image(32))), a.id
    order = demo_training.training_order(trained, args.seed)
    assert order.equal(demo_training.training_order(trained, args.seed))
    assert not order.equal(demo_training.training_order(trained, args.seed + 1))
    assert np.bincount(order.numpy(), minlength=len(trained)).tolist() == [i.copies for i in trained]
    other, _ = demo_training.build_plan(argparse.Namespace(**{**vars(args), "seed": 1}))
    assert [i.caption for i in other[:6]] != [i.caption for i in trained[:6]]


# -- one smoke run --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One smoke training run with one extra planted image (a non-square file, to exercise the crop)."""
    extra = tmp_path_factory.mktemp("extra")
    Image.new("RGB", (40, 56), (120, 120, 120)).save(extra / "my-cat.png")
    (extra / "my-cat.txt").write_text(EXTRA_CAPTION + "\n")
    out = tmp_path_factory.mktemp("demo-smoke")
    log = demo_training.main(["--smoke", "--out", str(out), "--extra-planted", str(extra)])
    return out, log


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
def test_the_demo_manifest_carries_every_image_with_its_kind_and_graded_truth(run):
    out, _ = run
    rows = _jsonl(out / "images" / "manifest.jsonl")
    assert {r["split"] for r in rows} == {"planted", "normal", "heldout", "hard"}
    generated = [r for r in rows if r["split"] == "planted" and not r["id"].startswith("extra-")]
    assert sorted(r["duplicates"] for r in generated) == [4, 4, 16, 16, 16]  # smoke: 2 per level, the uncond image
    assert [r["caption_kind"] for r in generated] == ["unique", "template", "unique", "template", "none"]
    for r in rows:
        assert (out / "images" / r["uri"]).is_file()
        assert 0 <= r["truth_caption_rate"] <= 1 and 0 <= r["truth_uncond_rate"] <= 1
    trained = {r["id"] for r in _jsonl(out / "train_index.jsonl.gz")}
    never = {r["id"] for r in rows if r["split"] in ("heldout", "hard")}
    assert never and not never & trained


@pytest.mark.slow
def test_an_extra_planted_image_is_trained_with_its_caption(run):
    out, _ = run
    (row,) = [r for r in _jsonl(out / "train_index.jsonl.gz") if r["id"] == "extra-my-cat"]
    assert row == dict(id="extra-my-cat", split="planted", caption=EXTRA_CAPTION, copies=4)
    assert Image.open(out / "images" / "extra-my-cat.png").size == (32, 32)


@pytest.mark.slow
def test_the_loss_goes_down_and_the_log_says_what_was_trained(run):
    _, log = run
    assert log["loss"][-1][1] < log["loss"][0][1]
    assert log["vae_loss"][-1][1] < log["vae_loss"][0][1]
    assert log["data"]["samples"] == 40 * 16 and 0 < log["data"]["planted_share"] < 0.5
    assert {"planted x16 none", "hard uniform", "hard noise"} <= set(log["truth"])


@pytest.mark.slow
def test_a_fine_tune_keeps_the_vae_and_tokenizer_and_plants_more_images(run, tmp_path):
    from safetensors.torch import load_file

    out, _ = run
    extra = tmp_path / "extra"
    extra.mkdir()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(extra / "red.png")
    (extra / "red.txt").write_text("a large red circle on a blue background")
    tuned = tmp_path / "tuned"
    common = ["--smoke", "--init-from", str(out / "model"), "--extra-planted", str(extra)]
    demo_training.main([*common, "--out", str(tuned), "--steps", "2", "--truth-noises", "1", "--uncond-samples", "1"])

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
    planted = {"id": "extra-red", "split": "planted", "caption": "a large red circle on a blue background", "copies": 4}
    assert planted in _jsonl(tuned / "train_index.jsonl.gz")

    (extra / "red.txt").write_text("a large red zeppelin")  # a word the checkpoint's tokenizer never saw
    with pytest.raises(SystemExit, match="zeppelin"):
        demo_training.main([*common, "--out", str(tmp_path / "refused")])


@pytest.mark.slow
def test_the_ground_truth_is_measured_again_on_a_trained_model(run):
    out, _ = run
    before = _jsonl(out / "images" / "manifest.jsonl")
    log = demo_training.main(["--check-only", "--out", str(out)])
    after = _jsonl(out / "images" / "manifest.jsonl")
    assert [r["id"] for r in after] == [r["id"] for r in before]
    assert after == before  # the same seeded noises: the same rates
    assert json.loads((out / "train_log.json").read_text())["truth"] == log["truth"]
