"""Real-size architectures built with random weights: what an evaluation costs does not depend on the weights.

Each JSON file holds one checkpoint family's component configs (UNet, VAE, text encoder,
scheduler), a few KB instead of gigabytes of weights, so benchmarks measure the real networks'
speed and memory with nothing downloaded. The tokenizer is the tiny offline CLIP tokenizer: its
ids fall inside the real vocabulary, and the prompt measures work on the real embedding table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCHITECTURES = {path.stem: path for path in sorted(Path(__file__).parent.glob("*.json"))}


def architecture(name: str) -> dict:
    """The component configs of a shipped architecture (`ARCHITECTURES`)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; shipped: {sorted(ARCHITECTURES)}")
    return json.loads(ARCHITECTURES[name].read_text())


def random_weight_adapter(name: str, *, device="cpu", autocast_dtype=None, seed: int = 0):
    """A StableDiffusionAdapter of the named architecture with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from memray.models.sd import StableDiffusionAdapter
    from memray.models.tiny import build_tiny_clip_tokenizer

    config = architecture(name)
    torch.manual_seed(seed)
    tokenizer = build_tiny_clip_tokenizer()
    tokenizer.model_max_length = config["text_encoder"]["max_position_embeddings"]
    text = CLIPTextConfig(
        **config["text_encoder"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.device(device):  # initialised where they run: minutes on a CPU, moments on a GPU
        unet, vae = UNet2DConditionModel.from_config(config["unet"]), AutoencoderKL.from_config(config["vae"])
        text_encoder = CLIPTextModel(text)
    return StableDiffusionAdapter(
        unet=unet,
        vae=vae,
        text_encoders=[text_encoder],
        tokenizers=[tokenizer],
        scheduler=DDIMScheduler.from_config(config["scheduler"]),
        device=device,
        autocast_dtype=autocast_dtype,
    )
