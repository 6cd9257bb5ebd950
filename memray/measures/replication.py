"""Does the model replicate the target from these noises and this prompt? (InvMM's success check)

Success at a guidance scale needs the MINIMUM similarity over K samples to reach the image's
bar (similarity.py: the absolute threshold raised above its nulls), so the check is staged: the
first noise at every scale, the other K - 1 only at the scales the first one passed. The
decision is exactly that of generating all K at every scale, while a failing check (the common
case early in an optimisation) costs 1/K of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memray.measures.sampling import aligned_start, ddim_generate
from memray.measures.similarity import Targets


@dataclass
class ReplicationResult:
    """Per image: replicated, the similarity and guidance scale that decided it."""

    replicated: torch.Tensor  # (B,) bool
    similarity: torch.Tensor  # (B,) min over K at the best passing scale; else best first-noise similarity
    guidance: torch.Tensor  # (B,) scale of `similarity`


def failing_check_forwards(guidance_scales, num_steps: int, conditional: bool = True) -> int:
    """UNet forwards of a check that fails at every scale: its first noise at each scale, a guided
    scale costing two evaluations a step (an unconditional model checks only guidance 1)."""
    scales = guidance_scales if conditional else (1.0,)
    return num_steps * sum(1 if scale == 1 else 2 for scale in scales)


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
) -> ReplicationResult:
    """z0 (B, ...), noises (B, K, ...), cond (B, L, D) or None; one prompt and one bar per image."""
    batch, k = noises.shape[:2]
    scales = torch.tensor(guidance_scales if cond is not None else [1.0], dtype=torch.float32)
    n_scales = len(scales)

    def run(image_idx, noise_idx, scale_idx):
        z_T = noises[image_idx, noise_idx]
        if aligned:
            z_T = aligned_start(model, z0[image_idx], z_T, num_steps)
        c = None if cond is None else cond[image_idx]
        generated = ddim_generate(model, z_T, c, scales[scale_idx].to(model.device), owner[image_idx], num_steps)
        return similarity.compare(similarity.features(model, generated), targets.features[image_idx])

    image_idx = torch.arange(batch).repeat_interleave(n_scales)
    scale_idx = torch.arange(n_scales).repeat(batch)
    bar = targets.threshold.cpu().unsqueeze(1)
    first = run(image_idx, torch.zeros_like(image_idx), scale_idx).reshape(batch, n_scales).cpu()
    minimum = first.clone()
    passed = (first >= bar).nonzero()
    if k > 1 and len(passed):
        img = passed[:, 0].repeat_interleave(k - 1)
        sc = passed[:, 1].repeat_interleave(k - 1)
        noise = torch.arange(1, k).repeat(len(passed))
        rest = run(img, noise, sc).reshape(len(passed), k - 1).cpu()
        minimum[passed[:, 0], passed[:, 1]] = torch.minimum(first[passed[:, 0], passed[:, 1]], rest.amin(1))
    success = minimum >= bar
    replicated = success.any(1)
    passing = torch.where(success, minimum, torch.full_like(minimum, -torch.inf))
    best_seen, best_seen_scale = first.max(1)
    return ReplicationResult(
        replicated=replicated,
        similarity=torch.where(replicated, passing.amax(1), best_seen),
        guidance=torch.where(replicated, scales[passing.argmax(1)], scales[best_seen_scale]),
    )
