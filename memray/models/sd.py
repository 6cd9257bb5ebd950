"""Stable Diffusion 1.x / 2.x: VAE latents, a CLIP text encoder and a conditional UNet.

The text side is written for one or more CLIP encoders over one vocabulary (protocol.TextConditionedModel),
so that SDXL (sdxl.py) and SD 3.x (sd3.py) differ from it only in how the encoders' outputs become a
condition and how the denoiser takes it.
"""

from __future__ import annotations

import torch

from memray.errors import CheckpointError
from memray.models.adapter import DiffusionAdapter
from memray.models.latents import LatentCodec
from memray.models.loading import load_component


def pack_pooled(hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """Hidden states (n, L, D) and pooled embeddings (n, P <= D) as one condition (n, L + 1, D) (protocol.py)."""
    if pooled.shape[-1] > hidden.shape[-1]:
        # Real SDXL (1280 <= 2048) and SD 3.x (2048 <= 4096) configs fit; a checkpoint that does not is refused.
        raise CheckpointError(
            f"pooled text embeddings of width {pooled.shape[-1]} do not fit the condition width {hidden.shape[-1]}"
        )
    row = torch.nn.functional.pad(pooled, (0, hidden.shape[-1] - pooled.shape[-1]))
    return torch.cat([hidden, row.unsqueeze(1)], dim=1)


def unpack_pooled(cond: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of pack_pooled: (hidden (n, L, D), pooled (n, P))."""
    return cond[:, :-1], cond[:, -1, :pooled_width]


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
            text_encoders=[load_component(path, "text_encoder", CLIPTextModel, allow_pickle=allow_pickle)],
            tokenizers=[load_component(path, "tokenizer", AutoTokenizer, allow_pickle=allow_pickle)],
            scheduler=scheduler,
            **options,
        )

    def __init__(self, unet, vae, text_encoders, tokenizers, scheduler, *, device="cpu", autocast_dtype=None):
        super().__init__(unet, scheduler, device=device, autocast_dtype=autocast_dtype)
        self.codec = LatentCodec(vae, self.device, self._autocast)
        self.vae = self.codec.vae
        self.text_encoders = [encoder.to(device).eval().requires_grad_(False) for encoder in text_encoders]
        self.tokenizers = tokenizers
        self.text_encoder, self.tokenizer = self.text_encoders[0], tokenizers[0]
        for other in tokenizers[1:]:
            # One prompt distribution feeds every encoder: their token ids must mean the same tokens.
            if (
                other.get_vocab() != self.tokenizer.get_vocab()
                or other.model_max_length != self.tokenizer.model_max_length
            ):
                raise CheckpointError(
                    "the checkpoint's CLIP tokenizers do not share one vocabulary and context length, "
                    "which memray's joint prompt inversion over its text encoders needs"
                )
        size = int(unet.config.sample_size)
        self.resolution = size * self.codec.downsampling
        self.latent_shape = (int(unet.config.in_channels), size, size)
        self.max_length = int(self.tokenizer.model_max_length)
        self.num_free_slots = self.max_length - 2  # between the start and the end token
        tables = [encoder.get_input_embeddings().weight for encoder in self.text_encoders]
        self.embedding_widths = [table.shape[1] for table in tables]
        self._vocabulary = tables[0] if len(tables) == 1 else torch.cat(tables, dim=1)
        with torch.no_grad():
            self._empty = self.encode_ids(self.token_ids([""]))

    # -- images ------------------------------------------------------------------------------
    def encode_images(self, pixels):
        return self.codec.encode(pixels)

    def decode_latents(self, z0):
        return self.codec.decode(z0)

    # -- text --------------------------------------------------------------------------------
    @property
    def vocabulary_embeddings(self) -> torch.Tensor:
        """V: the token embedding table (vocab, d) that soft prompts live next to; with several
        encoders, each token's rows side by side (vocab, d_1 + d_2 + ...)."""
        return self._vocabulary

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """Tokenize to fixed length: [start, tokens..., end, pad...]."""
        ids = self.tokenizer(
            prompts, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        return ids.input_ids.to(self.device)

    def caption_slot_ids(self, prompts: list[str]) -> torch.Tensor:
        """Each prompt's tokens as they fill the free slots: (n, N) [tokens..., end, pad...]."""
        return self.token_ids(prompts)[:, 1 : self.num_free_slots + 1]

    def _encoder_ids(self, k: int, ids: torch.Tensor) -> torch.Tensor:
        """Ids in the first tokenizer's layout, padded as encoder k's tokenizer pads (SDXL's second: "!")."""
        pad = self.tokenizers[k].pad_token_id
        if pad == self.tokenizer.pad_token_id:
            return ids
        first_end = (ids == self.tokenizer.eos_token_id).int().argmax(1, keepdim=True)
        after_end = torch.arange(ids.shape[1], device=ids.device) > first_end
        return ids.masked_fill(after_end, pad)

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """Full ids (n, L) -> their rows of vocabulary_embeddings, each encoder's own padding (n, L, d)."""
        tables = [encoder.get_input_embeddings().weight for encoder in self.text_encoders]
        return torch.cat([table[self._encoder_ids(k, ids)] for k, table in enumerate(tables)], dim=-1)

    def _encode(self, ids: torch.Tensor, embeddings: torch.Tensor | None, context) -> torch.Tensor:
        """Run every text encoder on ids, with their token embeddings replaced where given; the condition.

        transformers 5's CLIP text models take no inputs_embeds; replacing the token-embedding output
        with a forward hook runs the real positional embeddings, mask, encoder and pooling (at the end token of ids).
        """
        parts = [None] * len(self.text_encoders) if embeddings is None else embeddings.split(self.embedding_widths, -1)
        outputs = []
        for k, (encoder, part) in enumerate(zip(self.text_encoders, parts)):
            handle = None
            if part is not None:
                handle = encoder.get_input_embeddings().register_forward_hook(
                    lambda module, args, output, part=part: part.to(output.dtype)
                )
            try:
                with self._autocast():
                    outputs.append(encoder(input_ids=self._encoder_ids(k, ids), output_hidden_states=True))
            finally:
                if handle is not None:
                    handle.remove()
        return self._condition(outputs, context)

    def _condition(self, outputs, context) -> torch.Tensor:
        """The text encoders' outputs -> the UNet's condition: SD 1.x/2.x take the last hidden state."""
        return outputs[0].last_hidden_state.float()

    def caption_context(self, captions: list[str]) -> torch.Tensor | None:
        """What of the condition the captions fix rather than the prompt: nothing for SD 1.x/2.x and SDXL."""
        return None

    def encode_ids(self, ids: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (n, L) -> text-encoder condition phi(e) (n, L, D), with each row's caption context."""
        return self._encode(ids, None, context)

    def encode_embeddings(self, embeddings: torch.Tensor, ids: torch.Tensor, context=None) -> torch.Tensor:
        """Token embeddings e (n, L, d) laid out like ids (n, L) -> phi(e), differentiable in e."""
        return self._encode(ids, embeddings, context)

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
        template = self.token_embeddings(self.prompt_ids(torch.zeros(1, slots, dtype=torch.long, device=self.device)))
        fixed = template.expand(n, -1, -1)
        return torch.cat([fixed[:, :1], free.to(fixed.dtype), fixed[:, slots + 1 :]], dim=1)

    def decode_tokens(self, token_ids: torch.Tensor) -> list[str]:
        """Free-slot token ids (n, N) -> readable prompts."""
        return [self.tokenizer.decode(row.tolist(), skip_special_tokens=True).strip() for row in token_ids]

    def empty_condition(self, n: int) -> torch.Tensor:
        return self._empty.expand(n, -1, -1)

    def _unet_output(self, z_t, t, cond):
        return self.unet(z_t.to(self.unet.dtype), t, encoder_hidden_states=cond.to(self.unet.dtype)).sample
