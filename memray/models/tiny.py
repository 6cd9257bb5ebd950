"""Tiny, randomly initialised diffusers checkpoints built offline, in the real on-disk layouts.

They exist so that tests and the no-download quick start exercise exactly the loading and
measuring code that a real Stable Diffusion or DDPM checkpoint goes through.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

# A small word list is enough for a real BPE tokenizer: characters plus whole-word merges.
TINY_WORDS = (
    "a an the of on in with and photo picture painting red green blue yellow white black "
    "circle square triangle stripes dots cat dog house tree sky background small large"
).split()


def build_tiny_clip_tokenizer(words=TINY_WORDS):
    """A real CLIPTokenizer (byte-pair merges) over a tiny vocabulary, built with no files."""
    from transformers import CLIPTokenizer

    chars = sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in words:
        # Apply the merges so far in rank order, as the tokenizer will, then add the ones this
        # word still needs: a later word can then never split an earlier one.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        for left, right in merges:
            i = 0
            while i < len(pieces) - 1:
                if (pieces[i], pieces[i + 1]) == (left, right):
                    pieces[i : i + 2] = [left + right]
                else:
                    i += 1
        while len(pieces) > 1:
            merges.append((pieces[0], pieces[1]))
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = [pieces[0] + pieces[1]] + pieces[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def sd_schedule(prediction_type: str = "epsilon") -> dict:
    """Stable Diffusion 1.x's noise schedule (scaled-linear betas, 1000 steps) as scheduler keyword arguments."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        clip_sample=False,
        steps_offset=1,
    )


def save_sd_pipeline(path, vae, text_encoder, tokenizer, unet, *, prediction_type="epsilon", scheduler="ddim") -> None:
    """Save the components in the diffusers Stable Diffusion layout with safetensors weights."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    if scheduler == "ddim":
        noise_scheduler = DDIMScheduler(**sd_schedule(prediction_type), set_alpha_to_one=False)
    else:
        noise_scheduler = DDPMScheduler(**sd_schedule(prediction_type))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)


@dataclass(frozen=True)
class SDSizes:
    """The sizes of a small Stable Diffusion layout: VAE x4 downsampling, CLIP text encoder, cross-attention UNet."""

    resolution: int = 32
    text_width: int = 32
    vae_channels: tuple[int, ...] = (8, 16, 16)
    vae_groups: int = 4
    unet_channels: tuple[int, ...] = (32, 64)
    unet_down: tuple[str, ...] = ("CrossAttnDownBlock2D", "DownBlock2D")
    unet_up: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D")
    attention_head_dim: int = 8
    unet_groups: int = 8


def sd_components(tokenizer, sizes: SDSizes = SDSizes()):
    """Fresh (vae, text_encoder, unet) of the given sizes for `tokenizer` (its model_max_length is the context)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=sizes.text_width,
            intermediate_size=2 * sizes.text_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels),
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=sizes.vae_groups,
        sample_size=sizes.resolution,
    )
    unet = UNet2DConditionModel(
        sample_size=sizes.resolution // 2 ** (len(sizes.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        down_block_types=sizes.unet_down,
        up_block_types=sizes.unet_up,
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        cross_attention_dim=sizes.text_width,
        attention_head_dim=sizes.attention_head_dim,
        norm_num_groups=sizes.unet_groups,
    )
    return vae, text_encoder, unet


def build_tiny_sd(
    path: str | Path,
    *,
    prediction_type: str = "epsilon",
    resolution: int = 32,
    max_length: int = 12,
    seed: int = 0,
    scheduler: str = "ddim",
) -> Path:
    """Save a tiny Stable Diffusion pipeline (VAE, CLIP text encoder, UNet, scheduler) to `path`."""
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer.model_max_length = max_length
    vae, text_encoder, unet = sd_components(tokenizer, SDSizes(resolution=resolution))
    save_sd_pipeline(path, vae, text_encoder, tokenizer, unet, prediction_type=prediction_type, scheduler=scheduler)
    return Path(path)


def build_tiny_ddpm(path: str | Path, *, resolution: int = 16, seed: int = 0) -> Path:
    """Save a tiny unconditional pixel-space DDPM pipeline (UNet2DModel + DDPMScheduler) to `path`."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=resolution,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
    )
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    return Path(path)
