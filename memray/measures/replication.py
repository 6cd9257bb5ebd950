"""Does the model replicate the target from these noises and this prompt? (InvMM's success check)

Success at a guidance scale needs the MINIMUM similarity over K samples to reach the threshold,
so the check is staged: the first noise at every scale, the other K - 1 only at the scales the
first one passed. The decision is exactly that of generating all K at every scale, while a
failing check (the common case early in an optimisation) costs 1/K of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memray.measures.sampling import aligned_start, ddim_generate


@dataclass
class ReplicationResult:
    """Per image: replicated, the similarity and guidance scale that decided it."""

    replicated: torch.Tensor  # (B,) bool
    similarity: torch.Tensor  # (B,) min over K at the best passing scale; else best first-noise similarity
    guidance: torch.Tensor  # (B,) scale of `similarity` (nan where no scale passed)


def _generate_and_score(model, z0, noises, cond, scales, similarity, owner, num_steps, aligned):
    """Similarity of the sample from each (image, noise, scale) triple; inputs already flattened."""
    z_T = aligned_start(model, z0, noises, num_steps) if aligned else noises
    generated = ddim_generate(model, z_T, cond, scales, owner, num_steps)
    return similarity(model, generated, z0)


@torch.no_grad()
def replication_check(
    model,
    z0: torch.Tensor,
    noises: torch.Tensor,
    cond: torch.Tensor | None,
    guidance_scales,
    similarity,
    owner: torch.Tensor,
    *,
    num_steps: int = 50,
    aligned: bool = True,
) -> ReplicationResult:
    """z0 (B, ...), noises (B, K, ...), cond (B, L, D) or None; one prompt per image."""
    batch, k = noises.shape[:2]
    scales = torch.tensor(guidance_scales if cond is not None else [1.0], dtype=torch.float32)
    n_scales = len(scales)

    def run(image_idx, noise_idx, scale_idx):
        return _generate_and_score(
            model,
            z0[image_idx],
            noises[image_idx, noise_idx],
            None if cond is None else cond[image_idx],
            scales[scale_idx],
            similarity,
            owner[image_idx],
            num_steps,
            aligned,
        )

    image_idx = torch.arange(batch).repeat_interleave(n_scales)
    scale_idx = torch.arange(n_scales).repeat(batch)
    first = run(image_idx, torch.zeros_like(image_idx), scale_idx).reshape(batch, n_scales)
    minimum = first.clone()
    passed = (first >= similarity.threshold).nonzero()
    if k > 1 and len(passed):
        img = passed[:, 0].repeat_interleave(k - 1)
        sc = passed[:, 1].repeat_interleave(k - 1)
        noise = torch.arange(1, k).repeat(len(passed))
        rest = run(img, noise, sc).reshape(len(passed), k - 1)
        minimum[passed[:, 0], passed[:, 1]] = torch.minimum(first[passed[:, 0], passed[:, 1]], rest.amin(1))
    success = minimum >= similarity.threshold
    replicated = success.any(1)
    best_passing = torch.where(success, minimum, torch.full_like(minimum, -torch.inf)).amax(1)
    best_seen, best_seen_scale = first.max(1)
    best_scale = torch.where(success, minimum, torch.full_like(minimum, -torch.inf)).argmax(1)
    return ReplicationResult(
        replicated=replicated,
        similarity=torch.where(replicated, best_passing, best_seen),
        guidance=torch.where(replicated, scales[best_scale], scales[best_seen_scale]),
    )
