"""Deterministic generation with classifier-free guidance, from the aligned start.

The update is the model's (protocol.DiffusionModel.sampler_step): DDIM with eta = 0 on a variance
preserving schedule, the Euler step on a flow-matching one; both re-noise z0_hat with eps_hat at the
next level, so guidance combines (eps, z0) the same way for both.

Aligned start (docs/science.md, departures): z_T = sqrt(abar_T) z0 + sqrt(1 - abar_T) eps rather than eps
itself; at SD's terminal SNR (about 0.0047) the small z0 term changes the generated image.
"""

from __future__ import annotations

import torch


def aligned_start(model, z0: torch.Tensor, eps: torch.Tensor, num_steps: int) -> torch.Tensor:
    """z_T for the first sampling timestep: the forward process applied to z0 with noise eps."""
    t_first = model.sampling_timesteps(num_steps)[0]
    return model.noisy_sample(z0, eps, t_first.expand(z0.shape[0]))


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


def ddim_generate(model, z_T, cond, guidance, owner, num_steps: int = 50) -> torch.Tensor:
    """Deterministic sampling (DDIM eta = 0, or Euler for flow matching) from z_T; cond (n, L, D) or None,
    guidance (n,) scales. Returns z0."""
    timesteps = model.sampling_timesteps(num_steps)
    z = z_T
    for i, t in enumerate(timesteps):
        pred = guided_prediction(model, z, t, cond, guidance, owner)
        z = model.sampler_step(timesteps, i, pred.eps, pred.z0)
    return z
