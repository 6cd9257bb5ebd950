"""Stable Diffusion 3.x: an MMDiT (SD3Transformer2DModel) trained by flow matching, three text encoders.

The condition is the pipeline's: CLIP-L and CLIP-G penultimate hidden states side by side, zero-padded
to the transformer's width and followed by T5's hidden states along the sequence, plus both CLIPs'
pooled projections. The flow-matching schedule (schedules.FlowMatchingSchedule) gives the x0
prediction x_t - sigma v, the noising (1 - sigma) x0 + sigma eps, and the Euler sampler.

Prompt inversion (departure from the reference, docs/science.md): the reference inverts CLIP-L's
token slots and conditions CLIP-G and T5 on the caption. memray inverts the CLIP-L and CLIP-G slots
together (one token distribution over their shared vocabulary, as for SDXL), starting at the caption
where there is one, and gives T5 the empty prompt, with or without a caption.
"""

from __future__ import annotations

import torch

from memray.models.loading import component_class_name, load_component
from memray.models.sd import StableDiffusionAdapter, pack_pooled, unpack_pooled

T5_LENGTH = 256  # the pipeline's default max_sequence_length


class StableDiffusion3Adapter(StableDiffusionAdapter):
    """SD3Transformer2DModel + two CLIPTextModelWithProjection + T5EncoderModel (optional) + AutoencoderKL."""

    family = "sd3"
    pipelines = frozenset({"StableDiffusion3Pipeline"})

    @classmethod
    def load(cls, path, *, scheduler, allow_pickle: bool, **options) -> StableDiffusion3Adapter:
        """Load the transformer, VAE, text encoders and tokenizers of a checkpoint directory (T5 where present)."""
        from diffusers import AutoencoderKL, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

        has_t5 = component_class_name(path, "text_encoder_3") is not None
        return cls(
            unet=load_component(path, "transformer", SD3Transformer2DModel, allow_pickle=allow_pickle),
            vae=load_component(path, "vae", AutoencoderKL, allow_pickle=allow_pickle),
            text_encoders=[
                load_component(path, name, CLIPTextModelWithProjection, allow_pickle=allow_pickle)
                for name in ("text_encoder", "text_encoder_2")
            ],
            tokenizers=[
                load_component(path, name, AutoTokenizer, allow_pickle=allow_pickle)
                for name in ("tokenizer", "tokenizer_2")
            ],
            t5=load_component(path, "text_encoder_3", T5EncoderModel, allow_pickle=allow_pickle) if has_t5 else None,
            t5_tokenizer=load_component(path, "tokenizer_3", AutoTokenizer, allow_pickle=allow_pickle)
            if has_t5
            else None,
            scheduler=scheduler,
            **options,
        )

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler, *, t5=None, t5_tokenizer=None, **options):
        device = options.get("device", "cpu")
        width = int(unet.config.joint_attention_dim)
        self.pooled_width = sum(int(encoder.config.projection_dim) for encoder in text_encoders)
        if t5 is None:  # the pipeline without T5: zeros in its place
            self.t5_empty = torch.zeros(1, T5_LENGTH, width, device=device)
        else:
            ids = t5_tokenizer([""], padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt")
            with torch.no_grad():
                self.t5_empty = t5.to(device).eval()(ids.input_ids.to(device))[0].float()
        super().__init__(unet, vae, text_encoders, tokenizers, scheduler, **options)

    def _condition(self, outputs) -> torch.Tensor:
        """[CLIP-L | CLIP-G | zeros] penultimate states, then T5's, and the pooled [CLIP-L | CLIP-G]."""
        clip = torch.cat([output.hidden_states[-2] for output in outputs], dim=-1).float()
        clip = torch.nn.functional.pad(clip, (0, self.t5_empty.shape[-1] - clip.shape[-1]))
        hidden = torch.cat([clip, self.t5_empty.expand(len(clip), -1, -1)], dim=1)
        pooled = torch.cat([output.text_embeds for output in outputs], dim=-1).float()
        return pack_pooled(hidden, pooled)

    def _unet_output(self, z_t, t, cond):
        hidden, pooled = unpack_pooled(cond.to(self.unet.dtype), self.pooled_width)
        return self.unet(
            hidden_states=z_t.to(self.unet.dtype),
            timestep=t.to(self.unet.dtype),
            encoder_hidden_states=hidden,
            pooled_projections=pooled,
        ).sample
