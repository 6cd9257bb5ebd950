"""M5. InvMM (paper v3): how close to N(0, I) can a noise distribution stay while replicating x?

Per image: logits over the vocabulary for N free token slots (Gumbel-softmax mixes at
temperature tau embed the prompt), and mu, log sigma^2 of the noise distribution (starting at
0: exactly N(0, I)). Loss per step, over S draws of (noise, t, token mix):
    || z0_hat - z0 ||^2 + w * KL,   KL = 1/2 mean_i (mu_i^2 + sigma_i^2 - log sigma_i^2 - 1)
Adaptive w: +delta every step; every C steps, halve it instead when the running reconstruction
loss (last `loss_window` steps) improved by less than xi since the previous check.
Success check every C steps (and at the start): K noises from N(mu, sigma^2), DDIM at each
guidance scale under the expected token mix softmax(logits / tau) (the reference's check);
success when at some scale the MINIMUM similarity over the K samples clears the image's bar
(similarity.py). InvMM(x) = KL at the first successful check (lower = more memorised); never
succeeding within the budget is censored (no finite score). An image that succeeds leaves the
batch at once; its readable prompt (the argmax tokens) is then checked on the same noises, the
second kind of evidence.

Departures from the reference (docs/science.md): the networks are frozen; the prompt
distribution starts at the image's caption where it has one (any start gives an upper bound
on a minimum over prompts), with a share `prompt_init_weight` of each slot's mix on the
caption's token; a check at step 0 measures N(0, I) itself; the check is staged
(replication.py) so failing checks cost 1/K of the generations.
"""

from __future__ import annotations

import math
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
    """InvMM settings; defaults are the reference values for SD 1.x/2.x (departures noted)."""

    steps: int = 2000
    lr: float = 0.1
    samples_per_step: int = 16
    temperature: float = 2.0
    free_tokens: int | None = None  # None: every free slot (75 for SD)
    kl_weight_init: float = 1.0
    kl_weight_delta: float | None = None  # None: the model family's (1e-3 latent models, 1e-4 pixel DDPM)
    check_every: int = 50
    check_at_start: bool = True  # also check N(0, I) and the starting prompt before any step
    improvement_tol: float = 1e-3
    loss_window: int = 100
    check_noises: int = 8
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    sampling_steps: int = 50
    prompt_init: str = "caption"  # "caption": start at the image's caption where it has one; "zero": the reference
    prompt_init_weight: float = 0.9  # share of each slot's expected token mix on the caption's token at the start
    prompt_lr: float | None = None  # Adam lr of the token logits; None: lr
    aligned_start: bool = False  # check from z_T = forward(z0, eps) instead of eps (mixes the target into the start)


@dataclass
class InvMMResult:
    """Per image (B,) arrays; kl (mean per entry) and kl_nats (summed) are nan where censored."""

    replicated: np.ndarray
    kl: np.ndarray
    kl_nats: np.ndarray
    steps: np.ndarray
    similarity: np.ndarray
    guidance: np.ndarray
    prompts: list[str | None]  # the readable prompt (argmax tokens) at success or at the end
    prompt_replicated: np.ndarray  # did that readable prompt replicate on the same noises (replicated images)
    prompt_init: list[str | None]  # "caption" or "zero"; None for unconditional models
    kl_weight: np.ndarray
    reconstruction: np.ndarray
    finite: np.ndarray
    mu: torch.Tensor  # (B, ...) the noise distribution at success (or at the end)
    log_var: torch.Tensor
    condition: torch.Tensor | None  # (B, L, D) the expected token mix's conditioning at success (or at the end)


def caption_start_logits(start_ids: torch.Tensor, vocab_size: int, weight: float, temperature: float) -> torch.Tensor:
    """Logits (B, N, V) whose expected mix softmax(logits / tau) puts `weight` on start_ids' token in each slot.

    A row of start_ids that is all -1 (no caption) starts at zero logits, the uniform mix.
    """
    bias = temperature * math.log(weight * (vocab_size - 1) / (1 - weight))
    logits = torch.zeros(*start_ids.shape, vocab_size, device=start_ids.device)
    has = start_ids >= 0
    logits[has] = logits[has].scatter(-1, start_ids[has].unsqueeze(-1), bias)
    return logits


class _PromptDistribution:
    """Token logits per image and the conditioning they induce (absent for unconditional models)."""

    def __init__(self, model, config: InvMMConfig, start_ids: torch.Tensor, context: torch.Tensor | None = None):
        self.model, self.config, self.context = model, config, context
        self.vocab = model.vocabulary_embeddings.detach().float()
        self.logits = caption_start_logits(
            start_ids, self.vocab.shape[0], config.prompt_init_weight, config.temperature
        )
        self.opt = RowAdam(self.logits)
        self.from_caption = (start_ids >= 0).any(-1).tolist()
        self.lr = config.prompt_lr if config.prompt_lr is not None else config.lr

    def _context(self, rows, repeats: int = 1):
        """The caption context of `rows` (None: every image), each repeated `repeats` times."""
        if self.context is None:
            return None
        return (self.context if rows is None else self.context[rows]).repeat_interleave(repeats, 0)

    def sampled_condition(self, logits, gens, samples, rows=None):
        """Gumbel-softmax token mixes, `samples` per image of `rows` (None: all): conditioning (b * samples, L, D)."""
        u = rng.rand_per_image(gens, (samples, *logits.shape[1:])).clamp_(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        weights = torch.softmax((logits.unsqueeze(1) + gumbel) / self.config.temperature, dim=-1)
        return prompt_condition(self.model, (weights @ self.vocab).flatten(0, 1), self._context(rows, samples))

    def expected_condition(self, rows):
        """Conditioning of the expected token mix softmax(logits / tau): the reference's check prompt."""
        weights = torch.softmax(self.logits[rows] / self.config.temperature, dim=-1)
        return prompt_condition(self.model, weights @ self.vocab, self._context(rows))

    def readable(self, rows):
        """The argmax tokens' conditioning and text: a real prompt a person can type."""
        ids = self.logits[rows].argmax(-1)
        return self.model.encode_ids(self.model.prompt_ids(ids), self._context(rows)), self.model.decode_tokens(ids)


def invmm(
    model,
    z0,
    generators,
    owner,
    config: InvMMConfig,
    similarity,
    targets,
    *,
    start_ids=None,
    context=None,
    progress=None,
) -> InvMMResult:
    """Run InvMM on B images in shared UNet calls; finished images stop costing evaluations.

    `targets` (similarity.Targets) holds each image's features and bar; `start_ids` (B, N) the
    caption's free-slot token ids where the prompt starts at a caption, -1 rows elsewhere; `context`
    (B, ...) each image's caption context (model.caption_context) or None.
    """
    batch, device, s = z0.shape[0], z0.device, config.samples_per_step
    delta = config.kl_weight_delta if config.kl_weight_delta is not None else model.kl_weight_delta
    mu, log_var = torch.zeros_like(z0), torch.zeros_like(z0)
    opt_mu, opt_lv = RowAdam(mu), RowAdam(log_var)
    prompt = None
    if model.is_conditional:
        slots = min(config.free_tokens or model.num_free_slots, model.num_free_slots)
        if start_ids is None or config.prompt_init == "zero":
            start_ids = torch.full((batch, slots), -1, dtype=torch.long, device=device)
        prompt = _PromptDistribution(model, config, start_ids[:, :slots].to(device), context)
    weight = torch.full((batch,), config.kl_weight_init, device=device)
    history = torch.full((batch, config.steps), torch.nan, device=device)
    previous_check = torch.full((batch,), torch.inf, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    finite = torch.ones(batch, dtype=torch.bool, device=device)
    out = dict(
        replicated=torch.zeros(batch, dtype=torch.bool),
        kl=torch.full((batch,), torch.nan),
        kl_nats=torch.full((batch,), torch.nan),
        steps=torch.zeros(batch, dtype=torch.long),
        similarity=torch.full((batch,), torch.nan),
        guidance=torch.full((batch,), torch.nan),
        prompt_replicated=torch.zeros(batch, dtype=torch.bool),
    )
    condition = None if prompt is None else torch.zeros(batch, *model.empty_condition(1).shape[1:], device=device)

    def replicates(rows, noises, cond):
        """Do these rows' noises (b, K, ...) under `cond` replicate their targets? (replication_check)"""
        return replication_check(
            model,
            z0[rows],
            noises,
            cond,
            config.guidance_scales,
            similarity,
            targets[rows],
            owner[rows],
            num_steps=config.sampling_steps,
            aligned=config.aligned_start,
        )

    def check(rows):
        """The success check of the active rows; hits leave the batch with their KL."""
        gens = [generators[i] for i in rows.tolist()]
        sigma = (0.5 * log_var[rows]).exp().unsqueeze(1)
        noises = mu[rows].unsqueeze(1) + sigma * rng.randn_per_image(gens, (config.check_noises, *z0.shape[1:]))
        with torch.no_grad():
            cond = prompt.expected_condition(rows) if prompt is not None else None
        result = replicates(rows, noises, cond)
        out["similarity"][rows.cpu()] = result.similarity
        out["guidance"][rows.cpu()] = result.guidance
        if prompt is not None:
            condition[rows] = cond
        hit = rows[result.replicated.to(device)]
        if not len(hit):
            return
        out["replicated"][hit.cpu()] = True
        out["kl"][hit.cpu()] = kl_to_standard_normal(mu[hit], log_var[hit]).cpu()
        out["kl_nats"][hit.cpu()] = kl_to_standard_normal(mu[hit], log_var[hit], reduce="sum").cpu()
        active[hit] = False
        if prompt is not None:  # the second kind of evidence: a prompt a person can type
            hits = result.replicated.to(device).nonzero().flatten()
            with torch.no_grad():
                readable_cond, _ = prompt.readable(hit)
            out["prompt_replicated"][hit.cpu()] = replicates(hit, noises[hits], readable_cond).replicated

    if config.check_at_start:
        check(active.nonzero().flatten())
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
            cond = prompt.sampled_condition(p_logits, gens, s, rows)
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
            prompt.opt.step(rows, p_logits.grad[keep], prompt.lr)
        history[rows, step] = recon.detach()[keep]
        out["steps"][rows.cpu()] = step + 1

        if progress is not None:
            progress("InvMM", step + 1, config.steps)
        if (step + 1) % config.check_every:
            weight[rows] += delta
            continue
        window = history[rows, max(0, step + 1 - config.loss_window) : step + 1].nanmean(1)
        stalled = previous_check[rows] - window < config.improvement_tol
        weight[rows] = torch.where(stalled, weight[rows] / 2, weight[rows] + delta)
        previous_check[rows] = window
        if len(rows):
            check(rows)

    last = torch.arange(batch, device=device), (out["steps"].to(device) - 1).clamp_min(0)
    texts = [None] * batch if prompt is None else prompt.readable(torch.arange(batch, device=device))[1]
    init = [None] * batch if prompt is None else ["caption" if c else "zero" for c in prompt.from_caption]
    replicated = out["replicated"].numpy()
    return InvMMResult(
        replicated=replicated,
        kl=out["kl"].numpy(),
        kl_nats=out["kl_nats"].numpy(),
        steps=out["steps"].numpy(),
        similarity=out["similarity"].numpy(),
        guidance=out["guidance"].numpy(),
        prompts=texts,
        prompt_replicated=out["prompt_replicated"].numpy(),
        prompt_init=init,
        kl_weight=weight.cpu().numpy(),
        reconstruction=history[last].cpu().numpy(),
        finite=finite.cpu().numpy(),
        mu=mu.cpu(),
        log_var=log_var.cpu(),
        condition=None if condition is None else condition.cpu(),
    )
