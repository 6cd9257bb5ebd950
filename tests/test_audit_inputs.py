"""The runner on untrusted inputs, model/measure compatibility, the Wen screen, and verdict rules."""

from __future__ import annotations

import hashlib
import io
import json
import math

import numpy as np
import pytest
import torch
from conftest import png_bytes, tiny_budgets
from PIL import Image

from memray.auditing.registry import REGISTRY
from memray.auditing.runner import audit_batch, check_compatible, supported_measures
from memray.auditing.verdict import decide
from memray.catalog.schema import AuditRow
from memray.config import ConfigError, VerdictConfig, preset_config
from memray.data.records import ImageInput
from memray.models.tiny import TINY_WORDS


def tiny_config(**changes):
    """Smallest budgets that run every step of every measure; InvMM always replicates at the first
    check (latent L2 is unbounded below, so -1e9 always passes) and hard prompts always run, so
    every measure column of an ok row gets a value."""
    base = tiny_budgets().replace(
        measures=list(REGISTRY),
        hard_prompt={"run_for": "always"},
        similarity={"kind": "latent_l2", "threshold": -1e9, "nulls": False},
    )
    return base.replace(**changes) if changes else base


# -- input bytes ---------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _noise(width: int, height: int, channels: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)


def truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(_noise(64, 64, seed=1)), "JPEG", quality=90)
    return data[: len(data) // 2]


def cmyk_jpeg() -> bytes:
    data = _encode(Image.fromarray(_noise(48, 40, seed=2)).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    return data


def rgba_png() -> bytes:
    return _encode(Image.fromarray(_noise(44, 40, channels=4, seed=3), "RGBA"), "PNG")


def png16() -> bytes:
    values = np.random.default_rng(4).integers(0, 65536, (40, 40)).astype(np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    return data


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real, fully valid 1-bit PNG of 30000 x 30000 pixels (about 110 kB on disk)."""
    return _encode(Image.new("1", (30000, 30000)), "PNG")


GOOD = {
    # image_id: (bytes factory, caption)
    "rgb-a": (lambda: png_bytes(1, size=(40, 48)), "a red cat"),
    "rgb-b": (lambda: png_bytes(2, size=(36, 36)), None),
    "cmyk": (cmyk_jpeg, "a photo of a dog"),
    "grey": (lambda: png_bytes(5, size=(40, 40), mode="L"), None),
    "rgba": (rgba_png, "blue sky"),
    "png16": (png16, None),
}

BAD = {
    # image_id: (bytes factory, expected message fragment)
    "zero": (lambda: b"", "empty file"),
    "random": (lambda: np.random.default_rng(7).bytes(2048), "not an image"),
    "truncated": (truncated_jpeg, "truncated or corrupt"),
    "small": (lambda: png_bytes(8, size=(20, 20)), "smaller than the model resolution 32"),
}

# Every column a measure of the registry fills (the caption screen needs a caption), the bar and the
# verdict. null_model_similarity is left out: under the forced threshold every model sample is a
# replica, so no sample is left for the model null (NULL); tests/test_nulls.py measures it.
WEN_FIELDS = ("wen_score", "wen_tokens", "one_step_confidence")
MEASURE_FIELDS = tuple(
    column for measure in REGISTRY.values() for column in measure.columns if column not in WEN_FIELDS
) + ("replication_threshold", "null_content_similarity", "verdict", "verdict_rule")


def good_inputs():
    return [ImageInput(name, data=make(), caption=caption) for name, (make, caption) in GOOD.items()]


@pytest.fixture(scope="module")
def mixed_batch(tiny_sd, bomb_png, tmp_path_factory):
    missing = tmp_path_factory.mktemp("inputs") / "gone.png"
    good = good_inputs()
    bad = [ImageInput(name, data=make(), caption="a cat") for name, (make, _) in BAD.items()]
    bad.append(ImageInput("bomb", data=bomb_png))
    items = [good[0], bad[0], good[1], bad[1], good[2], bad[2], good[3], bad[3], good[4], bad[4], good[5]]
    items += [str(missing)]  # a plain path, as the CLI passes them
    audits = audit_batch(tiny_sd, items, tiny_config())
    return items, {a.row.image_id: a for a in audits}


def test_good_and_convertible_images_get_complete_ok_rows(mixed_batch):
    items, audits = mixed_batch
    assert len(audits) == len(items)
    for name, (make, caption) in GOOD.items():
        row = audits[name].row
        assert row.status == "ok" and row.error is None, (name, row.error)
        assert row.image_sha256 == hashlib.sha256(make()).hexdigest()
        assert row.width and row.height
        for field in MEASURE_FIELDS:
            value = getattr(row, field)
            assert value is not None, f"{name}: {field} is missing"
            if isinstance(value, float):
                assert math.isfinite(value), f"{name}: {field} = {value}"
        assert row.invmm_replicated and row.invmm_steps == 0  # replicated at the check of N(0, I)
        assert row.verdict in ("memorized", "not_memorized", "inconclusive")
        assert row.unet_forwards > 0 and row.unet_backwards > 0 and row.seconds > 0
        assert (row.wen_score is not None) == (caption is not None), name
        assert audits[name].z0 is not None and torch.isfinite(audits[name].z0).all()


def test_bad_images_get_error_rows_with_a_clear_message(mixed_batch):
    _, audits = mixed_batch
    expected = {name: fragment for name, (_, fragment) in BAD.items()}
    expected["bomb"] = "decompression bomb"
    expected["gone.png"] = "missing file"
    for name, fragment in expected.items():
        row = audits[name].row
        assert row.status == "error", name
        assert fragment in row.error, (name, row.error)
        assert row.image_id == name
        assert (row.image_sha256 is None) == (name == "gone.png"), name
        if name == "zero":
            assert row.image_sha256 == hashlib.sha256(b"").hexdigest()
        assert (row.unet_forwards, row.unet_backwards, row.seconds) == (0, 0, 0.0), name
        assert all(getattr(row, f) is None for f in MEASURE_FIELDS + WEN_FIELDS), name
    assert audits["small"].row.width == 20 and audits["small"].row.height == 20


def test_bad_images_do_not_change_the_good_rows(tiny_sd, mixed_batch):
    # the same good images without the bad ones in between: same rows, costs included
    _, audits = mixed_batch
    alone = {a.row.image_id: a.row for a in audit_batch(tiny_sd, good_inputs(), tiny_config())}
    # and one image on its own (hard prompts and replicating InvMM included)
    alone["cmyk"] = audit_batch(tiny_sd, [good_inputs()[2]], tiny_config())[0].row
    for name in GOOD:
        mixed, clean = audits[name].row, alone[name]
        assert mixed.unet_forwards == clean.unet_forwards and mixed.unet_backwards == clean.unet_backwards, name
        for field in MEASURE_FIELDS + WEN_FIELDS:
            x, y = getattr(mixed, field), getattr(clean, field)
            if isinstance(x, float):
                assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), (name, field, x, y)
            elif isinstance(x, list):  # quantiles: floats from batched kernels, equal up to rounding
                np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5, err_msg=f"{name} {field}")
            elif field == "wen_tokens" and x is not None:
                x, y = json.loads(x), json.loads(y)
                assert [t for t, _ in x] == [t for t, _ in y], name
                np.testing.assert_allclose([v for _, v in x], [v for _, v in y], rtol=1e-4, atol=1e-5)
            else:
                assert x == y, (name, field, x, y)


def test_an_unreadable_path_becomes_an_error_row_not_a_crash(tiny_sd, tmp_path):
    folder = tmp_path / "not-an-image.png"
    folder.mkdir()
    items = [ImageInput("good", data=png_bytes(1)), str(folder)]
    audits = audit_batch(tiny_sd, items, tiny_config(measures=["z0_error"]))
    assert audits[0].row.status == "ok"
    assert audits[1].row.status == "error" and audits[1].row.error


# -- model / measure compatibility ---------------------------------------------------------------


def test_prompt_measures_are_refused_for_the_unconditional_ddpm(tiny_ddpm, tiny_sd):
    config = preset_config("quick")
    model = tiny_ddpm.adapter
    assert supported_measures(config, model) == ("invmm", "uncond_replication", "z0_error", "noise_inversion")
    assert supported_measures(config, tiny_sd.adapter) == config.measures
    with pytest.raises(ConfigError, match="unconditional") as caught:
        check_compatible(config, model)
    for name in ("hard_prompt", "prompt_inversion", "wasserstein", "wen"):
        assert name in str(caught.value)
    check_compatible(config, tiny_sd.adapter)  # the SD model runs everything
    model.counter.reset(0)
    with pytest.raises(ConfigError):
        audit_batch(tiny_ddpm, [ImageInput("x", data=png_bytes(1))], config)
    assert model.counter.forwards.sum() == 0  # refused at start-up, before any UNet call

    runnable = tiny_config(measures=list(supported_measures(config, model)))
    check_compatible(runnable, model)
    rows = [
        a.row
        for a in audit_batch(
            tiny_ddpm,
            [ImageInput("d0", data=png_bytes(3)), ImageInput("d1", data=png_bytes(4), caption="a cat")],
            runnable,
        )
    ]
    for row in rows:
        assert row.status == "ok", row.error
        assert row.invmm_steps is not None and row.z0_error is not None and row.noise_kl is not None
        assert row.invmm_prompt is None and row.soft_prompt_error is None and row.wen_score is None
        assert row.verdict is not None


# -- Wen screen ----------------------------------------------------------------------------------


def test_wen_screen_scores_captioned_rows_and_lists_their_words(tiny_sd):
    captions = ["a red cat", None, "photo of a blue dog", "", "small white house in the sky"]
    items = [ImageInput(f"w{i}", data=png_bytes(20 + i), caption=c) for i, c in enumerate(captions)]
    rows = [a.row for a in audit_batch(tiny_sd, items, tiny_config(measures=["wen"]))]
    for row, caption in zip(rows, captions):
        assert row.status == "ok", row.error
        assert row.verdict == "inconclusive"
        if caption:
            assert row.wen_score is not None and row.wen_score > 0
            tokens = json.loads(row.wen_tokens)
            assert [t for t, _ in tokens] == caption.split()
            assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for _, v in tokens)
            assert any(v > 0 for _, v in tokens)
        else:
            assert row.wen_score is None and row.wen_tokens is None
    # the screen depends on the caption
    assert rows[0].wen_score != rows[2].wen_score


def test_wen_tokens_are_the_words_for_every_tiny_vocabulary_word(tiny_sd):
    bad = {}
    for word in TINY_WORDS:
        pieces = tiny_sd.adapter.tokenizer.tokenize(word)
        if pieces != [word + "</w>"]:
            bad[word] = pieces
    caption = "a green tree with stripes"
    row = audit_batch(tiny_sd, [ImageInput("w", data=png_bytes(30), caption=caption)], tiny_config(measures=["wen"]))[
        0
    ].row
    assert [t for t, _ in json.loads(row.wen_tokens)] == caption.split()
    assert not bad, bad


# -- verdict rules -------------------------------------------------------------------------------

RULE = VerdictConfig()  # invmm_rate_min 0.001, shift_sd_memorized 10, shift_sd_clear 3


@pytest.mark.parametrize(
    "fields, verdict, rule",
    [
        (
            dict(invmm_replicated=True, invmm_kl=0.01, invmm_kl_nats=2.56, invmm_steps=50),
            "memorized",
            "InvMM replicated at KL 2.56 nats: N(0, I) noise under its prompt replicates in >= 0.0535 of samples, >= 0.001",
        ),
        (
            dict(invmm_replicated=True, invmm_kl=2.0, invmm_kl_nats=512.0, invmm_steps=50, wasserstein_shift_sd=20.0),
            "inconclusive",
            "InvMM replicated at KL 512 nats: N(0, I) noise under its prompt replicates in >= 3.03e-223 of samples, < 0.001",
        ),
        (
            dict(invmm_replicated=True, invmm_kl=None, invmm_kl_nats=None, invmm_steps=50),
            "inconclusive",
            "InvMM replicated but its KL is not finite",
        ),
        (dict(invmm_replicated=False, invmm_steps=2000), "not_memorized", "InvMM never replicated in 2000 steps"),
        (
            dict(invmm_replicated=False, invmm_steps=150, invmm_stop_reason="early_stop"),
            "not_memorized",
            "InvMM stopped early at 150 steps: its checks stayed too far under the bar to replicate within the "
            "budget (the calibrated early stop; censored)",
        ),
        (
            dict(invmm_replicated=False, invmm_steps=2000, wasserstein_shift_sd=5.0),
            "not_memorized",
            "InvMM never replicated in 2000 steps",
        ),
        (
            dict(invmm_replicated=False, invmm_steps=2000, wasserstein_shift_sd=12.5),
            "inconclusive",
            "InvMM never replicated, but the error shift is 12.5 sd >= 10.0",
        ),
        (dict(wasserstein_shift_sd=12.5), "memorized", "error shift 12.5 sd >= 10.0 (P <= 1.00% under the safe model)"),
        (dict(wasserstein_shift_sd=10.0), "memorized", "error shift 10 sd >= 10.0 (P <= 1.00% under the safe model)"),
        (dict(wasserstein_shift_sd=2.0), "not_memorized", "error shift 2 sd <= 3.0"),
        (dict(wasserstein_shift_sd=3.0), "not_memorized", "error shift 3 sd <= 3.0"),
        (dict(wasserstein_shift_sd=-4.0), "not_memorized", "error shift -4 sd <= 3.0"),
        (dict(wasserstein_shift_sd=5.0), "inconclusive", "error shift 5 sd between 3.0 and 10.0"),
        (
            dict(invmm_replicated=True, invmm_kl_nats=0.0, invmm_steps=0, invmm_replicas=12, invmm_samples=16),
            "memorized",
            "InvMM replicated at KL 0 nats, 12 of 16 fresh samples replicating: N(0, I) noise under its prompt "
            "replicates in >= 0.516 of samples (95% confidence), >= 0.001",
        ),
        (
            dict(invmm_replicated=True, invmm_kl_nats=4.73, invmm_steps=25, invmm_replicas=10, invmm_samples=16),
            "inconclusive",
            "InvMM replicated at KL 4.73 nats, 10 of 16 fresh samples replicating: N(0, I) noise under its prompt "
            "replicates in >= 1.01e-06 of samples (95% confidence), < 0.001",
        ),
        (
            dict(caption="a cat", screen_progress=1.3, screen_replicas=2, screen_samples=4, screen_flagged=True),
            "memorized",
            "its caption replicates it from N(0, I) noise in 2 of 4 start samples: in >= 0.0976 of samples "
            "(95% confidence) >= 0.001",
        ),
        (
            dict(screen_progress=0.7, screen_replicas=0, screen_samples=4, screen_flagged=True),
            "inconclusive",
            "flagged by the screen (progress 0.70, 0 of 4 start samples replicating): InvMM decides (memray confirm)",
        ),
        (
            dict(screen_progress=None, screen_replicas=0, screen_samples=4, screen_flagged=False),
            "not_memorized",
            "cleared by the screen: its closest start sample covered no of the way to its bar",
        ),
        (dict(), "inconclusive", "neither InvMM, the screen nor the Wasserstein measure ran"),
    ],
)
def test_verdict_rules(fields, verdict, rule):
    assert decide(AuditRow(image_id="x", **fields), RULE) == (verdict, rule)


def test_verdict_thresholds_come_from_the_config():
    row = AuditRow(image_id="x", invmm_replicated=True, invmm_kl_nats=8.0, invmm_steps=50)
    assert decide(row, RULE)[0] == "inconclusive"  # bound 2.3e-4 < 0.001
    assert decide(row, VerdictConfig(invmm_rate_min=1e-4))[0] == "memorized"
    row = AuditRow(image_id="x", wasserstein_shift_sd=4.0)
    assert decide(row, VerdictConfig(shift_sd_memorized=4.0, shift_sd_clear=1.0))[0] == "memorized"
    assert "P <= 6.25%" in decide(row, VerdictConfig(shift_sd_memorized=4.0, shift_sd_clear=1.0))[1]
