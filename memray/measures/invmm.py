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
(similarity.py), or, counting (the default), when k of the K replicate at one scale and the
data-processing bound at q(A) = k / K already says plain N(0, I) noise replicates often enough
(`stop_rate`). A counted success is then confirmed on `confirm_noises` fresh noises, whose count
is the evidence the verdict takes (free of the selection that stopped the optimisation).
InvMM(x) = KL at the first successful check (lower = more memorised); never succeeding within the
budget is censored (no finite score). An image that succeeds leaves the batch at once; its
readable prompt (the argmax tokens) is then checked on the check's noises, the second kind of
evidence.

Departures from the reference (docs/science.md): the networks are frozen; the prompt
distribution starts at the image's caption where it has one (any start gives an upper bound
on a minimum over prompts), with a share `prompt_init_weight` of each slot's mix on the
caption's token; a check at step 0 measures N(0, I) itself; the check is staged
(replication.py) so failing checks cost 1/K of the generations; checks count (above).

The code, piece by piece: `_Slots` is the per-image state (one row per slot); `_Run.step` is the
loss and its Adam step; `_Run.adapt_and_check` the adaptive weight; `_Run.check` (with `sample`
and `leave_replicated`) the success check; `_Run.fill` and `_Run.finish` the slot scheduler.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from memray.measures import rng
from memray.measures.optim import RowAdam
from memray.measures.prompt_inversion import prompt_condition
from memray.measures.replication import count_replicas, replication_check
from memray.measures.settings import InvMMConfig
from memray.measures.similarity import progress_to_bar
from memray.measures.stats import kl_to_standard_normal, rate_lower_bound
from memray.measures.z0_error import sampled_z0_error


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
    replicas: np.ndarray  # replicated images: how many of `samples` noises replicated (the verdict's count)
    samples: np.ndarray  # ... out of: confirm_noises when counting, the check's K under the all-K rule
    prompt_init: list[str | None]  # "caption" or "zero"; None for unconditional models
    kl_weight: np.ndarray
    reconstruction: np.ndarray
    finite: np.ndarray
    mu: torch.Tensor  # (B, ...) the noise distribution at success (or at the end)
    log_var: torch.Tensor
    condition: torch.Tensor | None  # (B, L, D) the expected token mix's conditioning at success (or at the end)
    stop_reason: list[str]  # "replicated", "budget", "early_stop" or "nonfinite"
    busy: float  # share of the slots that held an image, over the optimisation steps (continuous batching)
    trace: list[np.ndarray]  # per image, one row per check: TRACE_COLUMNS


# What InvMMResult.trace records at each check of an image.
TRACE_COLUMNS = ("step", "kl_nats", "similarity", "gate_similarity", "replicas", "counted")


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
    """Token logits per slot and the conditioning they induce (absent for unconditional models)."""

    def __init__(self, model, config: InvMMConfig, slots: int, free_tokens: int, device, context=None):
        self.model, self.config, self.context = model, config, context
        self.vocab = model.vocabulary_embeddings.detach().float()
        self.logits = torch.zeros(slots, free_tokens, self.vocab.shape[0], device=device)
        self.opt = RowAdam(self.logits)
        self.lr = config.prompt_lr if config.prompt_lr is not None else config.lr

    def start(self, rows, start_ids):
        """Hand `rows` to new images whose prompts start at `start_ids` (-1 rows: zero logits)."""
        weight, tau = self.config.prompt_init_weight, self.config.temperature
        self.logits[rows] = caption_start_logits(start_ids, self.vocab.shape[0], weight, tau)
        self.opt.reset(rows)

    def _context(self, images, repeats: int = 1):
        """The caption context (model.caption_context) of `images`, each repeated `repeats` times."""
        if self.context is None:
            return None
        return self.context[images].repeat_interleave(repeats, 0)

    def sampled_condition(self, logits, gens, samples, images):
        """Gumbel-softmax token mixes, `samples` per image: conditioning (b * samples, L, D)."""
        u = rng.rand_per_image(gens, (samples, *logits.shape[1:])).clamp_(1e-10, 1 - 1e-7)
        gumbel = -torch.log(-torch.log(u))
        weights = torch.softmax((logits.unsqueeze(1) + gumbel) / self.config.temperature, dim=-1)
        return prompt_condition(self.model, (weights @ self.vocab).flatten(0, 1), self._context(images, samples))

    def expected_condition(self, rows, images):
        """Conditioning of the expected token mix softmax(logits / tau): the reference's check prompt."""
        weights = torch.softmax(self.logits[rows] / self.config.temperature, dim=-1)
        return prompt_condition(self.model, weights @ self.vocab, self._context(images))

    def readable(self, rows, images):
        """The argmax tokens' conditioning and text: a real prompt a person can type."""
        ids = self.logits[rows].argmax(-1)
        return self.model.encode_ids(self.model.prompt_ids(ids), self._context(images)), self.model.decode_tokens(ids)


def out_of_reach(trace: np.ndarray, bar: float, null: float, config: InvMMConfig) -> bool:
    """The early stop: after `stop_after` steps, the best check so far covered less than `stop_progress`
    of the way from the image's null level to its bar: (best - null) / (bar - null) < stop_progress.

    `trace` holds the image's checks so far (TRACE_COLUMNS); `null` is the higher of its nulls (the
    similarity an unrelated generation reaches), so the rule reads the same for every kind of
    similarity. Calibrated against full-budget runs (docs/throughput.md); a stopped image is
    censored, like one that ran out of budget.
    """
    steps, similarity = trace[:, 0], trace[:, 2]
    if steps[-1] < config.stop_after or not bar > null:
        return False
    best = np.nanmax(similarity, initial=-np.inf)
    return bool(progress_to_bar(best, null, bar) < config.stop_progress)


class _Outputs:
    """Per-image results, filled as each image leaves its slot."""

    def __init__(self, batch: int, z0: torch.Tensor, condition_shape):
        self.replicated = torch.zeros(batch, dtype=torch.bool)
        self.kl = torch.full((batch,), torch.nan)
        self.kl_nats = torch.full((batch,), torch.nan)
        self.steps = torch.zeros(batch, dtype=torch.long)
        self.similarity = torch.full((batch,), torch.nan)
        self.guidance = torch.full((batch,), torch.nan)
        self.prompt_replicated = torch.zeros(batch, dtype=torch.bool)
        self.replicas = torch.zeros(batch, dtype=torch.long)
        self.samples = torch.zeros(batch, dtype=torch.long)
        self.kl_weight = torch.full((batch,), torch.nan)
        self.reconstruction = torch.full((batch,), torch.nan)
        self.finite = torch.ones(batch, dtype=torch.bool)
        self.mu = torch.zeros_like(z0, device="cpu")
        self.log_var = torch.zeros_like(z0, device="cpu")
        self.condition = None if condition_shape is None else torch.zeros(batch, *condition_shape)
        self.prompts: list[str | None] = [None] * batch
        self.stop_reason: list[str | None] = [None] * batch
        self.trace: list[list] = [[] for _ in range(batch)]


@dataclass
class _Check:
    """What one success check of b rows saw: its draws, and per row (CPU) the KL, the similarities and the counts."""

    noises: torch.Tensor  # (b, K, ...)
    cond: torch.Tensor | None
    sigma: torch.Tensor
    generators: list
    kl_nats: torch.Tensor
    every: torch.Tensor  # all K replicated at one scale: the reference's success
    similarity: torch.Tensor
    guidance: torch.Tensor
    gate: torch.Tensor
    replicas: torch.Tensor  # k of the K at the scale where most replicated
    counted: torch.Tensor  # K where a scale ran all K, else 0
    count_guidance: torch.Tensor

    @classmethod
    def empty(cls, b: int, noises, cond, sigma, generators) -> _Check:
        nan = torch.full((b,), torch.nan)
        zero = torch.zeros(b, dtype=torch.long)
        return cls(noises, cond, sigma, generators, nan.clone(), torch.zeros(b, dtype=torch.bool), nan.clone(),
                   nan.clone(), nan.clone(), zero.clone(), zero.clone(), nan.clone())  # fmt: skip


class _Slots:
    """The per-image state, one row per slot: which image holds it, that image's noise distribution
    N(mu, sigma^2) and prompt distribution with their Adam states, its KL weight w, its loss history
    and its own step count. A slot handed to a new image starts it exactly as a fresh run would."""

    def __init__(self, count: int, latent_shape, steps: int, prompt, device):
        self.image = torch.full((count,), -1, dtype=torch.long, device=device)  # -1: free
        self.mu = torch.zeros(count, *latent_shape, device=device)
        self.log_var = torch.zeros_like(self.mu)
        self.opt_mu, self.opt_log_var = RowAdam(self.mu), RowAdam(self.log_var)
        self.prompt = prompt  # _PromptDistribution, None for unconditional models
        self.weight = torch.zeros(count, device=device)
        self.history = torch.full((count, steps), torch.nan, device=device)
        self.previous_check = torch.full((count,), torch.inf, device=device)
        self.own_steps = torch.zeros(count, dtype=torch.long, device=device)

    def occupied(self) -> torch.Tensor:
        return (self.image >= 0).nonzero().flatten()

    def free(self) -> list[int]:
        return (self.image < 0).nonzero().flatten().tolist()

    def start(self, rows: torch.Tensor, images: torch.Tensor, start_ids, kl_weight: float) -> None:
        """Hand `rows` to `images`: N(0, I), the starting prompt, fresh optimisers, step 0."""
        self.image[rows] = images
        self.mu[rows], self.log_var[rows] = 0.0, 0.0
        self.opt_mu.reset(rows)
        self.opt_log_var.reset(rows)
        if self.prompt is not None:
            self.prompt.start(rows, start_ids[images])
        self.weight[rows] = kl_weight
        self.history[rows] = torch.nan
        self.previous_check[rows] = torch.inf
        self.own_steps[rows] = 0


class _Run:
    """One call of invmm(): the slot scheduler (fill, finish), the optimisation step, the adaptive KL
    weight and the success check, as methods over the inputs, the slots and the outputs."""

    def __init__(
        self, model, z0, generators, owner, config, similarity, targets, *, start_ids, context, slots, counting, stop_rate, progress
    ):  # fmt: skip
        self.model, self.z0, self.generators, self.owner = model, z0, generators, owner
        self.config, self.similarity, self.targets = config, similarity, targets
        self.counting, self.stop_rate, self.progress = counting, stop_rate, progress
        batch, device = z0.shape[0], z0.device
        self.delta = config.kl_weight_delta if config.kl_weight_delta is not None else model.kl_weight_delta
        self.bars, self.nulls = targets.threshold.cpu(), targets.null_level()
        count = min(slots or batch, batch)
        prompt, condition_shape = None, None
        if model.is_conditional:
            free = min(config.free_tokens or model.num_free_slots, model.num_free_slots)
            if start_ids is None or config.prompt_init == "zero":
                start_ids = torch.full((batch, free), -1, dtype=torch.long)
            start_ids = start_ids[:, :free].to(device)
            prompt = _PromptDistribution(model, config, count, free, device, context)
            condition_shape = model.empty_condition(1).shape[1:]
        self.start_ids = start_ids
        self.slots = _Slots(count, z0.shape[1:], config.steps, prompt, device)
        self.queue = iter(range(batch))
        self.out = _Outputs(batch, z0, condition_shape)
        self.budget_done, self.budget_total = 0, batch * config.steps
        self.iterations = self.image_steps = 0

    def run(self) -> InvMMResult:
        """Until every image has left: fill free slots, one step for the occupied, then adapt and check."""
        while True:
            self.fill()
            rows = self.slots.occupied()
            if not len(rows):
                return self.result()
            rows = self.step(rows)
            self.adapt_and_check(rows)
            slots = self.slots
            self.finish(((slots.image >= 0) & (slots.own_steps >= self.config.steps)).nonzero().flatten(), "budget")

    # -- the scheduler ------------------------------------------------------------------------------

    def fill(self) -> None:
        """Hand free slots to the next images of the queue (and check each at its start)."""
        while True:
            pairs = list(zip(self.slots.free(), itertools.islice(self.queue, len(self.slots.free()))))
            if not pairs:
                return
            device = self.z0.device
            rows = torch.tensor([slot for slot, _ in pairs], device=device)
            images = torch.tensor([i for _, i in pairs], device=device)
            self.slots.start(rows, images, self.start_ids, self.config.kl_weight_init)
            if not self.config.check_at_start:
                return
            self.check(rows)

    def finish(self, rows: torch.Tensor, reason: str) -> None:
        """The images in `rows` leave their slots with their results."""
        if not len(rows):
            return
        slots, out = self.slots, self.out
        images = slots.image[rows].cpu()
        out.steps[images] = slots.own_steps[rows].cpu()
        out.mu[images], out.log_var[images] = slots.mu[rows].cpu(), slots.log_var[rows].cpu()
        out.kl_weight[images] = slots.weight[rows].cpu()
        out.reconstruction[images] = slots.history[rows, (slots.own_steps[rows] - 1).clamp_min(0)].cpu()
        if slots.prompt is not None:
            with torch.no_grad():
                texts = slots.prompt.readable(rows, slots.image[rows])[1]
        for k, i in enumerate(images.tolist()):
            out.stop_reason[i] = reason
            if slots.prompt is not None:
                out.prompts[i] = texts[k]
        self.budget_done += int((self.config.steps - slots.own_steps[rows]).sum())
        slots.image[rows] = -1

    # -- the step: || z0_hat - z0 ||^2 + w KL over S draws of (noise, t, token mix) -----------------

    def step(self, rows: torch.Tensor) -> torch.Tensor:
        """One Adam step of the occupied `rows`; an image whose loss or gradients are not finite leaves.
        Returns the rows that stepped."""
        slots, config, s = self.slots, self.config, self.config.samples_per_step
        images = slots.image[rows]
        self.iterations, self.image_steps = self.iterations + 1, self.image_steps + len(rows)
        gens = [self.generators[i] for i in images.tolist()]
        noise = rng.randn_per_image(gens, (s, *self.z0.shape[1:]))
        t = rng.randint_per_image(gens, self.model.num_train_timesteps, (s,)).flatten()
        p_mu, p_lv = slots.mu[rows].requires_grad_(), slots.log_var[rows].requires_grad_()
        eps = (p_mu.unsqueeze(1) + (0.5 * p_lv).exp().unsqueeze(1) * noise).flatten(0, 1)
        params, cond = [p_mu, p_lv], None
        if slots.prompt is not None:
            p_logits = slots.prompt.logits[rows].requires_grad_()
            params.append(p_logits)
            cond = slots.prompt.sampled_condition(p_logits, gens, s, images)
        z0, owner = self.z0[images].repeat_interleave(s, 0), self.owner[images].repeat_interleave(s)
        recon = sampled_z0_error(self.model, z0, eps, t, cond, owner).reshape(len(rows), s).mean(1)
        (recon + slots.weight[rows] * kl_to_standard_normal(p_mu, p_lv)).sum().backward()

        ok = recon.detach().isfinite() & torch.stack([p.grad.flatten(1).isfinite().all(1) for p in params]).all(0)
        if not ok.all():
            self.out.finite[images[~ok].cpu()] = False
            self.finish(rows[~ok], "nonfinite")
        keep, rows = ok.nonzero().flatten(), rows[ok]
        slots.opt_mu.step(rows, p_mu.grad[keep], config.lr)
        slots.opt_log_var.step(rows, p_lv.grad[keep], config.lr)
        if slots.prompt is not None:
            slots.prompt.opt.step(rows, p_logits.grad[keep], slots.prompt.lr)
        slots.history[rows, slots.own_steps[rows]] = recon.detach()[keep]
        slots.own_steps[rows] += 1
        self.budget_done += len(rows)
        if self.progress is not None:
            self.progress("InvMM", self.budget_done, self.budget_total)
        return rows

    def adapt_and_check(self, rows: torch.Tensor) -> None:
        """The adaptive KL weight: w += delta every step; every C steps, halve it instead where the running
        reconstruction loss improved by less than xi since the previous check, and check those rows."""
        slots, config = self.slots, self.config
        due = slots.own_steps[rows] % config.check_every == 0
        slots.weight[rows[~due]] += self.delta
        checked = rows[due]
        if not len(checked):
            return
        window = _window_mean(slots.history[checked], slots.own_steps[checked], config.loss_window)
        stalled = slots.previous_check[checked] - window < config.improvement_tol
        slots.weight[checked] = torch.where(stalled, slots.weight[checked] / 2, slots.weight[checked] + self.delta)
        slots.previous_check[checked] = window
        self.check(checked)

    # -- the success check ----------------------------------------------------------------------------

    def replicates(self, images, noises, cond, num_steps: int):
        """Do these images' noises (b, K, ...) under `cond` replicate their targets? (replication_check)"""
        return replication_check(
            self.model,
            self.z0[images],
            noises,
            cond,
            self.config.guidance_scales,
            self.similarity,
            self.targets[images],
            self.owner[images],
            num_steps=num_steps,
            aligned=self.config.aligned_start,
        )

    def check(self, rows: torch.Tensor) -> None:
        """The success check of `rows`: replicated images leave with their KL and counted evidence,
        hopeless ones with the early stop; every check joins its image's trace."""
        found = self.sample(rows)
        images = self.slots.image[rows].cpu()
        for k, i in enumerate(images.tolist()):
            self.out.trace[i].append(
                (int(self.slots.own_steps[rows[k]]), float(found.kl_nats[k]), float(found.similarity[k]),
                 float(found.gate[k]), int(found.replicas[k]), int(found.counted[k]))
            )  # fmt: skip
        success = found.every.clone()
        if self.counting:  # k of K already say plain noise replicates often enough: stop here, confirm below
            success |= torch.tensor(
                [
                    n > 0 and rate_lower_bound(float(kl), int(r) / int(n)) >= self.stop_rate
                    for kl, r, n in zip(found.kl_nats, found.replicas, found.counted)
                ],
                dtype=torch.bool,
            )
        hits = success.nonzero().flatten()
        if len(hits):
            self.leave_replicated(rows, hits, found)
        if self.config.early_stop:  # an image at its last step ran its budget: that is no early stop
            left = (self.slots.own_steps[rows] < self.config.steps).cpu()
            bars, nulls, trace = self.bars, self.nulls, self.out.trace
            hopeless = [
                k
                for k, i in enumerate(images.tolist())
                if left[k]
                and not success[k]
                and out_of_reach(np.array(trace[i]), float(bars[i]), float(nulls[i]), self.config)
            ]
            self.finish(rows[torch.tensor(hopeless, dtype=torch.long, device=rows.device)], "early_stop")

    def sample(self, rows: torch.Tensor) -> _Check:
        """K noises from each row's N(mu, sigma^2) under its expected token mix, generated and compared
        (staged: replication.py); a few-step gate first where it is on."""
        slots, config, device = self.slots, self.config, self.z0.device
        images, cpu_images = slots.image[rows], slots.image[rows].cpu()
        gens = [self.generators[i] for i in cpu_images.tolist()]
        sigma = (0.5 * slots.log_var[rows]).exp().unsqueeze(1)
        noises = slots.mu[rows].unsqueeze(1) + sigma * rng.randn_per_image(
            gens, (config.check_noises, *self.z0.shape[1:])
        )
        with torch.no_grad():
            cond = slots.prompt.expected_condition(rows, images) if slots.prompt is not None else None
        found = _Check.empty(len(rows), noises, cond, sigma, gens)
        found.kl_nats = kl_to_standard_normal(slots.mu[rows], slots.log_var[rows], reduce="sum").cpu()
        full = torch.ones(len(rows), dtype=torch.bool)
        if config.gate_steps:  # a few-step generation of the first noise: only plausible rows get the full check
            quick = self.replicates(images, noises[:, :1], cond, config.gate_steps)
            found.gate, found.guidance = quick.similarity, quick.guidance
            full = found.gate >= self.bars[cpu_images] - config.gate_margin
        if full.any():
            f = full.nonzero().flatten()
            result = self.replicates(
                images[f.to(device)], noises[f.to(device)], None if cond is None else cond[f], config.sampling_steps
            )
            found.every[f], found.similarity[f], found.guidance[f] = (
                result.replicated,
                result.similarity,
                result.guidance,
            )
            found.replicas[f], found.counted[f] = result.replicas, result.counted
            found.count_guidance[f] = result.replicas_guidance
        self.out.similarity[cpu_images] = torch.where(full, found.similarity, found.gate)
        self.out.guidance[cpu_images] = found.guidance
        if cond is not None:
            self.out.condition[cpu_images] = cond.cpu()
        return found

    def leave_replicated(self, rows: torch.Tensor, hits: torch.Tensor, found: _Check) -> None:
        """The images at `hits` (indices into rows) replicated: their KL, their counted evidence (fresh
        noises when counting, the check's own K otherwise) and the readable prompt's check; they leave."""
        slots, out, config = self.slots, self.out, self.config
        dev_hits = hits.to(rows.device)
        rows_hit = rows[dev_hits]
        images = slots.image[rows_hit]
        cpu_images = images.cpu()
        out.replicated[cpu_images] = True
        out.kl_nats[cpu_images] = found.kl_nats[hits]
        out.kl[cpu_images] = kl_to_standard_normal(slots.mu[rows_hit], slots.log_var[rows_hit]).cpu()
        if self.counting:  # fresh noises, drawn after the stop was decided: a count free of that selection
            scale = torch.where(found.every[hits], found.guidance[hits], found.count_guidance[hits])
            fresh = slots.mu[rows_hit].unsqueeze(1) + found.sigma[dev_hits] * rng.randn_per_image(
                [found.generators[k] for k in hits.tolist()], (config.confirm_noises, *self.z0.shape[1:])
            )
            out.replicas[cpu_images] = count_replicas(
                self.model,
                self.z0[images],
                fresh,
                None if found.cond is None else found.cond[hits],
                scale,
                self.similarity,
                self.targets[images],
                self.owner[images],
                num_steps=config.sampling_steps,
                aligned=config.aligned_start,
            )
            out.samples[cpu_images] = config.confirm_noises
            out.guidance[cpu_images] = scale
        else:
            out.replicas[cpu_images] = out.samples[cpu_images] = config.check_noises
        if slots.prompt is not None:  # the second kind of evidence: a prompt a person can type
            with torch.no_grad():
                readable_cond, _ = slots.prompt.readable(rows_hit, images)
            again = self.replicates(images, found.noises[dev_hits], readable_cond, config.sampling_steps)
            out.prompt_replicated[cpu_images] = again.replicated
        self.finish(rows_hit, "replicated")

    # -- the result ------------------------------------------------------------------------------------

    def result(self) -> InvMMResult:
        """The per-image arrays, once every image has left its slot."""
        out, prompt = self.out, self.slots.prompt
        return InvMMResult(
            replicated=out.replicated.numpy(),
            kl=out.kl.numpy(),
            kl_nats=out.kl_nats.numpy(),
            steps=out.steps.numpy(),
            similarity=out.similarity.numpy(),
            guidance=out.guidance.numpy(),
            prompts=out.prompts,
            prompt_replicated=out.prompt_replicated.numpy(),
            replicas=out.replicas.numpy(),
            samples=out.samples.numpy(),
            prompt_init=[None] * len(out.steps)
            if prompt is None
            else ["caption" if c else "zero" for c in (self.start_ids >= 0).any(-1).tolist()],
            kl_weight=out.kl_weight.numpy(),
            reconstruction=out.reconstruction.numpy(),
            finite=out.finite.numpy(),
            mu=out.mu,
            log_var=out.log_var,
            condition=out.condition,
            stop_reason=out.stop_reason,
            busy=self.image_steps / (len(self.slots.image) * self.iterations) if self.iterations else 1.0,
            trace=[np.array(t, dtype=np.float64).reshape(-1, len(TRACE_COLUMNS)) for t in out.trace],
        )


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
    slots: int | None = None,
    counting: bool = True,
    stop_rate: float = 0.001,
    progress=None,
) -> InvMMResult:
    """Run InvMM on B images, at most `slots` at a time in shared UNet calls (None: all B).

    Continuous batching: an image that finishes (replicated, stopped, out of budget, non-finite)
    hands its slot to the next image, which starts at its own step 0 with its own optimizer
    state and random stream; every result is the image's alone, whenever it joined.
    `targets` (similarity.Targets) holds each image's features and bar; `start_ids` (B, N) the
    caption's free-slot token ids where the prompt starts at a caption, -1 rows elsewhere; `context`
    (B, ...) each image's caption context (model.caption_context) or None. `counting`: a check
    also succeeds where k of K replicate with rate_lower_bound(KL, k / K) >= `stop_rate`, and every
    success is counted again on fresh noises; False: the reference's all-K success alone.
    """
    run = _Run(
        model, z0, generators, owner, config, similarity, targets,
        start_ids=start_ids, context=context, slots=slots, counting=counting, stop_rate=stop_rate, progress=progress,
    )  # fmt: skip
    return run.run()


def _window_mean(history: torch.Tensor, own_steps: torch.Tensor, window: int) -> torch.Tensor:
    """Each row's mean reconstruction loss over its last `window` steps (its own step count)."""
    index = torch.arange(history.shape[1], device=history.device)
    inside = (index >= (own_steps - window).unsqueeze(1)) & (index < own_steps.unsqueeze(1))
    return torch.where(inside, history, torch.nan).nanmean(1)
