"""The replication bar and its nulls, the unconditional replication rate, InvMM's caption start, and the
verdict rules built on them: closed forms on the tiny checkpoints, numpy by hand where it applies."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from conftest import png_bytes, threshold_targets

from memray.auditing.runner import audit_batch
from memray.auditing.verdict import decide
from memray.catalog.schema import AuditRow
from memray.config import ConfigError, SimilarityConfig, VerdictConfig, preset_config
from memray.data.records import ImageInput
from memray.measures import rng
from memray.measures.invmm import caption_start_logits, invmm
from memray.measures.settings import InvMMConfig
from memray.measures.similarity import (
    LatentL2Similarity,
    TiledL2Similarity,
    detail_free,
    null_bank,
    null_bar,
    replication_targets,
)


def tile_means_by_hand(images: np.ndarray, tiles: int) -> np.ndarray:
    out = images.copy()
    n, c, h, w = images.shape
    th, tw = h // tiles, w // tiles
    for r in range(tiles):
        for q in range(tiles):
            block = images[:, :, r * th : (r + 1) * th, q * tw : (q + 1) * tw]
            out[:, :, r * th : (r + 1) * th, q * tw : (q + 1) * tw] = block.mean(axis=(2, 3), keepdims=True)
    return out


def test_detail_free_is_the_tile_means_and_keeps_a_tile_constant_image():
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 16, 16, generator=gen, dtype=torch.float64)
    flat = detail_free(images, 4)
    np.testing.assert_allclose(flat.numpy(), tile_means_by_hand(images.numpy(), 4), rtol=1e-12)
    torch.testing.assert_close(detail_free(flat, 4), flat)  # idempotent
    torch.testing.assert_close(detail_free(images, 1).mean(dim=(2, 3)), images.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("null", "gain", "threshold", "expected"),
    [
        (0.8, 0.5, 0.9, 0.9),
        (0.9, 0.5, 0.9, 0.95),
        (0.98, 0.5, 0.5, 0.99),
        (0.6, 0.75, 0.5, 0.9),
        (math.nan, 0.5, 0.7, 0.7),
    ],
)
def test_null_bar_removes_a_share_of_the_distance_the_null_leaves(null, gain, threshold, expected):
    similarity = TiledL2Similarity(threshold=threshold)
    bar = null_bar(similarity, torch.tensor([null]), gain)
    assert bar.item() == pytest.approx(expected)


def test_content_null_of_a_pixel_model_is_the_tiled_l2_to_the_tile_means(tiny_ddpm):
    model = tiny_ddpm.adapter  # pixels are the latents: the encode/decode round trip is the identity clamp
    gen = torch.Generator().manual_seed(1)
    detailed = torch.rand(1, 3, 16, 16, generator=gen) * 2 - 1
    near_uniform = 0.3 + 0.01 * torch.rand(1, 3, 16, 16, generator=gen)
    z0 = torch.cat([detailed, near_uniform])
    similarity = TiledL2Similarity()
    targets = replication_targets(model, similarity, z0, None, 0.9, 0.5)
    by_hand = tile_means_by_hand(z0.double().numpy(), 4)
    rms = np.sqrt((((by_hand - z0.double().numpy()) / 2) ** 2).reshape(2, 3, 4, 4, 4, 4).mean(axis=(1, 3, 5)))
    np.testing.assert_allclose(targets.content_null.numpy(), 1 - rms.reshape(2, -1).max(1), rtol=1e-5)
    assert math.isnan(targets.model_null[0])  # no bank: no model null
    # a near-uniform target's bar is out of reach of anything but (almost) the image itself
    assert targets.content_null[1] > 0.995 and targets.threshold[1] > 0.997
    assert targets.threshold[0] == pytest.approx(0.9)  # the detailed one: the threshold binds


def test_the_model_null_is_a_quantile_of_the_similarities_to_the_bank(tiny_ddpm):
    model = tiny_ddpm.adapter
    gen = torch.Generator().manual_seed(2)
    z0 = torch.rand(3, *model.latent_shape, generator=gen) * 2 - 1
    bank = torch.rand(20, *model.latent_shape, generator=gen) * 2 - 1
    bank[:2] = z0[0]  # two copies of image 0: the 0.8 quantile is robust to them
    similarity = TiledL2Similarity(threshold=0.1)
    targets = replication_targets(model, similarity, z0, bank, 0.8, 0.5)
    sims = np.array([[float(similarity(model, b[None], t[None])) for b in bank] for t in z0])
    content_bar = np.maximum(1 - 0.5 * (1 - targets.content_null.numpy()), 0.1)
    copies = sims >= content_bar[:, None]
    np.testing.assert_array_equal(copies.sum(1), [2, 0, 0])  # the two copies of image 0, nothing else
    np.testing.assert_allclose(targets.bank_replicas.numpy(), [0.1, 0.0, 0.0])
    # the model null leaves the copies out: image 0 is held to the other 18 samples, not to itself
    expected_null = [np.quantile(row[~c], 0.8) for row, c in zip(sims, copies)]
    np.testing.assert_allclose(targets.model_null.numpy(), expected_null, rtol=1e-5)
    assert targets.model_null[0] < 0.99
    expected = np.maximum(content_bar, 1 - 0.5 * (1 - np.array(expected_null)))
    np.testing.assert_allclose(targets.threshold.numpy(), expected, rtol=1e-5)


def test_the_null_bank_is_seeded_and_counted_in_a_scope_of_its_own(tiny_sd):
    model = tiny_sd.adapter
    model.counter.reset(2)
    with model.counter.scope(1) as tally:
        banks = [null_bank(model, TiledL2Similarity(), 5, 3, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    torch.testing.assert_close(banks[0], banks[1], rtol=0, atol=0)
    assert not torch.allclose(banks[0], banks[2])
    assert banks[0].shape == (5, 3, model.resolution, model.resolution)
    assert tally.forwards.tolist() == [3 * 5 * 3]  # three banks of 5 samples x 3 DDIM steps, guidance 1
    assert model.counter.forwards.tolist() == [0, 0]  # the tally outside the scope is untouched


def test_caption_start_logits_put_the_chosen_weight_on_the_caption_token():
    start = torch.tensor([[3, 0, 7], [-1, -1, -1]])
    for vocab, weight, tau in [(10, 0.9, 2.0), (49408, 0.9, 2.0), (200, 0.5, 1.0)]:
        logits = caption_start_logits(start, vocab, weight, tau)
        mix = torch.softmax(logits.double() / tau, dim=-1)
        chosen = mix[0].gather(-1, start[0].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(chosen, torch.full((3,), weight, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            mix[1], torch.full((3, vocab), 1 / vocab, dtype=torch.float64)
        )  # no caption: the uniform mix


def test_invmm_from_a_caption_starts_at_the_caption_and_stays_batch_independent(tiny_sd):
    model = tiny_sd.adapter
    config = InvMMConfig(steps=2, check_every=2, samples_per_step=2, check_noises=1, guidance_scales=(1.0,),
                         sampling_steps=2, loss_window=2)  # fmt: skip
    similarity = LatentL2Similarity(threshold=2.0)  # never replicates
    pixels = [png_bytes(s) for s in (1, 2)]
    from memray.data.images import decode_image, to_model_tensor

    z0 = model.encode_images(torch.stack([to_model_tensor(decode_image(p), model.resolution) for p in pixels]))
    start = model.caption_slot_ids(["a red circle", ""])
    start[1] = -1

    def run(rows, ids):
        model.counter.reset(len(rows))
        gens = rng.image_generators(ids, 0, "invmm")
        targets = threshold_targets(model, similarity, z0[rows])
        return invmm(model, z0[rows], gens, torch.arange(len(rows)), config, similarity, targets, start_ids=start[rows])

    both = run([0, 1], ["cap", "zero"])
    assert both.prompt_init == ["caption", "zero"]
    alone = run([0], ["cap"])
    np.testing.assert_allclose(both.reconstruction[:1], alone.reconstruction, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(both.mu[:1], alone.mu, rtol=1e-4, atol=1e-6)
    # after two steps at lr 0.1 the caption still dominates each of its slots: the readable prompt is it
    assert both.prompts[0] == "a red circle"
    zero_start = dataclasses.replace(config, prompt_init="zero")
    gens = rng.image_generators(["cap"], 0, "invmm")
    targets = threshold_targets(model, similarity, z0[:1])
    forced = invmm(model, z0[:1], gens, torch.arange(1), zero_start, similarity, targets, start_ids=start[:1])
    assert forced.prompt_init == ["zero"]


def test_an_audit_fills_the_bar_the_nulls_and_the_unconditional_rate(tiny_sd):
    config = preset_config("quick").replace(
        measures=["invmm", "uncond_replication"],
        invmm={"steps": 2, "check_every": 2, "check_noises": 1, "sampling_steps": 2, "guidance_scales": [1.0]},
        similarity={"null_samples": 4},
    )
    items = [ImageInput(f"n{i}", data=png_bytes(40 + i), caption="a red circle" if i else None) for i in range(2)]
    rows = [a.row for a in audit_batch(tiny_sd, items, config, replicas=0)]
    again = [a.row for a in audit_batch(tiny_sd, items[1:], config, replicas=0)]
    assert len(tiny_sd.null_banks) >= 1  # the model null is generated once per loaded model and config
    for row in rows + again:
        assert row.status == "ok"
        bar = max(0.9, 1 - 0.5 * (1 - row.null_content_similarity), 1 - 0.5 * (1 - row.null_model_similarity))
        assert row.replication_threshold == pytest.approx(bar)
        assert row.uncond_replication_rate in {0.0, 0.25, 0.5, 0.75, 1.0}
    assert [r.invmm_prompt_init for r in rows] == ["zero", "caption"]
    # the same image alone and in a batch of two: the same bar, rate and cost
    assert again[0].replication_threshold == pytest.approx(rows[1].replication_threshold)
    assert again[0].uncond_replication_rate == rows[1].uncond_replication_rate
    assert again[0].unet_forwards == rows[1].unet_forwards


def _row(**fields) -> AuditRow:
    return AuditRow(image_id="x", **fields)


def test_unprompted_replication_decides_first_and_voids_the_m4_shift():
    rule = VerdictConfig()
    verdict, text = decide(_row(uncond_replication_rate=0.05, invmm_replicated=False, invmm_steps=10), rule)
    assert verdict == "memorized" and "empty prompt" in text
    # below the minimum: InvMM decides, and a large M4 shift no longer counts (the premise fails)
    low = _row(uncond_replication_rate=0.01, invmm_replicated=False, invmm_steps=10, wasserstein_shift_sd=50.0)
    assert decide(low, rule)[0] == "not_memorized"
    assert decide(_row(uncond_replication_rate=0.0, wasserstein_shift_sd=50.0), rule)[0] == "memorized"
    assert decide(_row(uncond_replication_rate=0.01, wasserstein_shift_sd=50.0), rule)[0] == "inconclusive"
    assert (
        decide(_row(uncond_replication_rate=0.0, invmm_replicated=True, invmm_kl=0.0, invmm_kl_nats=0.0), rule)[0]
        == "memorized"
    )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(similarity={"null_gain": 1.0}), "null_gain"),
        (dict(similarity={"null_quantile": 1.5}), "null_quantile"),
        (dict(similarity={"null_samples": 0}), "uncond_replication"),
        (dict(invmm={"prompt_init_weight": 1.0}), "prompt_init_weight"),
        (dict(invmm={"prompt_init": "best"}), "prompt_init"),
        (dict(prompt_inversion={"init": "zero"}), "prompt_inversion.init"),
    ],
)
def test_replication_settings_are_validated(changes, message):
    with pytest.raises(ConfigError, match=message):
        preset_config("quick").replace(**changes)
    assert SimilarityConfig().null_gain == 0.5
