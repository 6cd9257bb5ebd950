"""The autoencoder of a latent diffusion model and the affine map between its latents and z0."""

from __future__ import annotations

import torch


class LatentCodec:
    """A KL VAE or a VQ-VAE: z0 = (latent - shift) * scale, as the pipelines divide and add back before decoding.

    The latent of an image is the KL encoder's mean, or the VQ encoder's output before quantization
    (VQModel.decode quantizes, as LDMPipeline's decode does).
    """

    def __init__(self, vae: torch.nn.Module, device: torch.device, autocast):
        self.vae = vae.to(device).eval().requires_grad_(False)
        self.device = device
        self.autocast = autocast
        self.scaling_factor = float(vae.config.get("scaling_factor") or 1.0)
        self.shift_factor = float(vae.config.get("shift_factor") or 0.0)
        self.downsampling = 2 ** (len(vae.config.block_out_channels) - 1)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, R, R) in [-1, 1] -> z0."""
        with torch.no_grad(), self.autocast():
            encoded = self.vae.encode(pixels.to(self.device, self.vae.dtype))
            latent = encoded.latent_dist.mean if hasattr(encoded, "latent_dist") else encoded.latents
        return (latent.float() - self.shift_factor) * self.scaling_factor

    def decode(self, z0: torch.Tensor) -> torch.Tensor:
        """z0 -> pixels (B, 3, R, R) in [-1, 1]."""
        with torch.no_grad(), self.autocast():
            pixels = self.vae.decode((z0 / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return pixels.float().clamp(-1, 1)
