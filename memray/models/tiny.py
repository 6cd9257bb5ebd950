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


def build_tiny_clip_tokenizer(words=TINY_WORDS, pad_token: str = "<|endoftext|>"):
    """A real CLIPTokenizer (byte-pair merges) over a tiny vocabulary, built with no files.

    pad_token "0" (id 0) stands in for the "!" (id 0) that pads SDXL's and SD 3's second CLIP tokenizer.
    """
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
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token)


def build_tiny_t5_tokenizer(words=TINY_WORDS):
    """A real T5 tokenizer (sentencepiece-style unigram: whole words, then characters) built with no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    pieces += [("\u2581" + word, -1.0) for word in words]
    pieces += [(c, -5.0) for c in sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz0123456789"))]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    return T5TokenizerFast(
        tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0
    )


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


def tiny_clip_text_encoder(tokenizer, width: int, projection_dim: int | None = None):
    """A fresh 2-layer CLIP text encoder for `tokenizer`; with a projection (SDXL's second, SD 3's) where asked."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=projection_dim or width,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def tiny_vae(sizes: SDSizes, latent_channels: int = 4, **config):
    """A fresh AutoencoderKL of the given sizes (x4 downsampling for the default three blocks)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(**autoencoder_sizes(sizes, latent_channels), **config)


def autoencoder_sizes(sizes: SDSizes, latent_channels: int) -> dict:
    """The constructor arguments an AutoencoderKL and a VQModel of these sizes share."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(sizes.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(sizes.vae_channels),
        block_out_channels=sizes.vae_channels,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=sizes.vae_groups,
        sample_size=sizes.resolution,
    )


def latent_size(sizes: SDSizes) -> int:
    """Latent pixels a side of the tiny VAE."""
    return sizes.resolution // 2 ** (len(sizes.vae_channels) - 1)


def tiny_unet(sizes: SDSizes, cross_attention_dim: int, **config):
    """A fresh cross-attention UNet2DConditionModel of the given sizes over 4 latent channels."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size(sizes),
        in_channels=4,
        out_channels=4,
        down_block_types=sizes.unet_down,
        up_block_types=sizes.unet_up,
        block_out_channels=sizes.unet_channels,
        layers_per_block=1,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=sizes.attention_head_dim,
        norm_num_groups=sizes.unet_groups,
        **config,
    )


def sd_components(tokenizer, sizes: SDSizes = SDSizes()):
    """Fresh (vae, text_encoder, unet) of the given sizes for `tokenizer` (its model_max_length is the context)."""
    text_encoder = tiny_clip_text_encoder(tokenizer, sizes.text_width)
    vae = tiny_vae(sizes)
    unet = tiny_unet(sizes, sizes.text_width)
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


def tiny_unconditional_unet(sample_size: int):
    """A small UNet2DModel on 3 channels (one attention level): the denoiser of the unconditional tiny models."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=sample_size,
        in_channels=3,
        out_channels=3,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
    )


def build_tiny_ddpm(path: str | Path, *, resolution: int = 16, seed: int = 0) -> Path:
    """Save a tiny unconditional pixel-space DDPM pipeline (UNet2DModel + DDPMScheduler) to `path`."""
    from diffusers import DDPMPipeline, DDPMScheduler

    torch.manual_seed(seed)
    unet = tiny_unconditional_unet(resolution)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def build_tiny_ldm(path: str | Path, *, autoencoder: str = "vq", resolution: int = 32, seed: int = 0) -> Path:
    """Save a tiny unconditional latent diffusion pipeline (LDMPipeline: VQModel or AutoencoderKL + UNet2DModel)."""
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    torch.manual_seed(seed)
    sizes = SDSizes(resolution=resolution)
    if autoencoder == "vq":
        vae = VQModel(**autoencoder_sizes(sizes, latent_channels=3), num_vq_embeddings=64)
    else:
        vae = tiny_vae(sizes, latent_channels=3)
    unet = tiny_unconditional_unet(latent_size(sizes))
    # The CelebA-HQ / FFHQ LDMs' schedule: linear betas 0.0015 .. 0.0195, DDIM, no clipping.
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="linear", clip_sample=False)
    LDMPipeline(vqvae=vae, unet=unet, scheduler=scheduler).save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def build_tiny_sdxl(path: str | Path, *, resolution: int = 32, max_length: int = 12, seed: int = 0) -> Path:
    """Save a tiny SDXL base pipeline (two CLIP encoders, pooled embeddings, text_time UNet, Euler scheduler)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    sizes = SDSizes(resolution=resolution)
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer(pad_token="0")
    tokenizer.model_max_length = tokenizer_2.model_max_length = max_length
    text_encoder = tiny_clip_text_encoder(tokenizer, 16)
    text_encoder_2 = tiny_clip_text_encoder(tokenizer_2, 32, projection_dim=16)
    time_width = 4
    unet = tiny_unet(
        sizes,
        16 + 32,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_width,
        projection_class_embeddings_input_dim=6 * time_width + 16,
    )
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(sizes),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        # SDXL base's scheduler config: SD's schedule with Euler steps, "leading" spacing.
        scheduler=EulerDiscreteScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            steps_offset=1,
            timestep_spacing="leading",
        ),
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)


def build_tiny_sd3(
    path: str | Path, *, resolution: int = 32, max_length: int = 12, seed: int = 0, t5: bool = True
) -> Path:
    """Save a tiny SD 3 pipeline (MMDiT, CLIP-L, CLIP-G, T5, 4-channel shifted VAE, flow-matching scheduler)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    sizes = SDSizes(resolution=resolution)
    tokenizer, tokenizer_2 = build_tiny_clip_tokenizer(), build_tiny_clip_tokenizer(pad_token="0")
    tokenizer.model_max_length = tokenizer_2.model_max_length = max_length
    width = 64  # T5's and the transformer's joint attention width; CLIP-L 16 + CLIP-G 32 are padded to it
    tokenizer_3 = build_tiny_t5_tokenizer()
    text_encoder_3 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_3), d_model=width, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    )
    transformer = SD3Transformer2DModel(
        sample_size=latent_size(sizes),
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=width,
        caption_projection_dim=16,
        pooled_projection_dim=16 + 16,
        out_channels=4,
        pos_embed_max_size=16,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        # SD 3's scheduler: flow matching with shift 3.
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        # SD 3's VAE scales and shifts its latents (1.5305, 0.0609); kept here so both are exercised.
        vae=tiny_vae(sizes, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoder=tiny_clip_text_encoder(tokenizer, 16, projection_dim=16),
        tokenizer=tokenizer,
        text_encoder_2=tiny_clip_text_encoder(tokenizer_2, 32, projection_dim=16),
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3 if t5 else None,
        tokenizer_3=tokenizer_3 if t5 else None,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    return Path(path)
