"""DDIM generation against diffusers' own DDIMScheduler loop, CFG by the classic formula, aligned start."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from memray.measures.sampling import aligned_start, ddim_generate
from memray.models import load_model
from memray.models.tiny import build_tiny_sd

STEPS = 6


@pytest.fixture(scope="module")
def v_model(tmp_path_factory):
    path = build_tiny_sd(tmp_path_factory.mktemp("sampling") / "tiny-sd-v", prediction_type="v_prediction", seed=1)
    adapter = load_model(str(path), device="cpu").adapter
    assert adapter.prediction_type == "v_prediction"
    return adapter


@pytest.fixture(params=["epsilon", "v_prediction"])
def sd_model(request, tiny_sd, v_model):
    return tiny_sd.adapter if request.param == "epsilon" else v_model


@torch.no_grad()
def diffusers_ddim(adapter, z_T, cond, guidance, steps, **scheduler_overrides):
    """The reference: diffusers' DDIMScheduler from the checkpoint config, raw UNet outputs, eta = 0.

    Classifier-free guidance is applied to the raw network output with the classic formula
    out_u + g (out_c - out_u), per sample.
    """
    scheduler = DDIMScheduler.from_config(adapter.scheduler.config, **scheduler_overrides)
    scheduler.set_timesteps(steps)
    n = z_T.shape[0]
    z = z_T.clone()
    for t in scheduler.timesteps:
        if cond is None:
            out = adapter.unet(z, t).sample
        else:
            out = adapter.unet(z, t, encoder_hidden_states=cond).sample
            if guidance is not None and (guidance != 1).any():
                out_u = adapter.unet(z, t, encoder_hidden_states=adapter.empty_condition(n)).sample
                g = guidance.reshape(-1, 1, 1, 1)
                out = out_u + g * (out - out_u)
        z = scheduler.step(out, t, z, eta=0.0).prev_sample
    return z


def noise(adapter, n, seed):
    return torch.randn(n, *adapter.latent_shape, generator=torch.Generator().manual_seed(seed))


def assert_close_generated(mine, ref):
    scale = ref.abs().max().item()
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-4 * max(1.0, scale))


def test_unguided_generation_matches_the_diffusers_ddim_loop(sd_model):
    n = 2
    z_T = noise(sd_model, n, 0)
    sd_model.counter.reset(n)
    with torch.no_grad():
        mine = ddim_generate(sd_model, z_T, sd_model.empty_condition(n), torch.ones(n), torch.arange(n), STEPS)
    ref = diffusers_ddim(sd_model, z_T, sd_model.empty_condition(n), None, STEPS)
    assert_close_generated(mine, ref)
    # Guidance 1 needs no unconditional branch: one UNet forward per sample and step.
    assert sd_model.counter.forwards.tolist() == [STEPS] * n
    # The generation moved away from the start (the comparison is not vacuous).
    assert (mine - z_T).abs().max() > 1e-2


def test_unguided_generation_with_a_prompt_matches_the_diffusers_ddim_loop(sd_model):
    n = 2
    z_T = noise(sd_model, n, 1)
    cond = sd_model.encode_ids(sd_model.token_ids(["a red circle", "a cat on the house"]))
    sd_model.counter.reset(n)
    with torch.no_grad():
        mine = ddim_generate(sd_model, z_T, cond, torch.ones(n), torch.arange(n), STEPS)
    assert_close_generated(mine, diffusers_ddim(sd_model, z_T, cond, None, STEPS))


@pytest.mark.parametrize("guidance", [[3.0, 3.0], [1.0, 7.5, 2.0, 0.0]])
def test_guided_generation_matches_classic_cfg_in_the_diffusers_loop(sd_model, guidance):
    n = len(guidance)
    g = torch.tensor(guidance)
    z_T = noise(sd_model, n, 2)
    prompts = ["a red circle", "a cat", "blue stripes", "the dog in the tree"][:n]
    cond = sd_model.encode_ids(sd_model.token_ids(prompts))
    sd_model.counter.reset(n)
    with torch.no_grad():
        mine = ddim_generate(sd_model, z_T, cond, g, torch.arange(n), STEPS)
    ref = diffusers_ddim(sd_model, z_T, cond, g, STEPS)
    assert_close_generated(mine, ref)
    # The guided samples really differ from unguided ones (guidance was applied).
    unguided = diffusers_ddim(sd_model, z_T, cond, None, STEPS)
    for i, scale in enumerate(guidance):
        differs = (ref[i] - unguided[i]).abs().max() > 1e-3
        assert differs == (scale != 1.0)
    # Unconditional branch only for the samples that need it.
    assert sd_model.counter.forwards.tolist() == [STEPS * (1 if s == 1 else 2) for s in guidance]


def test_more_steps_also_match(tiny_sd):
    adapter = tiny_sd.adapter
    z_T = noise(adapter, 1, 3)
    adapter.counter.reset(1)
    with torch.no_grad():
        mine = ddim_generate(adapter, z_T, adapter.empty_condition(1), torch.ones(1), torch.arange(1), 10)
    assert_close_generated(mine, diffusers_ddim(adapter, z_T, adapter.empty_condition(1), None, 10))


@pytest.fixture(scope="module")
def unclipped_ddpm(tiny_ddpm_dir, tmp_path_factory):
    """The tiny DDPM with clip_sample switched off in its scheduler config."""
    path = tmp_path_factory.mktemp("unclipped") / "ddpm"
    shutil.copytree(tiny_ddpm_dir, path)
    config_file = path / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clip_sample": False}))
    return load_model(str(path), device="cpu")


def test_unconditional_ddpm_generation_matches_the_diffusers_loop_without_clipping(unclipped_ddpm):
    adapter = unclipped_ddpm.adapter
    assert adapter.clip_sample_range is None
    n = 2
    z_T = noise(adapter, n, 4)
    adapter.counter.reset(n)
    with torch.no_grad():
        mine = ddim_generate(adapter, z_T, None, torch.ones(n), torch.arange(n), STEPS)
    assert_close_generated(mine, diffusers_ddim(adapter, z_T, None, None, STEPS, clip_sample=False))
    assert adapter.counter.forwards.tolist() == [STEPS] * n


def test_unconditional_ddpm_generation_matches_the_diffusers_loop_with_the_checkpoint_config(tiny_ddpm):
    adapter = tiny_ddpm.adapter
    assert adapter.scheduler.config.clip_sample  # DDPMScheduler's default, kept by google/ddpm-* configs
    n = 2
    z_T = noise(adapter, n, 4)
    adapter.counter.reset(n)
    with torch.no_grad():
        mine = ddim_generate(adapter, z_T, None, torch.ones(n), torch.arange(n), STEPS)
    assert_close_generated(mine, diffusers_ddim(adapter, z_T, None, None, STEPS))


# -- aligned start ------------------------------------------------------------------------------


def abar_by_hand(schedule: str, t: int) -> float:
    if schedule == "scaled_linear":  # build_tiny_sd: SD's schedule
        betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    else:  # build_tiny_ddpm: linear 1e-4 .. 0.02
        betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return float(np.cumprod(1 - betas)[t])


@pytest.mark.parametrize("steps", [5, 10, 50])
def test_aligned_start_is_the_forward_process_at_the_first_ddim_timestep(tiny_sd, tiny_ddpm, steps):
    cases = [
        # "leading" spacing: t_first = (T // n) (n - 1) + steps_offset
        (tiny_sd.adapter, "scaled_linear", (1000 // steps) * (steps - 1) + 1),
        (tiny_ddpm.adapter, "linear", (1000 // steps) * (steps - 1)),
    ]
    for adapter, schedule, t_first in cases:
        reference = DDIMScheduler.from_config(adapter.scheduler.config)
        reference.set_timesteps(steps)
        assert int(reference.timesteps[0]) == t_first
        gen = torch.Generator().manual_seed(steps)
        z0 = torch.randn(3, *adapter.latent_shape, generator=gen)
        eps = torch.randn(3, *adapter.latent_shape, generator=gen)
        a = abar_by_hand(schedule, t_first)
        expected = a**0.5 * z0.double() + (1 - a) ** 0.5 * eps.double()
        got = aligned_start(adapter, z0, eps, steps)
        assert got.shape == z0.shape
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)
        # Not just the noise: the z0 term is there.
        assert (got - eps).abs().max() > 1e-2
