"""Stable Diffusion 3.x: an MMDiT (SD3Transformer2DModel) trained by flow matching, three text encoders.

The condition is the pipeline's: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded
to the transformer's width and followed by T5's hidden states along the sequence, plus both CLIPs'
pooled projections. The flow-matching schedule (schedules.FlowMatchingSchedule) gives the x0
prediction x_t - sigma v, the noising (1 - sigma) x0 + sigma eps, and the Euler sampler.

Prompt inversion follows the reference: the prompt fills CLIP-L's token slots, while CLIP-G and T5 are
conditioned on the image's caption (caption_context). Without a caption they see the empty prompt, as
in the pipeline's unconditional branch, so the prompt is still CLIP-L's alone.
"""

from __future__ import annotations

import torch

from memray.errors import CheckpointError
from memray.models.loading import component_class_name, load_component
from memray.models.sd import StableDiffusionAdapter, pack_pooled, unpack_pooled

T5_LENGTH = 256  # the pipeline's default max_sequence_length


class StableDiffusion3Adapter(StableDiffusionAdapter):
    """SD3Transformer2DModel + CLIP-L (inverted) + CLIP-G and T5 (the caption's; T5 optional) + AutoencoderKL."""

    family = "sd3"
    pipelines = frozenset({"StableDiffusion3Pipeline"})

    @classmethod
    def load(cls, path, *, scheduler, allow_pickle: bool, **options) -> StableDiffusion3Adapter:
        """Load the transformer, VAE, text encoders and tokenizers of a checkpoint directory (T5 where present)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        def component(name, cls):
            return load_component(path, name, cls, allow_pickle=allow_pickle)

        has_t5 = component_class_name(path, "text_encoder_3") is not None
        return cls(
            unet=component("transformer", SD3Transformer2DModel),
            vae=component("vae", AutoencoderKL),
            text_encoders=[component("text_encoder", CLIPTextModelWithProjection)],
            tokenizers=[component("tokenizer", AutoTokenizer)],
            clip_g=component("text_encoder_2", CLIPTextModelWithProjection),
            tokenizer_g=component("tokenizer_2", AutoTokenizer),
            t5=component("text_encoder_3", T5EncoderModel) if has_t5 else None,
            t5_tokenizer=component("tokenizer_3", AutoTokenizer) if has_t5 else None,
            scheduler=scheduler,
            **options,
        )

    def __init__(
        self,
        unet,
        vae,
        text_encoders,
        tokenizers,
        scheduler,
        *,
        clip_g,
        tokenizer_g,
        t5=None,
        t5_tokenizer=None,
        **options,
    ):
        device = options.get("device", "cpu")
        self.clip_g = clip_g.to(device).eval().requires_grad_(False)
        self.tokenizer_g = tokenizer_g
        self.t5 = None if t5 is None else t5.to(device).eval().requires_grad_(False)
        self.t5_tokenizer = t5_tokenizer
        self.width = int(unet.config.joint_attention_dim)
        self.clip_l_width = int(text_encoders[0].config.hidden_size)
        self.pooled_l_width = int(text_encoders[0].config.projection_dim)
        self.pooled_width = self.pooled_l_width + int(clip_g.config.projection_dim)
        if tokenizer_g.model_max_length != tokenizers[0].model_max_length:
            raise CheckpointError("SD 3's two CLIP tokenizers have different context lengths; the pipeline needs one")
        self._empty_context = None
        super().__init__(unet, vae, text_encoders, tokenizers, scheduler, **options)

    @torch.no_grad()
    def caption_context(self, captions: list[str]) -> torch.Tensor:
        """CLIP-G's penultimate states and pooled projection and T5's states of each caption ("" for none),
        in the condition's layout with CLIP-L's part zero (the prompt fills it)."""
        captions = [caption or "" for caption in captions]
        n = len(captions)
        ids = self.tokenizer_g(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        ).input_ids
        with self._autocast():
            clip_g = self.clip_g(input_ids=ids.to(self.device), output_hidden_states=True)
            if self.t5 is None:  # the pipeline without T5: zeros in its place
                t5 = torch.zeros(n, T5_LENGTH, self.width, device=self.device)
            else:
                t5_ids = self.t5_tokenizer(
                    captions, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt"
                ).input_ids
                t5 = self.t5(t5_ids.to(self.device))[0]
        clip = clip_g.hidden_states[-2].float()
        clip = torch.nn.functional.pad(clip, (self.clip_l_width, self.width - self.clip_l_width - clip.shape[-1]))
        pooled = torch.nn.functional.pad(clip_g.text_embeds.float(), (self.pooled_l_width, 0))
        return pack_pooled(torch.cat([clip, t5.float()], dim=1), pooled)

    def _condition(self, outputs, context) -> torch.Tensor:
        """CLIP-L's penultimate states and pooled projection of the prompt, in the caption's context."""
        hidden, pooled = outputs[0].hidden_states[-2].float(), outputs[0].text_embeds.float()
        if context is None:
            if self._empty_context is None:
                self._empty_context = self.caption_context([""])
            context = self._empty_context.expand(len(hidden), -1, -1)
        length = hidden.shape[1]
        clip = torch.cat([hidden, context[:, :length, self.clip_l_width :]], dim=-1)
        pooled = torch.cat([pooled, context[:, -1, self.pooled_l_width :]], dim=-1)
        return torch.cat([clip, context[:, length:-1], pooled.unsqueeze(1)], dim=1)

    def _unet_output(self, z_t, t, cond):
        hidden, pooled = unpack_pooled(cond.to(self.unet.dtype), self.pooled_width)
        return self.unet(
            hidden_states=z_t.to(self.unet.dtype),
            timestep=t.to(self.unet.dtype),
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample
