"""Invariants of the measures and the runner, on the tiny checkpoints (no mocks of memray code).

- frozen networks: no measure leaves a gradient on (or unfreezes) a UNet/VAE/text-encoder weight,
  while gradients do reach the inversion parameters (autograd, and finite differences in float64);
- evaluation counts follow the call schedule exactly, and an image that finishes stops costing;
- results of an image do not depend on the rest of its batch, and depend on the seed;
- a non-finite image is isolated: the others get exactly their stand-alone results.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import png_bytes, threshold_targets, tiny_budgets

from memray.auditing.runner import audit_batch
from memray.data.images import decode_image, to_model_tensor
from memray.data.records import ImageInput
from memray.measures import rng
from memray.measures.invmm import _PromptDistribution, invmm
from memray.measures.noise_inversion import invert_noise
from memray.measures.prompt_inversion import soft_prompt_inversion
from memray.measures.settings import NoiseInversionConfig, SoftPromptConfig, WenConfig
from memray.measures.similarity import LatentL2Similarity
from memray.measures.stats import kl_to_standard_normal
from memray.measures.wen import wen_screen
from memray.measures.z0_error import sampled_z0_error, z0_prediction_error

TINY_INVMM = tiny_budgets().invmm


# -- helpers ------------------------------------------------------------------------------------


def image_z0(model, seeds) -> torch.Tensor:
    """z0 of real decoded PNG images (through the same decoding path the runner uses)."""
    pixels = [to_model_tensor(decode_image(png_bytes(s, size=(40, 48))), model.resolution) for s in seeds]
    return model.encode_images(torch.stack(pixels).to(model.device))


class MarkedSimilarity:
    """A similarity (features, compare) that says 1.0 exactly for targets equal to a marked z0."""

    kind = "marked"

    def __init__(self, marked: torch.Tensor, threshold: float = 0.5):
        self.marked, self.threshold = marked, threshold

    def features(self, model, z0):
        return z0

    def compare(self, generated, target):
        return (target.unsqueeze(1) == self.marked.unsqueeze(0)).flatten(2).all(2).any(1).float()


def frozen_state(model):
    nets = {"unet": model.unet}
    for name in ("vae", "text_encoder"):
        if hasattr(model, name):
            nets[name] = getattr(model, name)
    return {f"{name}.{p}": param for name, net in nets.items() for p, param in net.named_parameters()}


def assert_invmm_rows_equal(a, rows_a, b, rows_b, *, exact=False, atol=1e-5):
    """Per-image fields of two InvMMResults agree on the given rows (float32 noise of batch shapes: atol)."""
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-4, atol=atol)
    for field in ("replicated", "steps", "finite"):
        np.testing.assert_array_equal(getattr(a, field)[rows_a], getattr(b, field)[rows_b], err_msg=field)
    for field in ("kl", "similarity", "guidance", "kl_weight", "reconstruction"):
        np.testing.assert_allclose(
            getattr(a, field)[rows_a], getattr(b, field)[rows_b], equal_nan=True, err_msg=field, **tol
        )
    torch.testing.assert_close(a.mu[rows_a], b.mu[rows_b], **tol)
    torch.testing.assert_close(a.log_var[rows_a], b.log_var[rows_b], **tol)
    assert [a.prompts[i] for i in rows_a] == [b.prompts[i] for i in rows_b]
    if a.condition is not None:
        torch.testing.assert_close(a.condition[rows_a], b.condition[rows_b], **tol)


def run_invmm(model, z0, ids, similarity, config=TINY_INVMM, seed=0, start_ids=None, slots=None, counting=True):
    model.counter.reset(len(ids))
    gens = rng.image_generators(ids, seed, "invmm", model.device)
    targets = threshold_targets(model, similarity, z0)
    owner = torch.arange(len(ids), device=model.device)
    return invmm(
        model, z0, gens, owner, config, similarity, targets, start_ids=start_ids, slots=slots, counting=counting
    )


# -- frozen networks, gradients -------------------------------------------------------------------


def test_measures_leave_every_network_weight_frozen_and_gradient_free(tiny_sd):
    model = tiny_sd.adapter
    params = frozen_state(model)
    assert params and all(not p.requires_grad and p.grad is None for p in params.values())
    before = {name: p.detach().clone() for name, p in params.items()}
    z0 = image_z0(model, [11, 12])
    owner = torch.arange(2)

    result = run_invmm(model, z0, ["f0", "f1"], LatentL2Similarity(threshold=2.0))
    assert result.finite.all()
    # the optimisation did move its own parameters
    assert result.mu.abs().sum() > 0 and result.log_var.abs().sum() > 0
    gens = rng.image_generators(["f0", "f1"], 0, "x")
    soft = soft_prompt_inversion(model, z0, gens, owner, SoftPromptConfig(steps=2, samples_per_step=2))
    assert soft.finite.all()
    cfg = NoiseInversionConfig(samples_per_step=2, steps=2, regularized_steps=2, ks_samples=4)
    for regularized in (True, False):
        res = invert_noise(model, z0, model.empty_condition(2), gens, owner, cfg, regularized=regularized)
        assert res.finite.all()
    wen = wen_screen(model, ["a red cat", "a blue dog"], gens, owner, WenConfig(generations=1, sampling_steps=3))
    assert np.isfinite(wen.score).all()

    for name, p in params.items():
        assert not p.requires_grad, f"{name} was made trainable"
        assert p.grad is None, f"{name} received a weight gradient"
        assert torch.equal(p.detach(), before[name]), f"{name} changed"


def test_invmm_loss_gradient_reaches_mu_log_var_and_logits(tiny_sd):
    model = tiny_sd.adapter
    cfg, s, batch = TINY_INVMM, TINY_INVMM.samples_per_step, 2
    z0 = image_z0(model, [21, 22])
    owner = torch.arange(batch)
    gens = rng.image_generators(["g0", "g1"], 0, "invmm")
    prompt = _PromptDistribution(model, cfg, batch, model.num_free_slots, model.device)
    # a point away from the all-zero start, so the KL term has a gradient too
    mu = (0.1 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    log_var = torch.full_like(z0, -0.2).requires_grad_()
    logits = prompt.logits.clone().requires_grad_()
    noise = rng.randn_per_image(gens, (s, *z0.shape[1:]))
    t = rng.randint_per_image(gens, model.num_train_timesteps, (s,)).flatten()
    eps = (mu.unsqueeze(1) + (0.5 * log_var).exp().unsqueeze(1) * noise).flatten(0, 1)
    cond = prompt.sampled_condition(logits, gens, s, torch.arange(batch))
    model.counter.reset(batch)
    recon = sampled_z0_error(model, z0.repeat_interleave(s, 0), eps, t, cond, owner.repeat_interleave(s))
    recon = recon.reshape(batch, s).mean(1)
    weight = torch.full((batch,), cfg.kl_weight_init)
    loss = (recon + weight * kl_to_standard_normal(mu, log_var)).sum()
    grads = torch.autograd.grad(loss, [mu, log_var, logits])
    for name, grad in zip(("mu", "log_var", "logits"), grads):
        assert torch.isfinite(grad).all(), name
        # every image's parameters receive a gradient of their own
        per_image = grad.flatten(1).abs().sum(1)
        assert (per_image > 0).all(), f"no gradient reaches {name}: {per_image}"
    # the UNet evaluations were counted as forwards and backwards of their owners
    np.testing.assert_array_equal(model.counter.forwards, [s, s])
    np.testing.assert_array_equal(model.counter.backwards, [s, s])


def test_z0_error_gradient_in_eps_matches_finite_differences_in_float64(tiny_ddpm):
    model = copy.deepcopy(tiny_ddpm.adapter)
    model.unet.double()
    gen = torch.Generator().manual_seed(0)
    n, k = 2, 3
    z0 = torch.rand(n, *model.latent_shape, generator=gen, dtype=torch.float64) * 2 - 1
    base = torch.randn(n, *model.latent_shape, generator=gen, dtype=torch.float64)
    directions = torch.randn(n, k, *model.latent_shape, generator=gen, dtype=torch.float64)
    timesteps = torch.tensor([50, 300])
    owner = torch.arange(n)
    model.counter.reset(n)

    def error_along_directions(c):
        # a small function of eps: eps = base + sum_j c_j d_j per sample, so the Jacobian (n, n*k)
        # is well above the float32 rounding of the adapter's output (predict returns float32)
        eps = base + torch.einsum("nk,nk...->n...", c, directions)
        return z0_prediction_error(model, z0, eps, None, timesteps, owner)

    c = torch.zeros(n, k, dtype=torch.float64, requires_grad=True)
    jacobian = torch.autograd.functional.jacobian(error_along_directions, c)
    assert jacobian.abs().amax() > 1e-2  # the check below is not vacuous at atol 1e-4
    assert torch.autograd.gradcheck(error_along_directions, (c,), eps=1e-3, atol=1e-4, rtol=1e-3)


# -- evaluation counts ---------------------------------------------------------------------------


def assert_z0_error_counts_n_times_k_evaluations_per_owner(model):
    """z0_prediction_error charges n noises x k timesteps forwards to each owner, and as many backwards."""
    batch, n, timesteps = 2, 3, model.measure_timesteps(4)
    z0 = image_z0(model, [31, 32]).repeat_interleave(n, 0)
    eps = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    owner = torch.arange(batch).repeat_interleave(n)
    model.counter.reset(batch)
    with torch.no_grad():
        err = z0_prediction_error(model, z0, eps, model.empty_condition(batch * n), timesteps, owner)
    assert err.shape == (batch * n,) and torch.isfinite(err).all()
    np.testing.assert_array_equal(model.counter.forwards, [n * len(timesteps)] * batch)
    np.testing.assert_array_equal(model.counter.backwards, [0, 0])
    # with a gradient in eps, each forward is matched by exactly one backward
    model.counter.reset(batch)
    eps = eps.clone().requires_grad_()
    z0_prediction_error(model, z0, eps, model.empty_condition(batch * n), timesteps, owner).sum().backward()
    np.testing.assert_array_equal(model.counter.forwards, [n * len(timesteps)] * batch)
    np.testing.assert_array_equal(model.counter.backwards, [n * len(timesteps)] * batch)


def test_z0_prediction_error_counts_n_times_k_forwards_per_owner(tiny_sd):
    assert_z0_error_counts_n_times_k_evaluations_per_owner(tiny_sd.adapter)


@pytest.mark.parametrize("regularized", [True, False])
def test_invert_noise_counts_steps_times_samples(tiny_sd, regularized):
    model = tiny_sd.adapter
    cfg = NoiseInversionConfig(samples_per_step=2, steps=3, regularized_steps=4, ks_samples=4)
    steps = cfg.regularized_steps if regularized else cfg.steps
    z0 = image_z0(model, [41, 42])
    gens = rng.image_generators(["n0", "n1"], 0, "noise")
    model.counter.reset(2)
    res = invert_noise(model, z0, model.empty_condition(2), gens, torch.arange(2), cfg, regularized=regularized)
    assert res.finite.all()
    expected = steps * cfg.samples_per_step
    np.testing.assert_array_equal(model.counter.forwards, [expected, expected])
    np.testing.assert_array_equal(model.counter.backwards, [expected, expected])


def _check_cost(cfg, scales, noises):
    """UNet forwards of one success check generating `noises` samples at each scale."""
    return sum(noises * cfg.sampling_steps * (1 if scale == 1 else 2) for scale in scales)


def _confirm_cost(cfg, result) -> np.ndarray:
    """UNet forwards of each replicated image's confirmation: confirm_noises samples at its scale."""
    return np.where(result.replicated, _check_cost(cfg, [1.0], cfg.confirm_noises), 0) * np.where(
        result.guidance == 1, 1, 2
    )


def test_invmm_counts_when_never_replicating(tiny_sd):
    model, cfg = tiny_sd.adapter, TINY_INVMM
    z0 = image_z0(model, [51, 52])
    result = run_invmm(model, z0, ["c0", "c1"], LatentL2Similarity(threshold=2.0))
    s = cfg.samples_per_step
    assert not result.replicated.any() and np.isnan(result.kl).all()
    np.testing.assert_array_equal(result.steps, [cfg.steps] * 2)
    checks = cfg.steps // cfg.check_every + 1  # and one at the start
    forwards = cfg.steps * s + checks * _check_cost(cfg, cfg.guidance_scales, 1)
    np.testing.assert_array_equal(model.counter.forwards, [forwards] * 2)
    np.testing.assert_array_equal(model.counter.backwards, [cfg.steps * s] * 2)


def test_invmm_replicating_at_the_start_scores_kl_zero_and_checks_its_readable_prompt(tiny_sd):
    model, cfg = tiny_sd.adapter, TINY_INVMM
    z0 = image_z0(model, [53, 54])
    # latent L2 similarity is unbounded below (about -50 for the tiny SD): -1e9 always passes
    result = run_invmm(model, z0, ["r0", "r1"], LatentL2Similarity(threshold=-1e9))
    assert result.replicated.all() and result.finite.all() and result.prompt_replicated.all()
    np.testing.assert_array_equal(result.steps, [0, 0])
    np.testing.assert_array_equal(result.kl, [0.0, 0.0])  # N(0, I) itself
    assert all(isinstance(p, str) for p in result.prompts)
    # the expected token mix, then the readable prompt, each with all K noises at every scale; the
    # confirmation of the count at the deciding scale
    forwards = 2 * _check_cost(cfg, cfg.guidance_scales, cfg.check_noises)
    np.testing.assert_array_equal(model.counter.forwards, forwards + _confirm_cost(cfg, result))
    np.testing.assert_array_equal(result.replicas, [cfg.confirm_noises] * 2)
    np.testing.assert_array_equal(result.samples, [cfg.confirm_noises] * 2)
    np.testing.assert_array_equal(model.counter.backwards, [0, 0])


def test_invmm_counts_and_score_when_replicating_at_the_first_check_after_steps(tiny_sd):
    model, cfg = tiny_sd.adapter, dataclasses.replace(TINY_INVMM, check_at_start=False)
    z0 = image_z0(model, [53, 54])
    result = run_invmm(model, z0, ["r0", "r1"], LatentL2Similarity(threshold=-1e9), config=cfg)
    s = cfg.samples_per_step
    assert result.replicated.all() and result.finite.all()
    np.testing.assert_array_equal(result.steps, [cfg.check_every] * 2)
    torch.testing.assert_close(
        torch.as_tensor(result.kl), kl_to_standard_normal(result.mu, result.log_var), rtol=0, atol=0
    )
    assert np.isfinite(result.kl).all() and (result.kl > 0).all()
    forwards = cfg.check_every * s + 2 * _check_cost(cfg, cfg.guidance_scales, cfg.check_noises)
    np.testing.assert_array_equal(model.counter.forwards, forwards + _confirm_cost(cfg, result))
    np.testing.assert_array_equal(model.counter.backwards, [cfg.check_every * s] * 2)


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_ddpm"])
def test_an_image_that_replicates_stops_costing_and_does_not_disturb_the_other(request, fixture):
    # no check at the start, so the early image costs optimisation steps before it leaves
    model, cfg = request.getfixturevalue(fixture).adapter, dataclasses.replace(TINY_INVMM, check_at_start=False)
    scales = cfg.guidance_scales if model.is_conditional else (1.0,)
    z0 = image_z0(model, [61, 62])
    similarity = MarkedSimilarity(z0[:1].clone())
    both = run_invmm(model, z0, ["early", "late"], similarity, config=cfg)
    counts = model.counter.forwards.copy(), model.counter.backwards.copy()
    s = cfg.samples_per_step

    assert both.replicated.tolist() == [True, False]
    np.testing.assert_array_equal(both.steps, [cfg.check_every, cfg.steps])
    assert both.kl[0] == pytest.approx(float(kl_to_standard_normal(both.mu[:1], both.log_var[:1])[0]), abs=0)
    assert math.isnan(both.kl[1])
    readable = _check_cost(cfg, scales, cfg.check_noises) if model.is_conditional else 0
    early = cfg.check_every * s + _check_cost(cfg, scales, cfg.check_noises) + readable
    late = cfg.steps * s + (cfg.steps // cfg.check_every) * _check_cost(cfg, scales, 1)
    np.testing.assert_array_equal(counts[0], np.array([early, late]) + _confirm_cost(cfg, both))
    np.testing.assert_array_equal(counts[1], [cfg.check_every * s, cfg.steps * s])

    alone = run_invmm(model, z0[1:], ["late"], similarity, config=cfg)
    assert_invmm_rows_equal(both, [1], alone, [0])
    np.testing.assert_array_equal(model.counter.forwards, [late])


# -- batch composition and seeds ----------------------------------------------------------------

IGNORED_FIELDS = {"seconds", "run_id", "audited_at"}


def assert_rows_match(a, b, *, exact=False):
    """Every field of two AuditRows agrees: numbers within tolerance, everything else identical."""
    for field in dataclasses.fields(a):
        if field.name in IGNORED_FIELDS:
            continue
        x, y = getattr(a, field.name), getattr(b, field.name)
        if field.name == "wen_tokens" and x is not None and y is not None:
            # JSON [[token, attribution], ...]: same tokens, attributions within tolerance
            x, y = json.loads(x), json.loads(y)
            assert [t for t, _ in x] == [t for t, _ in y], field.name
            np.testing.assert_allclose(
                [v for _, v in x], [v for _, v in y], rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5
            )
            continue
        if isinstance(x, list) and isinstance(y, list):  # the error quantiles
            np.testing.assert_allclose(x, y, rtol=0 if exact else 1e-4, atol=0 if exact else 1e-5, err_msg=field.name)
            continue
        if isinstance(x, float) and not isinstance(x, bool) and isinstance(y, float):
            if exact:
                assert x == y, f"{field.name}: {x} != {y}"
            else:
                assert math.isclose(x, y, rel_tol=1e-4, abs_tol=1e-5), f"{field.name}: {x} != {y}"
        else:
            assert x == y, f"{field.name}: {x!r} != {y!r}"


BATCH = [
    ImageInput(f"img-{i}", data=png_bytes(100 + i, size=(40 + 2 * i, 36)), caption=cap)
    for i, cap in enumerate(
        ["a red cat", None, "a blue dog on the tree", None, "photo of a house", "small square", None, "the sky"]
    )
]
TARGET = 2  # image A sits in the middle of the batch of 8


@pytest.fixture(scope="module")
def alone_audit(tiny_sd):
    return audit_batch(tiny_sd, [BATCH[TARGET]], tiny_budgets())[0]


def test_runner_row_is_the_same_alone_and_inside_a_batch_of_8_in_3_slots(tiny_sd, alone_audit):
    # 3 slots: InvMM's continuous batching hands freed slots on, the other measures run in chunks of 3
    batch = audit_batch(tiny_sd, BATCH, tiny_budgets(), slots=3)
    assert [a.row.image_id for a in batch] == [inp.image_id for inp in BATCH]
    assert all(a.row.status == "ok" for a in batch), [a.row.error for a in batch]
    alone, inside = alone_audit.row, batch[TARGET].row
    assert alone.status == "ok" and alone.verdict is not None
    assert alone.z0_error is not None and alone.invmm_steps is not None and alone.wen_score is not None
    assert_rows_match(alone, inside)
    torch.testing.assert_close(alone_audit.invmm_mu, batch[TARGET].invmm_mu, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(alone_audit.err_cond, batch[TARGET].err_cond, rtol=1e-4, atol=1e-5)
    # different images do get different rows (the comparison above is not vacuous)
    assert batch[0].row.z0_error != inside.z0_error


def test_same_image_and_seed_give_identical_rows(tiny_sd, alone_audit):
    again = audit_batch(tiny_sd, [BATCH[TARGET]], tiny_budgets())[0]
    assert_rows_match(alone_audit.row, again.row, exact=True)
    torch.testing.assert_close(alone_audit.invmm_mu, again.invmm_mu, rtol=0, atol=0)


def test_a_different_seed_gives_different_invmm_values(tiny_sd, alone_audit):
    other = audit_batch(tiny_sd, [BATCH[TARGET]], tiny_budgets().replace(seed=1))[0]
    assert other.row.status == "ok"
    assert other.row.config_hash != alone_audit.row.config_hash
    assert other.row.invmm_similarity != alone_audit.row.invmm_similarity
    assert not torch.allclose(other.invmm_mu, alone_audit.invmm_mu)


def test_invmm_on_the_ddpm_is_batch_invariant_and_seeded(tiny_ddpm):
    model = tiny_ddpm.adapter
    ids = [f"d{i}" for i in range(5)]
    z0 = image_z0(model, range(70, 75))
    # images 0 and 3 replicate at the first check and leave the batch; the target (2) never does
    similarity = MarkedSimilarity(z0[[0, 3]].clone())
    batch = run_invmm(model, z0, ids, similarity)
    assert batch.replicated.tolist() == [True, False, False, True, False]
    alone = run_invmm(model, z0[2:3], ids[2:3], similarity)
    assert_invmm_rows_equal(batch, [2], alone, [0])
    again = run_invmm(model, z0[2:3], ids[2:3], similarity)
    assert_invmm_rows_equal(again, [0], alone, [0], exact=True)
    reseeded = run_invmm(model, z0[2:3], ids[2:3], similarity, seed=1)
    assert not torch.allclose(reseeded.mu, alone.mu)
    assert reseeded.reconstruction[0] != alone.reconstruction[0]


# -- non-finite isolation ------------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["tiny_ddpm", "tiny_sd"])
def test_invmm_isolates_a_nan_image(request, fixture):
    model = request.getfixturevalue(fixture).adapter
    z0 = image_z0(model, [81, 82, 83])
    z0[1] = torch.nan
    ids = ["p", "q", "r"]
    similarity = LatentL2Similarity(threshold=2.0)
    three = run_invmm(model, z0, ids, similarity)
    assert three.finite.tolist() == [True, False, True]
    assert not three.replicated[1]
    two = run_invmm(model, z0[[0, 2]], ["p", "r"], similarity)
    assert two.finite.all()
    assert_invmm_rows_equal(three, [0, 2], two, [0, 1])


@pytest.mark.parametrize("regularized", [True, False])
def test_invert_noise_isolates_a_nan_image(tiny_ddpm, regularized):
    model = tiny_ddpm.adapter
    cfg = NoiseInversionConfig(samples_per_step=2, steps=3, regularized_steps=3, ks_samples=8)
    z0 = image_z0(model, [84, 85, 86])
    z0[1] = torch.nan

    def run(z, ids):
        model.counter.reset(len(ids))
        gens = rng.image_generators(ids, 0, "noise_reg", model.device)
        return invert_noise(model, z, None, gens, torch.arange(len(ids)), cfg, regularized=regularized)

    three = run(z0, ["p", "q", "r"])
    two = run(z0[[0, 2]], ["p", "r"])
    assert three.finite.tolist() == [True, False, True]
    assert two.finite.all()
    for field in ("mu_mean", "sigma2_mean", "ks_p", "final_error", "kl"):
        np.testing.assert_allclose(
            getattr(three, field)[[0, 2]], getattr(two, field), rtol=1e-4, atol=1e-6, equal_nan=True, err_msg=field
        )
    torch.testing.assert_close(three.noise[[0, 2]], two.noise, rtol=1e-4, atol=1e-5)
    if regularized:
        torch.testing.assert_close(three.log_var[[0, 2]], two.log_var, rtol=1e-4, atol=1e-5)


def test_soft_prompt_inversion_isolates_a_nan_image(tiny_sd):
    model = tiny_sd.adapter
    cfg = SoftPromptConfig(steps=3, samples_per_step=2)
    z0 = image_z0(model, [87, 88, 89])
    z0[1] = torch.nan

    def run(z, ids):
        model.counter.reset(len(ids))
        gens = rng.image_generators(ids, 0, "soft_prompt", model.device)
        return soft_prompt_inversion(model, z, gens, torch.arange(len(ids)), cfg)

    three = run(z0, ["p", "q", "r"])
    two = run(z0[[0, 2]], ["p", "r"])
    assert three.finite.tolist() == [True, False, True] and two.finite.all()
    np.testing.assert_allclose(three.final_error[[0, 2]], two.final_error, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(three.norm[[0, 2]], two.norm, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(three.embeddings[[0, 2]], two.embeddings, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, measure",
    [({"invmm": {"lr": 1e38}}, "InvMM"), ({"noise_inversion": {"lr": 1e38}}, "noise inversion")],
)
def test_runner_turns_a_diverging_optimisation_into_error_rows(tiny_sd, change, measure):
    config = tiny_budgets().replace(**change)
    items = [ImageInput(f"div-{i}", data=png_bytes(90 + i), caption="a cat") for i in range(2)]
    audits = audit_batch(tiny_sd, items, config)
    for a in audits:
        row = a.row
        assert row.status == "error", (row.status, row.error)
        assert "non-finite" in row.error and measure in row.error, row.error
        assert row.image_sha256 is not None and row.unet_forwards > 0 and row.seconds is not None
        assert row.verdict is None


# -- building blocks the invariants rest on --------------------------------------------------------


def test_row_adam_matches_torch_adam_per_row_whatever_the_batch_schedule():
    from memray.measures.optim import RowAdam

    gen = torch.Generator().manual_seed(0)
    # float64: in float32 the two differ by rounding only (beta ** steps in float32 vs Python floats)
    start = torch.randn(3, 4, 5, generator=gen, dtype=torch.float64)
    grads = torch.randn(6, 3, 4, 5, generator=gen, dtype=torch.float64)
    # row 0 steps every time, row 1 only on odd steps, row 2 joins late (steps 3..5)
    schedule = [[0], [0, 1], [0], [0, 1, 2], [0, 2], [0, 1, 2]]
    param = start.clone()
    opt = RowAdam(param, weight_decay=0.01)
    for step, rows in enumerate(schedule):
        index = torch.tensor(rows)
        opt.step(index, grads[step, index], 0.1)
    for row in range(3):
        ref = start[row].clone().requires_grad_()
        torch_opt = torch.optim.Adam([ref], lr=0.1, weight_decay=0.01)
        for step, rows in enumerate(schedule):
            if row in rows:
                ref.grad = grads[step, row].clone()
                torch_opt.step()
        torch.testing.assert_close(param[row], ref.detach(), rtol=1e-12, atol=1e-12)


def test_staged_replication_check_decides_like_generating_all_k_at_every_scale(tiny_sd):
    from memray.measures.replication import replication_check
    from memray.measures.sampling import ddim_generate

    model = tiny_sd.adapter
    scales, k, steps = (1.0, 2.0, 4.0), 3, 3
    z0 = image_z0(model, [91, 92, 93])
    batch = len(z0)
    noises = torch.randn(batch, k, *z0.shape[1:], generator=torch.Generator().manual_seed(5))
    cond = model.encode_ids(model.token_ids(["a red cat", "a dog", "blue sky"])).detach()
    similarity = LatentL2Similarity()
    # brute force: every (image, noise, scale), one sample at a time
    full = torch.zeros(batch, k, len(scales))
    model.counter.reset(1)
    with torch.no_grad():
        for i in range(batch):
            for j in range(k):
                for m, scale in enumerate(scales):
                    z_T = noises[i, j : j + 1]
                    gen = ddim_generate(
                        model, z_T, cond[i : i + 1], torch.tensor([scale]), torch.zeros(1, dtype=torch.long), steps
                    )
                    full[i, j, m] = similarity(model, gen, z0[i : i + 1])[0]
    # a threshold half-way between two first-noise values, so some pairs pass the first stage
    values = full[:, 0].flatten().sort().values
    gaps = values[1:] - values[:-1]
    mid = int(gaps[1:-1].argmax()) + 1
    similarity.threshold = float((values[mid] + values[mid + 1]) / 2)
    minimum = full.amin(1)
    expected = (minimum >= similarity.threshold).any(1)

    model.counter.reset(batch)
    targets = threshold_targets(model, similarity, z0)
    check = replication_check(
        model, z0, noises, cond, scales, similarity, targets, torch.arange(batch), num_steps=steps
    )
    assert check.replicated.tolist() == expected.tolist()
    passed_first = full[:, 0] >= similarity.threshold
    assert passed_first.any() and not passed_first.all()
    for i in range(batch):
        if expected[i]:
            best = torch.where(minimum[i] >= similarity.threshold, minimum[i], -torch.inf).argmax()
            assert float(check.similarity[i]) == pytest.approx(float(minimum[i, best]), rel=1e-4, abs=1e-4)
            assert float(check.guidance[i]) == scales[best]
    # staged cost: the first noise at every scale, the other k - 1 only where the first passed
    cost = torch.tensor([1 if s == 1 else 2 for s in scales]) * steps
    expected_forwards = (cost.sum() + ((k - 1) * passed_first.long() * cost).sum(1)).tolist()
    np.testing.assert_array_equal(model.counter.forwards, expected_forwards)
