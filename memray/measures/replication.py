"""Does the model replicate the target from these noises and this prompt? (InvMM's success check)

Success at a guidance scale needs the MINIMUM similarity over K samples to reach the image's
bar (similarity.py: the absolute threshold raised above its nulls), so the check is staged: the
first noise at every scale, the other K - 1 only at the scales the first one passed
(`rest="passing"`). The decision is exactly that of generating all K at every scale, while a
failing check (the common case early in an optimisation) costs 1/K of it.

Every check also counts: at each scale where all K noises were generated, how many replicate
(k of K), the evidence of the counting verdict (docs/science.md, "the verdict"). A screen that
must always count uses `rest="best"`: the other K - 1 noises at the one scale where the first
came closest to the bar, replicated or not.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memray.measures.sampling import aligned_start, ddim_generate
from memray.measures.similarity import Targets


@dataclass
class ReplicationResult:
    """Per image: replicated, the similarity and guidance scale that decided it, and the counts."""

    replicated: torch.Tensor  # (B,) bool: every one of the K noises replicated at some scale
    similarity: torch.Tensor  # (B,) min over K at the best passing scale; else best first-noise similarity
    guidance: torch.Tensor  # (B,) scale of `similarity`
    replicas: torch.Tensor  # (B,) long: the most of the K noises that replicated at one scale where all K ran
    replicas_guidance: torch.Tensor  # (B,) that scale (nan where nothing was counted)
    counted: torch.Tensor  # (B,) long: K where some scale ran all K noises, else 0 (nothing was counted)
    best: torch.Tensor  # (B,) the highest similarity of any sample generated


def failing_check_forwards(guidance_scales, num_steps: int, conditional: bool = True) -> int:
    """UNet forwards of a check that fails at every scale: its first noise at each scale, a guided
    scale costing two evaluations a step (an unconditional model checks only guidance 1)."""
    scales = guidance_scales if conditional else (1.0,)
    return num_steps * sum(1 if scale == 1 else 2 for scale in scales)


@torch.no_grad()
def sample_similarities(
    model, z0, z_T, cond, guidance, similarity, target_features, owner, *, num_steps: int, aligned: bool = False
) -> torch.Tensor:
    """Similarity to its target of the sample generated from each start z_T (n, ...) at its own guidance (n,)."""
    if aligned:
        z_T = aligned_start(model, z0, z_T, num_steps)
    generated = ddim_generate(model, z_T, cond, guidance.to(model.device), owner, num_steps)
    return similarity.compare(similarity.features(model, generated), target_features)


@torch.no_grad()
def count_replicas(
    model, z0, noises, cond, guidance, similarity, targets: Targets, owner, *, num_steps: int, aligned: bool = False
) -> torch.Tensor:
    """How many of each image's K noises (B, K, ...) replicate it at the image's guidance scale (B,)."""
    batch, k = noises.shape[:2]
    rows = torch.arange(batch, device=noises.device).repeat_interleave(k)
    sims = sample_similarities(
        model,
        z0[rows],
        noises.flatten(0, 1),
        None if cond is None else cond[rows],
        guidance.repeat_interleave(k),
        similarity,
        targets.features[rows],
        owner[rows],
        num_steps=num_steps,
        aligned=aligned,
    )
    return (sims.reshape(batch, k).cpu() >= targets.threshold.cpu().unsqueeze(1)).sum(1)


@torch.no_grad()
def replication_check(
    model,
    z0: torch.Tensor,
    noises: torch.Tensor,
    cond: torch.Tensor | None,
    guidance_scales,
    similarity,
    targets: Targets,
    owner: torch.Tensor,
    *,
    num_steps: int = 50,
    aligned: bool = False,
    rest: str = "passing",
) -> ReplicationResult:
    """z0 (B, ...), noises (B, K, ...), cond (B, L, D) or None; one prompt and one bar per image.

    `rest`: where the K - 1 noises after the first run: "passing" (every scale the first noise
    replicated at) or "best" (the scale where the first came closest, always).
    """
    batch, k = noises.shape[:2]
    scales = torch.tensor(guidance_scales if cond is not None else [1.0], dtype=torch.float32)
    n_scales = len(scales)

    def run(image_idx, noise_idx, scale_idx):
        c = None if cond is None else cond[image_idx]
        return sample_similarities(
            model,
            z0[image_idx],
            noises[image_idx, noise_idx],
            c,
            scales[scale_idx],
            similarity,
            targets.features[image_idx],
            owner[image_idx],
            num_steps=num_steps,
            aligned=aligned,
        )

    image_idx = torch.arange(batch).repeat_interleave(n_scales)
    scale_idx = torch.arange(n_scales).repeat(batch)
    bar = targets.threshold.cpu().unsqueeze(1)
    first = run(image_idx, torch.zeros_like(image_idx), scale_idx).reshape(batch, n_scales).cpu()
    best_seen, best_seen_scale = first.max(1)
    minimum, best = first.clone(), best_seen.clone()
    hits = (first >= bar).long()  # replicas per (image, scale), of the noises generated there
    complete = torch.zeros_like(first, dtype=torch.bool) if k > 1 else torch.ones_like(first, dtype=torch.bool)
    if rest == "passing":
        chosen = (first >= bar).nonzero()
    elif rest == "best":
        chosen = torch.stack([torch.arange(batch), best_seen_scale], 1)
    else:
        raise ValueError(f"rest must be 'passing' or 'best', got {rest!r}")
    if k > 1 and len(chosen):
        img, sc = chosen[:, 0], chosen[:, 1]
        noise = torch.arange(1, k).repeat(len(chosen))
        others = run(img.repeat_interleave(k - 1), noise, sc.repeat_interleave(k - 1)).reshape(len(chosen), k - 1).cpu()
        minimum[img, sc] = torch.minimum(first[img, sc], others.amin(1))
        hits[img, sc] += (others >= bar[img]).sum(1)
        complete[img, sc] = True
        rest_best = torch.full_like(first, -torch.inf)
        rest_best[img, sc] = others.amax(1)
        best = torch.maximum(best, rest_best.amax(1))
    success = (minimum >= bar) & complete
    replicated = success.any(1)
    passing = torch.where(success, minimum, torch.full_like(minimum, -torch.inf))
    counts = torch.where(complete, hits, -1)
    replicas, replicas_scale = counts.max(1)
    counted = complete.any(1)
    return ReplicationResult(
        replicated=replicated,
        similarity=torch.where(replicated, passing.amax(1), best_seen),
        guidance=torch.where(replicated, scales[passing.argmax(1)], scales[best_seen_scale]),
        replicas=replicas.clamp_min(0),
        replicas_guidance=torch.where(counted, scales[replicas_scale], torch.nan),
        counted=torch.where(counted, k, 0),
        best=best,
    )
