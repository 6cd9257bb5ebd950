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
(replication.py) so failing checks cost 1/K of the generations.
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
from memray.measures.similarity import progress_to_bar
from memray.measures.stats import kl_to_standard_normal, rate_lower_bound
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
    confirm_noises: int = 16  # fresh noises that count a replication found by counting (the verdict's evidence)
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    sampling_steps: int = 50
    prompt_init: str = "caption"  # "caption": start at the image's caption where it has one; "zero": the reference
    prompt_init_weight: float = 0.9  # share of each slot's expected token mix on the caption's token at the start
    prompt_lr: float | None = None  # Adam lr of the token logits; None: lr
    aligned_start: bool = False  # check from z_T = forward(z0, eps) instead of eps (mixes the target into the start)
    # The early stop (out_of_reach), calibrated on full-budget runs (docs/throughput.md); false: the reference
    early_stop: bool = True
    stop_after: int = 100  # it waits this many steps of the image's own
    stop_progress: float = 0.25  # ... then stops an image whose checks covered less of the way from null to bar
    gate_steps: int = 0  # > 0: a DDIM of this many steps on the first noise gates the full check (off: see docs)
    gate_margin: float = 0.1  # the full check runs where the gate's similarity is within this of the bar


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
    batch, device, s = z0.shape[0], z0.device, config.samples_per_step
    n_slots = min(slots or batch, batch)
    delta = config.kl_weight_delta if config.kl_weight_delta is not None else model.kl_weight_delta
    bars, nulls = targets.threshold.cpu(), targets.null_level()
    mu = torch.zeros(n_slots, *z0.shape[1:], device=device)
    log_var = torch.zeros_like(mu)
    opt_mu, opt_lv = RowAdam(mu), RowAdam(log_var)
    prompt, condition_shape = None, None
    if model.is_conditional:
        free = min(config.free_tokens or model.num_free_slots, model.num_free_slots)
        if start_ids is None or config.prompt_init == "zero":
            start_ids = torch.full((batch, free), -1, dtype=torch.long)
        start_ids = start_ids[:, :free].to(device)
        prompt = _PromptDistribution(model, config, n_slots, free, device, context)
        condition_shape = model.empty_condition(1).shape[1:]
    weight = torch.zeros(n_slots, device=device)
    history = torch.full((n_slots, config.steps), torch.nan, device=device)
    previous_check = torch.full((n_slots,), torch.inf, device=device)
    own_steps = torch.zeros(n_slots, dtype=torch.long, device=device)
    image = torch.full((n_slots,), -1, dtype=torch.long, device=device)  # the image in each slot; -1: free
    queue = iter(range(batch))
    out = _Outputs(batch, z0, condition_shape)
    budget_done, budget_total = 0, batch * config.steps
    iterations, image_steps = 0, 0

    def replicates(images, noises, cond, num_steps):
        """Do these images' noises (b, K, ...) under `cond` replicate their targets? (replication_check)"""
        return replication_check(
            model,
            z0[images],
            noises,
            cond,
            config.guidance_scales,
            similarity,
            targets[images],
            owner[images],
            num_steps=num_steps,
            aligned=config.aligned_start,
        )

    def finish(rows, reason: str) -> None:
        """The images in `rows` leave their slots with their results."""
        nonlocal budget_done
        if not len(rows):
            return
        images = image[rows].cpu()
        out.steps[images] = own_steps[rows].cpu()
        out.mu[images], out.log_var[images] = mu[rows].cpu(), log_var[rows].cpu()
        out.kl_weight[images] = weight[rows].cpu()
        out.reconstruction[images] = history[rows, (own_steps[rows] - 1).clamp_min(0)].cpu()
        if prompt is not None:
            with torch.no_grad():
                texts = prompt.readable(rows, image[rows])[1]
        for k, i in enumerate(images.tolist()):
            out.stop_reason[i] = reason
            if prompt is not None:
                out.prompts[i] = texts[k]
        budget_done += int((config.steps - own_steps[rows]).sum())
        image[rows] = -1

    def check(rows) -> None:
        """The success check of `rows`; hits leave with their KL, hopeless images with the early stop."""
        images = image[rows]
        cpu_images = images.cpu()
        gens = [generators[i] for i in cpu_images.tolist()]
        sigma = (0.5 * log_var[rows]).exp().unsqueeze(1)
        noises = mu[rows].unsqueeze(1) + sigma * rng.randn_per_image(gens, (config.check_noises, *z0.shape[1:]))
        with torch.no_grad():
            cond = prompt.expected_condition(rows, images) if prompt is not None else None
        kl_nats = kl_to_standard_normal(mu[rows], log_var[rows], reduce="sum").cpu()
        every = torch.zeros(len(rows), dtype=torch.bool)  # all K replicated at one scale (the reference's success)
        seen = torch.full((len(rows),), torch.nan)
        guidance = torch.full((len(rows),), torch.nan)
        gate = torch.full((len(rows),), torch.nan)
        replicas = torch.zeros(len(rows), dtype=torch.long)
        counted = torch.zeros(len(rows), dtype=torch.long)
        count_guidance = torch.full((len(rows),), torch.nan)
        full = torch.ones(len(rows), dtype=torch.bool)
        if config.gate_steps:  # a few-step generation of the first noise: only plausible rows get the full check
            quick = replicates(images, noises[:, :1], cond, config.gate_steps)
            gate, guidance = quick.similarity, quick.guidance
            full = gate >= bars[cpu_images] - config.gate_margin
        if full.any():
            f = full.nonzero().flatten()
            result = replicates(
                images[f.to(device)], noises[f.to(device)], None if cond is None else cond[f], config.sampling_steps
            )
            every[f], seen[f], guidance[f] = result.replicated, result.similarity, result.guidance
            replicas[f], counted[f], count_guidance[f] = result.replicas, result.counted, result.replicas_guidance
        found = every.clone()
        if counting:  # k of K already say plain noise replicates often enough: stop here, confirm below
            found |= torch.tensor(
                [
                    n > 0 and rate_lower_bound(float(kl), int(r) / int(n)) >= stop_rate
                    for kl, r, n in zip(kl_nats, replicas, counted)
                ],
                dtype=torch.bool,
            )
        out.similarity[cpu_images] = torch.where(full, seen, gate)
        out.guidance[cpu_images] = guidance
        if prompt is not None:
            out.condition[cpu_images] = cond.cpu()
        for k, i in enumerate(cpu_images.tolist()):
            out.trace[i].append(
                (
                    int(own_steps[rows[k]]),
                    float(kl_nats[k]),
                    float(seen[k]),
                    float(gate[k]),
                    int(replicas[k]),
                    int(counted[k]),
                )
            )
        hits = found.nonzero().flatten()
        if len(hits):
            hit_images, dev_hits = cpu_images[hits], hits.to(device)
            out.replicated[hit_images] = True
            out.kl_nats[hit_images] = kl_nats[hits]
            out.kl[hit_images] = kl_to_standard_normal(mu[rows[dev_hits]], log_var[rows[dev_hits]]).cpu()
            hit_cond = None if cond is None else cond[hits]
            if counting:  # fresh noises, drawn after the stop was decided: a count free of that selection
                scale = torch.where(every[hits], guidance[hits], count_guidance[hits])
                fresh = mu[rows[dev_hits]].unsqueeze(1) + sigma[dev_hits] * rng.randn_per_image(
                    [gens[k] for k in hits.tolist()], (config.confirm_noises, *z0.shape[1:])
                )
                out.replicas[hit_images] = count_replicas(
                    model,
                    z0[images[dev_hits]],
                    fresh,
                    hit_cond,
                    scale,
                    similarity,
                    targets[images[dev_hits]],
                    owner[images[dev_hits]],
                    num_steps=config.sampling_steps,
                    aligned=config.aligned_start,
                )
                out.samples[hit_images] = config.confirm_noises
                out.guidance[hit_images] = scale
            else:
                out.replicas[hit_images] = config.check_noises
                out.samples[hit_images] = config.check_noises
            if prompt is not None:  # the second kind of evidence: a prompt a person can type
                with torch.no_grad():
                    readable_cond, _ = prompt.readable(rows[dev_hits], images[dev_hits])
                again = replicates(images[dev_hits], noises[dev_hits], readable_cond, config.sampling_steps)
                out.prompt_replicated[hit_images] = again.replicated
            finish(rows[dev_hits], "replicated")
        if config.early_stop:  # an image at its last step ran its budget: that is no early stop
            left = (own_steps[rows] < config.steps).cpu()
            hopeless = [
                k
                for k, i in enumerate(cpu_images.tolist())
                if left[k]
                and not found[k]
                and out_of_reach(np.array(out.trace[i]), float(bars[i]), float(nulls[i]), config)
            ]
            finish(rows[torch.tensor(hopeless, dtype=torch.long, device=device)], "early_stop")

    def fill() -> None:
        """Hand free slots to the next images of the queue (and check each at its start)."""
        while True:
            free_slots = (image < 0).nonzero().flatten().tolist()
            pairs = list(zip(free_slots, itertools.islice(queue, len(free_slots))))
            if not pairs:
                return
            rows = torch.tensor([slot for slot, _ in pairs], device=device)
            image[rows] = torch.tensor([i for _, i in pairs], device=device)
            mu[rows], log_var[rows] = 0.0, 0.0
            opt_mu.reset(rows)
            opt_lv.reset(rows)
            if prompt is not None:
                prompt.start(rows, start_ids[image[rows]])
            weight[rows] = config.kl_weight_init
            history[rows] = torch.nan
            previous_check[rows] = torch.inf
            own_steps[rows] = 0
            if not config.check_at_start:
                return
            check(rows)

    while True:
        fill()
        rows = (image >= 0).nonzero().flatten()
        if not len(rows):
            break
        images = image[rows]
        iterations, image_steps = iterations + 1, image_steps + len(rows)
        gens = [generators[i] for i in images.tolist()]
        noise = rng.randn_per_image(gens, (s, *z0.shape[1:]))
        t = rng.randint_per_image(gens, model.num_train_timesteps, (s,)).flatten()
        p_mu, p_lv = mu[rows].requires_grad_(), log_var[rows].requires_grad_()
        eps = (p_mu.unsqueeze(1) + (0.5 * p_lv).exp().unsqueeze(1) * noise).flatten(0, 1)
        params = [p_mu, p_lv]
        cond = None
        if prompt is not None:
            p_logits = prompt.logits[rows].requires_grad_()
            params.append(p_logits)
            cond = prompt.sampled_condition(p_logits, gens, s, images)
        recon = sampled_z0_error(
            model, z0[images].repeat_interleave(s, 0), eps, t, cond, owner[images].repeat_interleave(s)
        )
        recon = recon.reshape(len(rows), s).mean(1)
        kl = kl_to_standard_normal(p_mu, p_lv)
        (recon + weight[rows] * kl).sum().backward()

        ok = recon.detach().isfinite() & torch.stack([p.grad.flatten(1).isfinite().all(1) for p in params]).all(0)
        if not ok.all():
            out.finite[images[~ok].cpu()] = False
            finish(rows[~ok], "nonfinite")
        keep, rows = ok.nonzero().flatten(), rows[ok]
        opt_mu.step(rows, p_mu.grad[keep], config.lr)
        opt_lv.step(rows, p_lv.grad[keep], config.lr)
        if prompt is not None:
            prompt.opt.step(rows, p_logits.grad[keep], prompt.lr)
        history[rows, own_steps[rows]] = recon.detach()[keep]
        own_steps[rows] += 1
        budget_done += len(rows)
        if progress is not None:
            progress("InvMM", budget_done, budget_total)

        due = own_steps[rows] % config.check_every == 0
        weight[rows[~due]] += delta
        checked = rows[due]
        if len(checked):
            window = _window_mean(history[checked], own_steps[checked], config.loss_window)
            stalled = previous_check[checked] - window < config.improvement_tol
            weight[checked] = torch.where(stalled, weight[checked] / 2, weight[checked] + delta)
            previous_check[checked] = window
            check(checked)
        finish(((image >= 0) & (own_steps >= config.steps)).nonzero().flatten(), "budget")

    replicated = out.replicated.numpy()
    return InvMMResult(
        replicated=replicated,
        kl=out.kl.numpy(),
        kl_nats=out.kl_nats.numpy(),
        steps=out.steps.numpy(),
        similarity=out.similarity.numpy(),
        guidance=out.guidance.numpy(),
        prompts=out.prompts,
        prompt_replicated=out.prompt_replicated.numpy(),
        replicas=out.replicas.numpy(),
        samples=out.samples.numpy(),
        prompt_init=[None] * batch
        if prompt is None
        else ["caption" if c else "zero" for c in (start_ids >= 0).any(-1).tolist()],
        kl_weight=out.kl_weight.numpy(),
        reconstruction=out.reconstruction.numpy(),
        finite=out.finite.numpy(),
        mu=out.mu,
        log_var=out.log_var,
        condition=out.condition,
        stop_reason=out.stop_reason,
        busy=image_steps / (n_slots * iterations) if iterations else 1.0,
        trace=[np.array(t, dtype=np.float64).reshape(-1, len(TRACE_COLUMNS)) for t in out.trace],
    )


def _window_mean(history: torch.Tensor, own_steps: torch.Tensor, window: int) -> torch.Tensor:
    """Each row's mean reconstruction loss over its last `window` steps (its own step count)."""
    index = torch.arange(history.shape[1], device=history.device)
    inside = (index >= (own_steps - window).unsqueeze(1)) & (index < own_steps.unsqueeze(1))
    return torch.where(inside, history, torch.nan).nanmean(1)
