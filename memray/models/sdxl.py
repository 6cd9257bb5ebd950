"""Stable Diffusion XL (base): two CLIP text encoders, pooled text embeddings and size/crop time ids.

Prompt inversion runs over both encoders' token slots at once: one token distribution over their
shared vocabulary, embedded by each encoder's own table (protocol.TextConditionedModel). The
refiner (StableDiffusionXLImg2ImgPipeline with only the second encoder) is out of scope.
"""

from __future__ import annotations

import torch

from memray.models.loading import load_component, pipeline_setting
from memray.models.sd import StableDiffusionAdapter, pack_pooled, unpack_pooled


class StableDiffusionXLAdapter(StableDiffusionAdapter):
    """UNet2DConditionModel (text_time embedding) + CLIPTextModel + CLIPTextModelWithProjection + AutoencoderKL."""

    family = "sdxl"
    pipelines = frozenset({"StableDiffusionXLPipeline"})

    @classmethod
    def load(cls, path, *, scheduler, allow_pickle: bool, **options) -> StableDiffusionXLAdapter:
        """Load the UNet, VAE, both text encoders and tokenizers of a checkpoint directory."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

        return cls(
            unet=load_component(path, "unet", UNet2DConditionModel, allow_pickle=allow_pickle),
            vae=load_component(path, "vae", AutoencoderKL, allow_pickle=allow_pickle),
            text_encoders=[
                load_component(path, "text_encoder", CLIPTextModel, allow_pickle=allow_pickle),
                load_component(path, "text_encoder_2", CLIPTextModelWithProjection, allow_pickle=allow_pickle),
            ],
            tokenizers=[
                load_component(path, name, AutoTokenizer, allow_pickle=allow_pickle)
                for name in ("tokenizer", "tokenizer_2")
            ],
            scheduler=scheduler,
            zero_empty_prompt=bool(pipeline_setting(path, "force_zeros_for_empty_prompt", True)),
            **options,
        )

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler, *, zero_empty_prompt=True, **options):
        self.pooled_width = int(text_encoders[1].config.projection_dim)
        super().__init__(unet, vae, text_encoders, tokenizers, scheduler, **options)
        if zero_empty_prompt:
            # The pipeline's force_zeros_for_empty_prompt (SDXL base: true): its unconditional branch
            # is all zeros, not the encoded empty prompt.
            self._empty = torch.zeros_like(self._empty)
        # (original size, crop top-left, target size): the full image, uncropped, at its own size.
        size = float(self.resolution)
        self.time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device)

    def _condition(self, outputs, context) -> torch.Tensor:
        """Both encoders' penultimate hidden states side by side, and the second's pooled projection."""
        hidden = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1)
        return pack_pooled(hidden, outputs[1].text_embeds).float()

    def _unet_output(self, z_t, t, cond):
        hidden, pooled = unpack_pooled(cond.to(self.unet.dtype), self.pooled_width)
        added = {"text_embeds": pooled, "time_ids": self.time_ids.expand(len(z_t), -1).to(self.unet.dtype)}
        return self.unet(z_t.to(self.unet.dtype), t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
