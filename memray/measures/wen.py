"""M6. Prompt-based screens of a caption: Wen et al. (ICLR 2024) and Webster (2023).

Wen: d = || eps_hat(z_t, c) - eps_hat(z_t, "") ||, averaged over the first sampling steps and a
few generations from the caption; the gradient of d with respect to each token embedding (its L2
norm) attributes the signal to words.

Webster's one-step denoising confidence, from the same first-step UNet calls: how far one guided
denoising step moves the start, (x_T - x0_hat)^2 in the sampler's x = z / alpha units, which is
(sigma_T / alpha_T)^2 eps_g^2 with eps_g = eps_u + w (eps_c - eps_u) the guided noise prediction.
The factor is one constant per model, so memray reports mean(eps_g^2) (averaged over entries and
generations): a memorized caption pulls every start hard towards its image.

Cheap (a handful of UNet calls): screens and an explanation, not a replacement for the image measures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from memray.measures import rng
from memray.measures.settings import WenConfig


@dataclass
class WenResult:
    """Per image: the screen score and (token, attribution) pairs of its caption."""

    score: np.ndarray
    attribution: list[list[tuple[str, float]]]
    one_step_confidence: np.ndarray  # Webster's denoising confidence at the first step


def wen_screen(model, captions: list[str], generators, owner, config: WenConfig) -> WenResult:
    """Screen B captioned images; d and its token gradients from the same UNet calls."""
    batch, g = len(captions), config.generations
    ids = model.token_ids(captions)
    embeddings = model.token_embeddings(ids).detach().clone().requires_grad_()
    cond = model.encode_embeddings(embeddings, ids, model.caption_context(captions)).repeat_interleave(g, 0)
    uncond = model.empty_condition(batch * g)
    owner_g = owner.repeat_interleave(g)
    z = rng.randn_per_image(generators, (g, *model.latent_shape)).flatten(0, 1)
    timesteps = model.sampling_timesteps(config.sampling_steps)
    distance = torch.zeros(batch * g, device=model.device)
    confidence = None
    for i, t in enumerate(timesteps[: config.steps]):
        t_n = t.expand(batch * g)
        pred = model.predict(
            torch.cat([z, z]), torch.cat([t_n, t_n]), torch.cat([cond, uncond]), torch.cat([owner_g, owner_g])
        )
        eps_c, eps_u = pred.eps[: batch * g], pred.eps[batch * g :]
        z0_c, z0_u = pred.z0[: batch * g], pred.z0[batch * g :]
        distance = distance + (eps_c - eps_u).flatten(1).norm(dim=1)
        with torch.no_grad():
            eps = eps_u + config.guidance * (eps_c - eps_u)
            if confidence is None:
                confidence = eps.square().flatten(1).mean(1).reshape(batch, g).mean(1)
            z = model.sampler_step(timesteps, i, eps, z0_u + config.guidance * (z0_c - z0_u))
    score = (distance / config.steps).reshape(batch, g).mean(1)
    score.sum().backward()
    token_norms = embeddings.grad.norm(dim=-1)
    attribution = []
    for row, norms in zip(ids.tolist(), token_norms.tolist()):
        words = model.tokenizer.convert_ids_to_tokens(row)
        special = {model.tokenizer.bos_token_id, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id}
        attribution.append(
            [(w.replace("</w>", ""), float(v)) for tok, w, v in zip(row, words, norms) if tok not in special]
        )
    return WenResult(
        score=score.detach().cpu().numpy(),
        attribution=attribution,
        one_step_confidence=confidence.cpu().numpy(),
    )
