"""Stable Diffusion 1.x / 2.x: VAE latents, a CLIP text encoder and a conditional UNet."""

from __future__ import annotations

import torch

from memray.models.adapter import DiffusionAdapter
from memray.models.loading import load_component


class StableDiffusionAdapter(DiffusionAdapter):
    """UNet2DConditionModel + CLIPTextModel + AutoencoderKL, any scheduler prediction type."""

    family = "sd"
    is_conditional = True
    pipelines = frozenset(
        {"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"}
    )

    @classmethod
    def load(cls, path, *, scheduler, allow_pickle: bool, **options) -> StableDiffusionAdapter:
        """Load the UNet, VAE, text encoder and tokenizer of a checkpoint directory."""
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        return cls(
            unet=load_component(path, "unet", UNet2DConditionModel, allow_pickle=allow_pickle),
            vae=load_component(path, "vae", AutoencoderKL, allow_pickle=allow_pickle),
            text_encoder=load_component(path, "text_encoder", CLIPTextModel, allow_pickle=allow_pickle),
            tokenizer=load_component(path, "tokenizer", AutoTokenizer, allow_pickle=allow_pickle),
            scheduler=scheduler,
            **options,
        )

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, *, device="cpu", autocast_dtype=None):
        super().__init__(unet, scheduler, device=device, autocast_dtype=autocast_dtype)
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.text_encoder = text_encoder.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scaling_factor = float(vae.config.scaling_factor)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)
        vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.resolution = int(unet.config.sample_size) * vae_scale
        self.latent_shape = (int(unet.config.in_channels), int(unet.config.sample_size), int(unet.config.sample_size))
        self.max_length = int(tokenizer.model_max_length)
        self.num_free_slots = self.max_length - 2  # between the start and the end token
        self._empty_ids = self.token_ids([""])
        with torch.no_grad():
            self._empty = self.encode_ids(self._empty_ids)

    # -- images ------------------------------------------------------------------------------
    def encode_images(self, pixels):
        with torch.no_grad(), self._autocast():
            mean = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist.mean
        return (mean.float() - self.shift_factor) * self.scaling_factor

    def decode_latents(self, z0):
        with torch.no_grad(), self._autocast():
            pixels = self.vae.decode((z0 / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return pixels.float().clamp(-1, 1)

    # -- text --------------------------------------------------------------------------------
    @property
    def vocabulary_embeddings(self) -> torch.Tensor:
        """V: the token embedding table (vocab, d) that soft prompts live next to."""
        return self.text_encoder.get_input_embeddings().weight

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Tokenize to fixed length: [start, tokens..., end, pad...]."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return ids.input_ids.to(self.device)

    def caption_slot_ids(self, prompts: list[str]) -> torch.Tensor:
        """Each prompt's tokens as they fill the free slots: (n, N) [tokens..., end, pad...]."""
        return self.token_ids(prompts)[:, 1 : self.num_free_slots + 1]

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (n, L) -> text-encoder hidden states phi(e) (n, L, D)."""
        return self.text_encoder(input_ids=ids).last_hidden_state.float()

    def encode_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Token embeddings e (n, L, d) -> phi(e) (n, L, D), differentiable in e.

        transformers 5's CLIPTextModel takes no inputs_embeds; replacing the token-embedding
        output with a forward hook runs the real positional embeddings, mask and encoder.
        """
        placeholder = self._empty_ids.expand(embeddings.shape[0], -1)
        handle = self.text_encoder.get_input_embeddings().register_forward_hook(
            lambda module, args, output: embeddings.to(output.dtype)
        )
        try:
            with self._autocast():
                return self.text_encoder(input_ids=placeholder).last_hidden_state.float()
        finally:
            handle.remove()

    def prompt_ids(self, free_ids: torch.Tensor) -> torch.Tensor:
        """Free-slot token ids (n, N) -> full sequence [start, ids..., end, pad...] (n, L)."""
        n, slots = free_ids.shape
        if slots > self.num_free_slots:
            raise ValueError(f"{slots} free tokens do not fit; this text encoder has {self.num_free_slots} free slots")
        ids = torch.full((n, self.max_length), self.tokenizer.pad_token_id, device=self.device)
        ids[:, 0] = self.tokenizer.bos_token_id
        ids[:, 1 : slots + 1] = free_ids
        ids[:, slots + 1] = self.tokenizer.eos_token_id
        return ids

    def prompt_embeddings(self, free: torch.Tensor) -> torch.Tensor:
        """Free-slot embeddings (n, N, d) -> full sequence [start, free..., end, pad...] (n, L, d)."""
        n, slots, _ = free.shape
        template = self.vocabulary_embeddings[
            self.prompt_ids(torch.zeros(1, slots, dtype=torch.long, device=self.device))
        ]
        fixed = template.expand(n, -1, -1)
        return torch.cat([fixed[:, :1], free.to(fixed.dtype), fixed[:, slots + 1 :]], dim=1)

    def decode_tokens(self, token_ids: torch.Tensor) -> list[str]:
        """Free-slot token ids (n, N) -> readable prompts."""
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in token_ids]

    def empty_condition(self, n: int) -> torch.Tensor:
        return self._empty.expand(n, -1, -1)

    def _unet_output(self, z_t, t, cond):
        return self.unet(z_t.to(self.unet.dtype), t, encoder_hidden_states=cond.to(self.unet.dtype)).sample
