"""M5. InvMM (paper v3): how close to N(0, I) can a noise distribution stay while replicating x?

Per image: logits over the vocabulary for N free token slots (Gumbel-softmax mixes at
temperature tau embed the prompt), and mu, log sigma^2 of the noise distribution, all starting
at 0 (exactly N(0, I)). Loss per step, over S draws of (noise, t, token mix):
    || z0_hat - z0 ||^2 + w * KL,   KL = 1/2 mean_i (mu_i^2 + sigma_i^2 - log sigma_i^2 - 1)
Adaptive w: +delta every step; every C steps, halve it instead when the running reconstruction
loss (last `loss_window` steps) improved by less than xi since the previous check.
Success check every C steps: K noises from N(mu, sigma^2), DDIM at each guidance scale;
success when at some scale the MINIMUM similarity over the K samples reaches the threshold.
InvMM(x) = KL at the first successful check (lower = more memorised); never succeeding within
the budget is censored (no finite score). An image that succeeds leaves the batch at once.

Unlike the reference implementation: UNet weights are frozen (no weight gradients), the check
generates from a real prompt (the argmax tokens) unless check_prompt = "soft", and the check
is staged (replication.py) so failing checks cost 1/K of the generations.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memray.measures import rng
from memray.measures.optim import RowAdam
from memray.measures.prompt_inversion import prompt_condition
from memray.measures.replication import replication_check
from memray.measures.stats import kl_to_standard_normal
from memray.measures.z0_error import sampled_z0_error


@dataclass(frozen=True)
class InvMMConfig:
    """InvMM settings; defaults are the reference values for SD 1.x/2.x."""

    steps: int = 2000
    lr: float = 0.1
    samples_per_step: int = 16
    temperature: float = 2.0
    free_tokens: int | None = None  # None: every free slot (75 for SD)
    kl_weight_init: float = 1.0
    kl_weight_delta: float | None = None  # None: 1e-3 for latent models, 1e-4 for pixel DDPM
    check_every: int = 50
    improvement_tol: float = 1e-3
    loss_window: int = 100
    check_noises: int = 8
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    sampling_steps: int = 50
    check_prompt: str = "argmax"  # "argmax": a real prompt; "soft": the reference's expected token mix
    aligned_start: bool = True


@dataclass
class InvMMResult:
    """Per image (B,) arrays; kl is nan where censored (never replicated)."""

    replicated: np.ndarray
    kl: np.ndarray
    steps: np.ndarray
    similarity: np.ndarray
    guidance: np.ndarray
    prompts: list[str | None]
    kl_weight: np.ndarray
    reconstruction: np.ndarray
    finite: np.ndarray
    mu: torch.Tensor  # (B, ...) the noise distribution at success (or at the end)
    log_var: torch.Tensor
    prompt_ids: torch.Tensor | None  # (B, N) argmax tokens of the prompt distribution; None if unconditional


class _PromptDistribution:
    """Token logits per image and the conditioning they induce (absent for unconditional models)."""

    def __init__(self, model, batch, config: InvMMConfig, device):
        self.model, self.config = model, config
        self.vocab = model.vocabulary_embeddings.detach().float()
        slots = min(config.free_tokens or model.num_free_slots, model.num_free_slots)
        self.logits = torch.zeros(batch, slots, self.vocab.shape[0], device=device)
        self.opt = RowAdam(self.logits)

    def sampled_condition(self, logits, gens, samples):
        """Gumbel-softmax token mixes, `samples` per image: conditioning (b * samples, L, D)."""
        u = rng.rand_per_image(gens, (samples, *logits.shape[1:])).clamp_(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        weights = torch.softmax((logits.unsqueeze(1) + gumbel) / self.config.temperature, dim=-1)
        return prompt_condition(self.model, (weights @ self.vocab).flatten(0, 1))

    def check_condition(self, rows):
        """Conditioning for the success check and its readable prompt (argmax) or None (soft)."""
        logits = self.logits[rows]
        if self.config.check_prompt == "soft":
            weights = torch.softmax(logits / self.config.temperature, dim=-1)
            return prompt_condition(self.model, weights @ self.vocab), [None] * len(rows)
        ids = logits.argmax(-1)
        return self.model.encode_ids(self.model.prompt_ids(ids)), self.model.decode_tokens(ids)


def invmm(model, z0, generators, owner, config: InvMMConfig, similarity, *, progress=None) -> InvMMResult:
    """Run InvMM on B images in shared UNet calls; finished images stop costing evaluations."""
    batch, device, s = z0.shape[0], z0.device, config.samples_per_step
    delta = config.kl_weight_delta if config.kl_weight_delta is not None else (1e-3 if model.family != "ddpm" else 1e-4)
    mu, log_var = torch.zeros_like(z0), torch.zeros_like(z0)
    opt_mu, opt_lv = RowAdam(mu), RowAdam(log_var)
    prompt = _PromptDistribution(model, batch, config, device) if model.is_conditional else None
    weight = torch.full((batch,), config.kl_weight_init, device=device)
    history = torch.full((batch, config.steps), torch.nan, device=device)
    previous_check = torch.full((batch,), torch.inf, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    finite = torch.ones(batch, dtype=torch.bool, device=device)
    out = dict(
        replicated=torch.zeros(batch, dtype=torch.bool, device=device),
        kl=torch.full((batch,), torch.nan, device=device),
        steps=torch.zeros(batch, dtype=torch.long, device=device),
        similarity=torch.full((batch,), torch.nan, device=device),
        guidance=torch.full((batch,), torch.nan, device=device),
    )
    prompts: list[str | None] = [None] * batch

    for step in range(config.steps):
        rows = active.nonzero().flatten()
        if not len(rows):
            break
        gens = [generators[i] for i in rows.tolist()]
        noise = rng.randn_per_image(gens, (s, *z0.shape[1:]))
        t = rng.randint_per_image(gens, model.num_train_timesteps, (s,)).flatten()
        p_mu, p_lv = mu[rows].requires_grad_(), log_var[rows].requires_grad_()
        eps = (p_mu.unsqueeze(1) + (0.5 * p_lv).exp().unsqueeze(1) * noise).flatten(0, 1)
        params = [p_mu, p_lv]
        cond = None
        if prompt is not None:
            p_logits = prompt.logits[rows].requires_grad_()
            params.append(p_logits)
            cond = prompt.sampled_condition(p_logits, gens, s)
        recon = sampled_z0_error(
            model, z0[rows].repeat_interleave(s, 0), eps, t, cond, owner[rows].repeat_interleave(s)
        )
        recon = recon.reshape(len(rows), s).mean(1)
        kl = kl_to_standard_normal(p_mu, p_lv)
        (recon + weight[rows] * kl).sum().backward()

        ok = recon.detach().isfinite() & torch.stack([p.grad.flatten(1).isfinite().all(1) for p in params]).all(0)
        finite[rows[~ok]] = False
        active[rows[~ok]] = False
        keep, rows = ok.nonzero().flatten(), rows[ok]
        opt_mu.step(rows, p_mu.grad[keep], config.lr)
        opt_lv.step(rows, p_lv.grad[keep], config.lr)
        if prompt is not None:
            prompt.opt.step(rows, p_logits.grad[keep], config.lr)
        history[rows, step] = recon.detach()[keep]
        out["steps"][rows] = step + 1

        if progress is not None:
            progress("InvMM", step + 1, config.steps)
        if (step + 1) % config.check_every:
            weight[rows] += delta
            continue
        window = history[rows, max(0, step + 1 - config.loss_window) : step + 1].nanmean(1)
        stalled = previous_check[rows] - window < config.improvement_tol
        weight[rows] = torch.where(stalled, weight[rows] / 2, weight[rows] + delta)
        previous_check[rows] = window
        if not len(rows):
            continue
        check_gens = [generators[i] for i in rows.tolist()]
        sigma = (0.5 * log_var[rows]).exp().unsqueeze(1)
        noises = mu[rows].unsqueeze(1) + sigma * rng.randn_per_image(check_gens, (config.check_noises, *z0.shape[1:]))
        with torch.no_grad():
            cond, texts = prompt.check_condition(rows) if prompt is not None else (None, [None] * len(rows))
        check = replication_check(
            model,
            z0[rows],
            noises,
            cond,
            config.guidance_scales,
            similarity,
            owner[rows],
            num_steps=config.sampling_steps,
            aligned=config.aligned_start,
        )
        out["similarity"][rows] = check.similarity
        out["guidance"][rows] = check.guidance
        hit = rows[check.replicated]
        out["replicated"][hit] = True
        out["kl"][hit] = kl_to_standard_normal(mu[hit], log_var[hit])
        active[hit] = False
        for slot, text in zip(rows.tolist(), texts):
            prompts[slot] = text

    last = torch.arange(batch, device=device), (out["steps"] - 1).clamp_min(0)
    return InvMMResult(
        **{key: value.cpu().numpy() for key, value in out.items()},
        prompts=prompts,
        kl_weight=weight.cpu().numpy(),
        reconstruction=history[last].cpu().numpy(),
        finite=finite.cpu().numpy(),
        mu=mu.cpu(),
        log_var=log_var.cpu(),
        prompt_ids=None if prompt is None else prompt.logits.argmax(-1).cpu(),
    )
