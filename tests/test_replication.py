"""The staged replication check against an unstaged reference, its UNet cost, and the similarities."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import threshold_targets

from memray.measures.replication import failing_check_forwards, replication_check
from memray.measures.sampling import ddim_generate
from memray.measures.similarity import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LatentL2Similarity,
    SSCDSimilarity,
    TiledL2Similarity,
    build_similarity,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

STEPS = 4
SCALES = [1.0, 2.0, 5.0]
B, K = 2, 3


@pytest.fixture(scope="module")
def sd_case(tiny_sd):
    model = tiny_sd.adapter
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(B, *model.latent_shape, generator=gen)
    noises = torch.randn(B, K, *model.latent_shape, generator=gen)
    cond = model.encode_ids(model.token_ids(["a red circle", "a cat"]))
    return model, z0, noises, cond


@torch.no_grad()
def unstaged_similarities(model, z0, noises, cond, scales, similarity):
    """All K noises at every scale, generated image by image: (B, S, K) similarities."""
    batch, k = noises.shape[:2]
    out = torch.empty(batch, len(scales), k)
    for b in range(batch):
        for s, scale in enumerate(scales):
            z_T = noises[b]
            c = None if cond is None else cond[b].expand(k, *cond.shape[1:])
            model.counter.reset(batch)
            generated = ddim_generate(model, z_T, c, torch.full((k,), scale), torch.full((k,), b), STEPS)
            out[b, s] = similarity(model, generated, z0[b].expand(k, *z0.shape[1:]))
    return out


def check(model, z0, noises, cond, scales, similarity, rest="passing"):
    """replication_check with the similarity's threshold as every image's bar."""
    targets = threshold_targets(model, similarity, z0)
    return replication_check(
        model, z0, noises, cond, scales, similarity, targets, torch.arange(len(z0)), num_steps=STEPS, rest=rest
    )


def reference_decision(sims, scales, threshold):
    """Replicated iff at some scale the MINIMUM over K reaches the threshold; plus what decided it."""
    minimum = sims.amin(2)  # (B, S)
    success = minimum >= threshold
    replicated = success.any(1)
    similarity, guidance = [], []
    for b in range(sims.shape[0]):
        if replicated[b]:
            candidates = torch.where(success[b], minimum[b], torch.tensor(-np.inf))
        else:
            candidates = sims[b, :, 0]  # best first-noise similarity
        best = int(candidates.argmax())
        similarity.append(float(candidates[best]))
        guidance.append(scales[best])
    return replicated, torch.tensor(similarity), torch.tensor(guidance)


def thresholds_between(sims, margin=2e-3):
    """Midpoints between distinct observed similarities, inside the range of first-noise values."""
    values = np.unique(np.round(sims.flatten().numpy(), 6))
    first = sims[:, :, 0]
    lo, hi = float(first.min()), float(first.max())
    mids = (values[1:] + values[:-1]) / 2
    gaps = values[1:] - values[:-1]
    return [float(m) for m, g in zip(mids, gaps) if g > 2 * margin and lo < m < hi]


def test_staged_check_decides_like_the_unstaged_reference(sd_case):
    model, z0, noises, cond = sd_case
    similarity = LatentL2Similarity()
    sims = unstaged_similarities(model, z0, noises, cond, SCALES, similarity)
    # Put each image's best noise (at guidance 1) first, so that passing stage 1 does not imply
    # passing with all K: a sample's similarity depends only on its own (image, noise, scale).
    order = sims[:, 0, :].argsort(dim=1, descending=True)
    noises = torch.stack([noises[b, order[b]] for b in range(B)])
    sims = torch.stack([sims[b][:, order[b]] for b in range(B)])
    thresholds = thresholds_between(sims)
    assert len(thresholds) >= 4
    seen = {"stage1_pass_then_fail": 0, "replicated": 0, "not_replicated": 0}
    for threshold in thresholds:
        similarity.threshold = threshold
        model.counter.reset(B)
        result = check(model, z0, noises, cond, SCALES, similarity)
        replicated, best_sim, best_scale = reference_decision(sims, SCALES, threshold)
        first_pass = sims[:, :, 0] >= threshold
        assert first_pass.any() and not first_pass.all()  # some scales pass stage 1, some fail
        assert result.replicated.tolist() == replicated.tolist(), f"threshold {threshold}"
        torch.testing.assert_close(result.similarity, best_sim, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(result.guidance, best_scale)
        seen["stage1_pass_then_fail"] += int((first_pass & (sims.amin(2) < threshold)).sum())
        seen["replicated"] += int(replicated.sum())
        seen["not_replicated"] += int((~replicated).sum())
    # The thresholds exercised every branch of the staged decision.
    assert all(count > 0 for count in seen.values()), seen


def reference_counts(sims, threshold, complete):
    """(replicas, counted) the check reports: the most of the K replicating at a scale where all K ran."""
    hits = (sims >= threshold).sum(2)  # (B, S)
    counts = torch.where(complete, hits, torch.tensor(-1))
    replicas = counts.amax(1).clamp_min(0)
    counted = torch.where(complete.any(1), sims.shape[2], 0)
    return replicas, counted


@pytest.mark.parametrize("rest", ["passing", "best"])
def test_the_check_counts_replicas_where_all_k_ran_and_costs_what_it_generates(sd_case, rest):
    model, z0, noises, cond = sd_case
    similarity = LatentL2Similarity()
    sims = unstaged_similarities(model, z0, noises, cond, SCALES, similarity)
    first = sims[:, :, 0]
    for threshold in thresholds_between(sims):
        similarity.threshold = threshold
        model.counter.reset(B)
        result = check(model, z0, noises, cond, SCALES, similarity, rest=rest)
        if rest == "passing":
            complete = first >= threshold
        else:  # the scale where the first noise came closest, always
            complete = torch.zeros_like(first, dtype=torch.bool)
            complete[torch.arange(B), first.argmax(1)] = True
        replicas, counted = reference_counts(sims, threshold, complete)
        assert result.replicas.tolist() == replicas.tolist(), f"threshold {threshold}"
        assert result.counted.tolist() == counted.tolist()
        ran = torch.where(complete.unsqueeze(2).expand_as(sims), sims, first.unsqueeze(2).expand_as(sims))
        torch.testing.assert_close(result.best, ran.amax((1, 2)), rtol=1e-4, atol=1e-4)
        cost = [
            sum(STEPS * (1 if s == 1 else 2) * (1 + (K - 1) * bool(complete[b, i])) for i, s in enumerate(SCALES))
            for b in range(B)
        ]
        np.testing.assert_array_equal(model.counter.forwards, cost)


def test_unconditional_model_checks_only_guidance_one(tiny_ddpm):
    model = tiny_ddpm.adapter
    gen = torch.Generator().manual_seed(1)
    z0 = torch.rand(B, *model.latent_shape, generator=gen) * 2 - 1
    noises = torch.randn(B, K, *model.latent_shape, generator=gen)
    similarity = LatentL2Similarity()
    sims = unstaged_similarities(model, z0, noises, None, [1.0], similarity)
    for threshold in [float(sims.min()) - 1e-2, float(sims.max()) + 1e-2] + thresholds_between(sims):
        similarity.threshold = threshold
        model.counter.reset(B)
        result = check(model, z0, noises, None, SCALES, similarity)
        replicated, best_sim, best_scale = reference_decision(sims, [1.0], threshold)
        assert result.replicated.tolist() == replicated.tolist()
        torch.testing.assert_close(result.similarity, best_sim, rtol=1e-4, atol=1e-4)
        assert (result.guidance == 1.0).all()


@pytest.mark.parametrize("scales", [[1.0], [1.0, 2.0, 5.0], [3.0, 7.0], [1.0, 1.0, 4.0, 1.5]])
def test_a_failing_check_costs_one_noise_per_scale(sd_case, scales):
    model, z0, noises, cond = sd_case
    similarity = LatentL2Similarity(threshold=2.0)  # latent L2 similarity is at most 1: nothing passes
    model.counter.reset(B)
    result = check(model, z0, noises, cond, scales, similarity)
    assert not result.replicated.any()
    per_image = sum(STEPS * (1 if s == 1 else 2) for s in scales)
    assert model.counter.forwards.tolist() == [per_image] * B
    assert int(model.counter.forwards.sum()) == B * per_image
    assert model.counter.backwards.tolist() == [0] * B
    assert failing_check_forwards(scales, STEPS) == per_image  # what the benchmarks count with


def test_a_passing_check_costs_all_noises_at_every_scale(sd_case):
    model, z0, noises, cond = sd_case
    similarity = LatentL2Similarity(threshold=-np.inf)
    model.counter.reset(B)
    result = check(model, z0, noises, cond, SCALES, similarity)
    assert result.replicated.all()
    per_image = K * sum(STEPS * (1 if s == 1 else 2) for s in SCALES)
    assert model.counter.forwards.tolist() == [per_image] * B


# -- similarities -------------------------------------------------------------------------------


def test_latent_l2_is_one_for_identical_inputs_and_the_closed_form_otherwise(tiny_sd):
    gen = torch.Generator().manual_seed(2)
    target = torch.randn(3, 4, 8, 8, generator=gen)
    other = target + torch.randn(3, 4, 8, 8, generator=gen) * torch.tensor([0.0, 0.1, 1.0]).reshape(-1, 1, 1, 1)
    sim = LatentL2Similarity()(tiny_sd.adapter, other, target)
    t, o = target.double().numpy().reshape(3, -1), other.double().numpy().reshape(3, -1)
    expected = 1 - np.linalg.norm(o - t, axis=1) / np.linalg.norm(t, axis=1)
    np.testing.assert_allclose(sim.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert sim[0] == 1 and sim[1] < 1 and sim[2] < sim[1]


def tiled_l2_by_hand(a, b, tiles):
    """1 - max over tiles of the RMS of (a - b) / 2 (pixels mapped to [0, 1]), numpy loops."""
    a, b = a.double().numpy(), b.double().numpy()
    n, c, h, w = a.shape
    th, tw = h // tiles, w // tiles
    out = []
    for i in range(n):
        worst = 0.0
        for r in range(tiles):
            for q in range(tiles):
                d = (
                    a[i, :, r * th : (r + 1) * th, q * tw : (q + 1) * tw]
                    - b[i, :, r * th : (r + 1) * th, q * tw : (q + 1) * tw]
                ) / 2
                worst = max(worst, float(np.sqrt(np.mean(d**2))))
        out.append(1 - worst)
    return np.array(out)


def test_tiled_l2_takes_the_worst_tile_on_decoded_pixels(tiny_ddpm):
    model = tiny_ddpm.adapter  # decode_latents is the identity clamp: pixels are the latents
    gen = torch.Generator().manual_seed(3)
    target = torch.rand(2, 3, 16, 16, generator=gen) - 0.5
    similarity = TiledL2Similarity(tiles=4)
    same = similarity(model, target.clone(), target)
    torch.testing.assert_close(same, torch.ones(2))

    generated = target.clone()
    # Image 0: one strongly perturbed tile (row 1, col 2) and a faint change in another tile.
    bump = torch.rand(3, 4, 4, generator=gen) * 0.4
    generated[0, :, 4:8, 8:12] += bump
    generated[0, :, 12:16, 0:4] += 0.01
    # Image 1: one tile perturbed only.
    generated[1, :, 0:4, 0:4] -= 0.3
    sim = similarity(model, generated, target)
    worst_tile = float(np.sqrt(np.mean((bump.double().numpy() / 2) ** 2)))
    np.testing.assert_allclose(sim[0].item(), 1 - worst_tile, rtol=1e-5)
    np.testing.assert_allclose(sim[1].item(), 1 - 0.15, rtol=1e-5)
    np.testing.assert_allclose(sim.numpy(), tiled_l2_by_hand(generated, target, 4), rtol=1e-5)
    # The worst tile, not the whole-image RMS (which would be 4x smaller for a one-tile change).
    whole = 1 - np.sqrt(np.mean(((generated[1] - target[1]).double().numpy() / 2) ** 2))
    assert sim[1].item() < whole - 0.05
    # Symmetric, and a different tile count changes the tile size.
    torch.testing.assert_close(similarity(model, target, generated), sim)
    np.testing.assert_allclose(
        TiledL2Similarity(tiles=2)(model, generated, target).numpy(), tiled_l2_by_hand(generated, target, 2), rtol=1e-5
    )


def test_tiled_l2_compares_clamped_pixels(tiny_ddpm):
    model = tiny_ddpm.adapter
    target = torch.full((1, 3, 16, 16), 0.5)
    generated = target.clone()
    generated[:, :, :4, :4] = 5.0  # decodes to 1.0: a 0.5 pixel difference, 0.25 after /2
    sim = TiledL2Similarity(tiles=4)(model, generated, target)
    torch.testing.assert_close(sim, torch.tensor([0.75]))


def test_tiled_l2_on_sd_latents(tiny_sd):
    model = tiny_sd.adapter
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(2, *model.latent_shape, generator=gen)
    similarity = TiledL2Similarity()
    torch.testing.assert_close(similarity(model, z, z), torch.ones(2))
    other = z + torch.randn(2, *model.latent_shape, generator=gen)
    sim = similarity(model, other, z)
    np.testing.assert_allclose(
        sim.numpy(), tiled_l2_by_hand(model.decode_latents(other), model.decode_latents(z), 4), rtol=1e-5
    )
    assert (sim < 1).all()


class ChannelMean(torch.nn.Module):
    """A stand-in descriptor network: the per-channel mean of its input."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


class TinyConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def sscd_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("sscd")
    torch.jit.script(ChannelMean()).save(str(root / "mean.pt"))
    torch.manual_seed(0)
    traced = torch.jit.trace(TinyConvNet().eval(), torch.randn(1, 3, 320, 320))
    traced.save(str(root / "conv.pt"))
    return {"mean": str(root / "mean.pt"), "conv": str(root / "conv.pt")}


def test_sscd_on_a_real_torchscript_file_gives_cosine_one_for_identical_images(tiny_ddpm, sscd_files):
    model = tiny_ddpm.adapter
    similarity = SSCDSimilarity(sscd_files["conv"])
    assert similarity.threshold == 0.5 and similarity.kind == "sscd"
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    b = torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1
    torch.testing.assert_close(similarity(model, a, a.clone()), torch.ones(2), rtol=0, atol=1e-5)
    sim = similarity(model, a, b)
    assert (sim < 1 - 1e-4).all() and (sim >= -1 - 1e-6).all()
    torch.testing.assert_close(similarity(model, b, a), sim)
    torch.testing.assert_close(similarity.embed(a).norm(dim=-1), torch.ones(2))
    assert similarity.embed(a).shape == (2, 16)


def test_sscd_preprocessing_uses_imagenet_statistics_on_0_1_pixels(tiny_ddpm, sscd_files):
    """With a per-channel-mean descriptor, constant images have a closed-form cosine similarity."""
    model = tiny_ddpm.adapter
    similarity = SSCDSimilarity(sscd_files["mean"])
    grays = [-0.8, 0.0, 0.3, 0.9]
    images = torch.stack([torch.full((3, 16, 16), g) for g in grays])
    rgb = torch.tensor([[0.9, -0.2, 0.1]]).reshape(1, 3, 1, 1).expand(1, 3, 16, 16)
    images = torch.cat([images, rgb])
    mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)

    def descriptor(pixel_rgb):
        d = ((np.asarray(pixel_rgb) + 1) / 2 - mean) / std
        return d / np.linalg.norm(d)

    vectors = [descriptor([g] * 3) for g in grays] + [descriptor([0.9, -0.2, 0.1])]
    target = images[[1]].expand(len(images), -1, -1, -1)
    sim = similarity(model, images, target)
    expected = np.array([v @ vectors[1] for v in vectors])
    np.testing.assert_allclose(sim.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(expected, 3))) > 2  # the cases are distinguishable


def test_build_similarity_kinds_thresholds_and_errors(sscd_files):
    assert isinstance(build_similarity("tiled_l2"), TiledL2Similarity)
    assert build_similarity("tiled_l2").threshold == 0.9
    assert build_similarity("latent_l2", threshold=0.25).threshold == 0.25
    sscd = build_similarity("sscd", sscd_path=sscd_files["conv"], threshold=0.7)
    assert isinstance(sscd, SSCDSimilarity) and sscd.threshold == 0.7
    with pytest.raises(ValueError, match="sscd_path"):
        build_similarity("sscd")
    with pytest.raises(ValueError, match="sscd_path"):
        build_similarity("sscd", sscd_path="")
    with pytest.raises(ValueError, match="unknown similarity 'cosine'"):
        build_similarity("cosine")
    with pytest.raises(ValueError, match="unknown similarity"):
        build_similarity("SSCD", sscd_path=sscd_files["conv"])
