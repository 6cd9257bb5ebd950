"""DDIM generation (eta = 0) with classifier-free guidance, from the aligned start.

Aligned start (docs/science.md, departures): z_T = sqrt(abar_T) z0 + sqrt(1 - abar_T) eps rather than eps
itself; at SD's terminal SNR (about 0.0047) the small z0 term changes the generated image.
"""

from __future__ import annotations

import torch

from memray.measures.parameterization import noisy_sample


def aligned_start(model, z0: torch.Tensor, eps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """z_T for the first DDIM timestep: the forward process applied to z0 with noise eps."""
    t_first = model.sampling_timesteps(num_steps)[0]
    return noisy_sample(z0, eps, model.alphas_cumprod[t_first].expand(z0.shape[0]))


def guided_prediction(model, z_t, t, cond, guidance, owner):
    """eps and z0 predictions with classifier-free guidance, one UNet call for both branches.

    Only samples with guidance != 1 need the unconditional branch; the combination is linear
    in the network output, so it is the same in eps and z0 space for every prediction type.
    """
    n = z_t.shape[0]
    t = t.expand(n) if t.ndim == 0 else t
    if cond is None:
        return model.predict(z_t, t, None, owner)
    guided = (guidance != 1).nonzero().flatten()
    z_in = torch.cat([z_t, z_t[guided]])
    cond_in = torch.cat([cond, model.empty_condition(len(guided))])
    pred = model.predict(z_in, torch.cat([t, t[guided]]), cond_in, torch.cat([owner, owner[guided]]))
    eps, z0 = pred.eps[:n].clone(), pred.z0[:n].clone()
    scale = guidance[guided].reshape(-1, *([1] * (z_t.ndim - 1)))
    eps[guided] = pred.eps[n:] + scale * (eps[guided] - pred.eps[n:])
    z0[guided] = pred.z0[n:] + scale * (z0[guided] - pred.z0[n:])
    return type(pred)(eps=eps, z0=z0)


def ddim_step(model, timesteps: torch.Tensor, i: int, eps: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
    """eta = 0 update from timesteps[i] to the next one: sqrt(abar_prev) z0_hat + sqrt(1 - abar_prev) eps_hat.

    z0_hat is clipped where the scheduler config says so; eps_hat is not recomputed from the
    clipped z0_hat (diffusers' DDIMScheduler.step default, use_clipped_model_output=False).
    """
    if model.clip_sample_range is not None:
        z0 = z0.clamp(-model.clip_sample_range, model.clip_sample_range)
    abar_prev = model.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else model.final_alpha_cumprod()
    return abar_prev.sqrt() * z0 + (1 - abar_prev).sqrt() * eps


def ddim_generate(model, z_T, cond, guidance, owner, num_steps: int = 50) -> torch.Tensor:
    """Deterministic DDIM from z_T; cond (n, L, D) or None, guidance (n,) scales. Returns z0."""
    timesteps = model.sampling_timesteps(num_steps)
    z = z_T
    for i, t in enumerate(timesteps):
        pred = guided_prediction(model, z, t, cond, guidance, owner)
        z = ddim_step(model, timesteps, i, pred.eps, pred.z0)
    return z
