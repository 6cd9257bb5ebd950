"""The start check: does the model replicate the image from plain N(0, I) noise under its own caption?

InvMM's check at step 0, on its own, as a screen (docs/science.md, "screens"): most memorized
images replicate there already, before any optimisation. Per image:

1. a pilot noise at every guidance scale, under the caption (the empty prompt without one), a
   short DDIM each; the scale whose sample came closest to the image picks where to count;
2. K fresh noises at that scale: k of K replicate (clear the image's bar, similarity.py).

    progress = (best - null) / (bar - null)

where best is the highest similarity of any sample, bar the image's replication bar and null the
higher of its nulls: 0 reads "no closer than an unrelated generation", 1 "a replica"
(similarity.progress_to_bar, the early stop's measure of the way covered). The K counted noises are drawn after the scale was chosen, so k ~
Binomial(K, q) for the rate q at which the caption replicates the image from N(0, I) at that
scale: the Clopper-Pearson lower limit of k / K bounds q itself (KL 0: no data processing needed).

Cost per image: steps x (sum over scales of 1 unguided or 2 guided evaluations) for the pilot, and
K x steps x that of the chosen scale. No optimiser state: a GPU call can hold hundreds of images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memray.measures import rng
from memray.measures.replication import sample_similarities
from memray.measures.settings import StartCheckConfig
from memray.measures.similarity import Targets


@dataclass
class StartCheckResult:
    """Per image (B,) tensors on the CPU."""

    similarity: torch.Tensor  # the highest similarity of any sample
    progress: torch.Tensor  # (similarity - null) / (bar - null)
    replicas: torch.Tensor  # long: how many of the K counted noises replicated
    guidance: torch.Tensor  # the scale the K noises were counted at


@torch.no_grad()
def start_check(
    model, z0, cond, generators, owner, config: StartCheckConfig, similarity, targets: Targets, *, guided: bool = True
) -> StartCheckResult:
    """Screen B images: cond (B, L, D) each image's caption condition (None for unconditional models).

    `guided` False: the images have no caption (cond is the empty prompt's), so every guidance
    scale gives the same sample: only scale 1 runs.
    """
    batch, k = z0.shape[0], config.noises
    scales = torch.tensor(config.guidance_scales if guided and cond is not None else (1.0,), dtype=torch.float32)
    n_scales = len(scales)
    pilot_noise = rng.randn_per_image(generators, z0.shape[1:])
    counted_noise = rng.randn_per_image(generators, (k, *z0.shape[1:]))

    def similarities(rows, z_T, guidance):
        c = None if cond is None else cond[rows]
        return sample_similarities(
            model,
            z0[rows],
            z_T,
            c,
            guidance,
            similarity,
            targets.features[rows],
            owner[rows],
            num_steps=config.steps,
        ).cpu()

    rows = torch.arange(batch, device=z0.device)
    pilot = similarities(
        rows.repeat_interleave(n_scales), pilot_noise.repeat_interleave(n_scales, 0), scales.repeat(batch)
    ).reshape(batch, n_scales)
    pilot_best, chosen = pilot.max(1)
    counted = similarities(rows.repeat_interleave(k), counted_noise.flatten(0, 1), scales[chosen].repeat_interleave(k))
    counted = counted.reshape(batch, k)
    best = torch.maximum(pilot_best, counted.amax(1))
    return StartCheckResult(
        similarity=best,
        progress=targets.progress(best),
        replicas=(counted >= targets.threshold.cpu().unsqueeze(1)).sum(1),
        guidance=scales[chosen],
    )
