"""What the measures ask of a model, written down once; every family adapter provides it.

Measures are written against these protocols only, so that a new family is a new adapter, never
a `family ==` branch in a measure. Per-family defaults the measures need are attributes here.

A condition is one tensor (n, L, D) per sample, whatever the family: rows index it, torch.cat joins
it with `empty_condition`, repeat_interleave repeats it. Families with pooled text embeddings
(SDXL, SD 3.x) carry them zero-padded in one extra last row of L, unpacked inside the adapter.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from memray.models.adapter import EvalCounter, Prediction


@runtime_checkable
class DiffusionModel(Protocol):
    """A denoiser on a schedule, with counted evaluations: all that the noise measures use."""

    family: str
    is_conditional: bool
    kl_weight_delta: float  # InvMM's KL weight step, the reference's per-family value
    prediction_type: str  # epsilon, v_prediction, sample or flow
    device: torch.device
    resolution: int  # pixels a side
    latent_shape: tuple[int, int, int]  # z0 of one image
    num_train_timesteps: int  # t is drawn from [0, num_train_timesteps), larger is noisier
    counter: EvalCounter

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, R, R) in [-1, 1] -> z0 (B, *latent_shape)."""

    def decode_latents(self, z0: torch.Tensor) -> torch.Tensor:
        """z0 -> pixels (B, 3, R, R) in [-1, 1]."""

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, owner: torch.Tensor) -> Prediction:
        """eps_hat and z0_hat of n samples at per-sample t; one counted evaluation each, charged to `owner`."""

    def noisy_sample(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process at per-sample t (the schedule's: abar or flow matching)."""

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """The sampler's timesteps, noisiest first."""

    def sampler_step(self, timesteps: torch.Tensor, i: int, eps: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """The deterministic sampler's update from timesteps[i] (DDIM eta = 0; Euler for flow matching)."""

    def measure_timesteps(self, count: int) -> torch.Tensor:
        """`count` timesteps spread uniformly over the training levels, for estimating E_t."""

    def empty_condition(self, n: int) -> torch.Tensor | None:
        """The unconditional branch's condition for n samples (None for unconditional models)."""


@runtime_checkable
class TextConditionedModel(DiffusionModel, Protocol):
    """A text-to-image model: prompts of N free token slots over one vocabulary, and their conditions.

    Where a family inverts several text encoders over one vocabulary (SDXL), a token embedding is
    the concatenation of that token's row in each encoder's table, so one token mix embeds in all of
    them at once. Where a family conditions some encoders on the caption (SD 3.x), `caption_context`
    carries that part, per image; everything that builds a condition from a prompt takes it.
    """

    tokenizer: object  # the first CLIP tokenizer: ids, special tokens, readable tokens
    num_free_slots: int  # token slots between the start and the end token
    vocabulary_embeddings: torch.Tensor  # (V, d)

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> fixed-length ids (n, L): [start, tokens..., end, pad...]."""

    def caption_slot_ids(self, prompts: list[str]) -> torch.Tensor:
        """Each prompt's tokens as they fill the free slots: (n, N)."""

    def prompt_ids(self, free_ids: torch.Tensor) -> torch.Tensor:
        """Free-slot ids (n, N) -> full ids (n, L)."""

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Full ids (n, L) -> their token embeddings (n, L, d), rows of vocabulary_embeddings."""

    def prompt_embeddings(self, free: torch.Tensor) -> torch.Tensor:
        """Free-slot embeddings (n, N, d) -> the full sequence's embeddings (n, L, d)."""

    def caption_context(self, captions: list[str]) -> torch.Tensor | None:
        """Per caption, the part of the condition the caption fixes rather than the prompt (SD 3.x: CLIP-G
        and T5 on the caption, "" where there is none), as rows the measures index and repeat; None where
        the condition is the prompt's alone (SD 1.x/2.x, SDXL)."""

    def encode_ids(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Full ids (n, L) and each row's caption context -> condition (n, L', D)."""

    def encode_embeddings(
        self, embeddings: torch.Tensor, ids: torch.Tensor, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Full-sequence token embeddings (n, L, d) laid out like `ids` -> condition, differentiable in them."""

    def decode_tokens(self, token_ids: torch.Tensor) -> list[str]:
        """Free-slot ids (n, N) -> readable prompts."""
