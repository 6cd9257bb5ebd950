"""M3. Prompt inversion: soft (continuous token embeddings) and hard (algorithm 1, a readable prompt).

Soft: e* = argmin_e E_eps L(x0, eps, e) + lambda R(e, V).
  R1 = ||e||^2 (Adam weight decay); R2 = ||e||^2 + (1/N) sum_i H(e_i, V), H the entropy of
  softmax_v <e_i, V_v>. Memorised images reach low error AND small norm; normal images only
  lower the norm.
Hard: after a soft optimisation of a few tokens, take each position's top-k vocabulary tokens by
  inner product, search their Cartesian product on a fixed test set of (eps, t) for the lowest
  error, and restart from a new initialisation until the best prompt replicates the image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from memray.measures import rng
from memray.measures.optim import RowAdam
from memray.measures.replication import replication_check
from memray.measures.settings import HardPromptConfig, SoftPromptConfig
from memray.measures.z0_error import sampled_z0_error


@dataclass
class SoftPromptResult:
    """Per image: the optimised free-slot embeddings and their final error and norm."""

    embeddings: torch.Tensor  # (B, N, d)
    final_error: np.ndarray
    norm: np.ndarray  # mean squared norm of a token embedding
    finite: np.ndarray


def vocabulary_entropy(embeddings: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """(1/N) sum_i H(softmax <e_i, V>): how far each slot is from a single vocabulary token. (B, N, d) -> (B,)"""
    log_p = torch.log_softmax(embeddings @ vocabulary.T, dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean(-1)


def prompt_condition(model, free: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Free-slot embeddings (n, N, d) and each row's caption context -> text-encoder conditioning phi(e) (n, L, D)."""
    layout = model.prompt_ids(torch.zeros(free.shape[:2], dtype=torch.long, device=free.device))
    return model.encode_embeddings(model.prompt_embeddings(free), layout, context)


def soft_prompt_inversion(
    model,
    z0,
    generators,
    owner,
    config: SoftPromptConfig,
    *,
    free_tokens=None,
    steps=None,
    init_ids=None,
    context=None,
    progress=None,
):
    """Optimise N free token embeddings per image; returns a SoftPromptResult.

    The embeddings start at random vocabulary tokens, or at `init_ids` (B, >= N) where those are >= 0.
    `context` (B, ...) is each image's caption context (model.caption_context), or None.
    """
    vocab = model.vocabulary_embeddings.detach()
    slots = free_tokens or config.free_tokens or model.num_free_slots
    slots = min(slots, model.num_free_slots)
    steps = steps or config.steps
    random_ids = rng.randint_per_image(generators, vocab.shape[0], (slots,))
    if init_ids is None:
        init_ids = random_ids
    else:
        init_ids = init_ids[:, :slots].to(random_ids.device)
        init_ids = torch.where(init_ids >= 0, init_ids, random_ids)
    embeddings = vocab[init_ids].clone().float()
    weight_decay = config.weight if config.regularizer in ("r1", "r2") else 0.0
    opt = RowAdam(embeddings, weight_decay=weight_decay)
    finite = torch.ones(z0.shape[0], dtype=torch.bool)
    errors = torch.zeros(z0.shape[0])
    s = config.samples_per_step
    for step in range(steps):
        rows = finite.nonzero().flatten().to(z0.device)
        if not len(rows):
            break
        gens = [generators[i] for i in rows.tolist()]
        eps = rng.randn_per_image(gens, (s, *z0.shape[1:])).flatten(0, 1)
        t = rng.randint_per_image(gens, model.num_train_timesteps, (s,)).flatten()
        free = embeddings[rows].detach().requires_grad_()
        cond = prompt_condition(model, free, None if context is None else context[rows]).repeat_interleave(s, 0)
        err = sampled_z0_error(model, z0[rows].repeat_interleave(s, 0), eps, t, cond, owner[rows].repeat_interleave(s))
        err = err.reshape(len(rows), s).mean(1)
        loss = err + (config.weight * vocabulary_entropy(free, vocab) if config.regularizer == "r2" else 0)
        loss.sum().backward()
        ok = torch.isfinite(loss.detach()) & free.grad.flatten(1).isfinite().all(1)
        finite[rows[~ok].cpu()] = False
        keep = ok.nonzero().flatten()
        opt.step(rows[keep], free.grad[keep], config.lr)
        errors[rows[keep].cpu()] = err.detach()[keep].cpu()
        if progress is not None:
            progress("prompt inversion", step + 1, steps)
    return SoftPromptResult(
        embeddings=embeddings.detach(),
        final_error=errors.numpy(),
        norm=embeddings.detach().square().sum(-1).mean(-1).cpu().numpy(),
        finite=finite.numpy(),
    )


@dataclass
class HardPromptResult:
    """Per image: the best readable prompt, its test-set error, whether it replicated, restarts used."""

    prompts: list[str]
    error: np.ndarray
    replicated: np.ndarray
    restarts: np.ndarray


def _candidate_errors(model, z0, candidates, test_eps, test_t, owner, context):
    """Mean single-step z0 error of every candidate prompt on the image's fixed test set: (B, C)."""
    batch, n_cand, _ = candidates.shape
    with torch.no_grad():
        context = None if context is None else context.repeat_interleave(n_cand, 0)
        cond = model.encode_ids(model.prompt_ids(candidates.flatten(0, 1)), context)
        total = torch.zeros(batch * n_cand, device=z0.device)
        for j in range(test_eps.shape[1]):
            total += sampled_z0_error(
                model,
                z0.repeat_interleave(n_cand, 0),
                test_eps[:, j].repeat_interleave(n_cand, 0),
                test_t[:, j].repeat_interleave(n_cand),
                cond,
                owner.repeat_interleave(n_cand),
            )
    return (total / test_eps.shape[1]).reshape(batch, n_cand), cond.reshape(batch, n_cand, *cond.shape[1:])


def hard_prompt_inversion(
    model,
    z0,
    generators,
    owner,
    config: HardPromptConfig,
    soft: SoftPromptConfig,
    similarity,
    targets,
    *,
    guidance_scales,
    sampling_steps,
    context=None,
):
    """Algorithm 1 for B images: readable prompts that trigger replication, with restarts.

    `targets` (similarity.Targets) holds each image's replication bar, as in InvMM's check;
    `context` (B, ...) each image's caption context, or None.
    """
    batch = z0.shape[0]
    vocab = model.vocabulary_embeddings.detach()
    test_eps = rng.randn_per_image(generators, (config.test_samples, *z0.shape[1:]))
    test_t = rng.randint_per_image(generators, model.num_train_timesteps, (config.test_samples,))
    best_error = torch.full((batch,), torch.inf)
    best_ids = torch.zeros(batch, config.tokens, dtype=torch.long)
    replicated = torch.zeros(batch, dtype=torch.bool)
    restarts = torch.zeros(batch, dtype=torch.long)
    for _ in range(config.restarts):
        rows = (~replicated).nonzero().flatten()
        if not len(rows):
            break
        gens = [generators[i] for i in rows.tolist()]
        dev_rows = rows.to(z0.device)
        rows_context = None if context is None else context[dev_rows]
        found = soft_prompt_inversion(
            model,
            z0[dev_rows],
            gens,
            owner[dev_rows],
            soft,
            free_tokens=config.tokens,
            steps=config.steps,
            context=rows_context,
        )
        top = (found.embeddings.to(vocab.dtype) @ vocab.T).topk(config.top_k, dim=-1).indices  # (b, N, k)
        combos = torch.tensor(list(itertools.product(range(config.top_k), repeat=top.shape[1])))
        candidates = top[:, torch.arange(top.shape[1]).unsqueeze(0), combos]  # (b, k^N, N)
        errors, conds = _candidate_errors(
            model, z0[dev_rows], candidates, test_eps[dev_rows], test_t[dev_rows], owner[dev_rows], rows_context
        )
        err, pick = errors.min(1)
        chosen = torch.arange(len(rows))
        check = replication_check(
            model,
            z0[dev_rows],
            test_eps[dev_rows, :1],
            conds[chosen, pick],
            guidance_scales,
            similarity,
            targets[dev_rows],
            owner[dev_rows],
            num_steps=sampling_steps,
        )
        restarts[rows] += 1
        hit = check.replicated.cpu()
        take = hit | (err.cpu() < best_error[rows])
        best_error[rows[take]] = err.cpu()[take]
        best_ids[rows[take]] = candidates[chosen, pick].cpu()[take]
        replicated[rows] = hit
    return HardPromptResult(
        prompts=model.decode_tokens(best_ids),
        error=best_error.numpy(),
        replicated=replicated.numpy(),
        restarts=restarts.numpy(),
    )
