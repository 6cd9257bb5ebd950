"""M2. Noise inversion, unregularised and regularised, with the KS normality test.

Unregularised: eps* = argmin_eps L(x0, eps, e). It always "succeeds", so it proves nothing alone.
Regularised: min over (mu, log sigma^2) of E_n L(x0, mu + sigma n, e) + KL(N(mu, sigma^2) || N(0, I)),
then draw from N(mu*, sigma*^2) and KS-test each draw's entries against N(0, 1).
With e = "" this is the paper's unconditional check: the safe reference should not replicate.
Both the error and the KL are means over entries (the paper's sums divided by the same size).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memray.measures import rng
from memray.measures.optim import RowAdam, cosine_lr
from memray.measures.settings import NoiseInversionConfig
from memray.measures.stats import kl_to_standard_normal, ks_normality_pvalues
from memray.measures.z0_error import sampled_z0_error


@dataclass
class NoiseInversionResult:
    """Per image (B,) arrays; `finite` False marks images whose optimisation blew up."""

    mu_mean: np.ndarray
    sigma2_mean: np.ndarray
    ks_p: np.ndarray
    final_error: np.ndarray
    kl: np.ndarray
    noise: torch.Tensor  # eps* (unregularised) or mu* (regularised), (B, ...)
    log_var: torch.Tensor | None
    finite: np.ndarray


def _optimize(model, z0, cond, generators, owner, config, *, steps, regularized, param_init, progress):
    """Shared Adam loop over per-image noise parameters; returns (params, last errors, finite)."""
    batch = z0.shape[0]
    mu = param_init.clone()
    log_var = torch.zeros_like(mu)
    opt_mu = RowAdam(mu)
    opt_lv = RowAdam(log_var) if regularized else None
    finite = torch.ones(batch, dtype=torch.bool)
    errors = torch.zeros(batch)
    s = config.samples_per_step
    for step in range(steps):
        rows = finite.nonzero().flatten().to(z0.device)
        if not len(rows):
            break
        gens = [generators[i] for i in rows.tolist()]
        t = rng.randint_per_image(gens, model.num_train_timesteps, (s,)).flatten()
        p_mu = mu[rows].detach().requires_grad_()
        p_lv = log_var[rows].detach().requires_grad_() if regularized else None
        eps = p_mu.repeat_interleave(s, 0)
        if regularized:
            n = rng.randn_per_image(gens, (s, *mu.shape[1:])).flatten(0, 1)
            eps = eps + (0.5 * p_lv).exp().repeat_interleave(s, 0) * n
        cond_s = None if cond is None else cond[rows].repeat_interleave(s, 0)
        err = sampled_z0_error(
            model, z0[rows].repeat_interleave(s, 0), eps, t, cond_s, owner[rows].repeat_interleave(s)
        )
        err = err.reshape(len(rows), s).mean(1)
        loss = err + (kl_to_standard_normal(p_mu, p_lv) if regularized else 0)
        loss.sum().backward()
        grads = [p_mu.grad] + ([p_lv.grad] if regularized else [])
        ok = torch.isfinite(loss.detach()) & torch.stack([g.flatten(1).isfinite().all(1) for g in grads]).all(0)
        finite[rows[~ok].cpu()] = False
        keep = ok.nonzero().flatten()
        lr = cosine_lr(config.lr, torch.tensor(step), steps) if regularized else config.lr
        opt_mu.step(rows[keep], p_mu.grad[keep], lr)
        if regularized:
            opt_lv.step(rows[keep], p_lv.grad[keep], lr)
        errors[rows[keep].cpu()] = err.detach()[keep].cpu()
        if progress is not None:
            progress("noise inversion" + (" (regularised)" if regularized else ""), step + 1, steps)
    return mu, (log_var if regularized else None), errors, finite


def invert_noise(
    model, z0, cond, generators, owner, config: NoiseInversionConfig, *, regularized: bool, progress=None
) -> NoiseInversionResult:
    """Noise inversion of B images at once under condition cond (B, L, D) or None."""
    steps = config.regularized_steps if regularized else config.steps
    init = torch.zeros_like(z0) if regularized else rng.randn_per_image(generators, z0.shape[1:])
    mu, log_var, errors, finite = _optimize(
        model,
        z0,
        cond,
        generators,
        owner,
        config,
        steps=steps,
        regularized=regularized,
        param_init=init,
        progress=progress,
    )
    mu, log_var = mu.detach(), None if log_var is None else log_var.detach()
    if regularized:
        draws = rng.randn_per_image(generators, (config.ks_samples, *z0.shape[1:]))
        samples = mu.unsqueeze(1) + (0.5 * log_var).exp().unsqueeze(1) * draws
        kl = kl_to_standard_normal(mu, log_var).cpu().numpy()
        sigma2 = log_var.exp().flatten(1).mean(1).cpu().numpy()
    else:
        samples = mu.unsqueeze(1)
        kl = np.full(len(mu), np.nan)
        sigma2 = np.full(len(mu), np.nan)
    ks_p = np.array([ks_normality_pvalues(row).mean() for row in samples])
    return NoiseInversionResult(
        mu_mean=mu.flatten(1).mean(1).cpu().numpy(),
        sigma2_mean=sigma2,
        ks_p=ks_p,
        final_error=errors.numpy(),
        kl=kl,
        noise=mu,
        log_var=log_var,
        finite=finite.numpy(),
    )
