"""Pixel-space unconditional DDPM: a UNet2DModel denoising images in [-1, 1] directly."""

from __future__ import annotations

from memray.models.adapter import DiffusionAdapter
from memray.models.loading import load_component


class PixelDDPMAdapter(DiffusionAdapter):
    """UNet2DModel + DDPM/DDIM scheduler; z0 is the image itself, there is no text condition."""

    family = "ddpm"
    is_conditional = False
    kl_weight_delta = 1e-4  # the reference's step for pixel DDPM (CIFAR-10)
    pipelines = frozenset({"DDPMPipeline", "DDIMPipeline"})

    @classmethod
    def load(cls, path, *, scheduler, allow_pickle: bool, **options) -> PixelDDPMAdapter:
        """Load the UNet of a checkpoint directory."""
        from diffusers import UNet2DModel

        unet = load_component(path, "unet", UNet2DModel, allow_pickle=allow_pickle)
        return cls(unet=unet, scheduler=scheduler, **options)

    def __init__(self, unet, scheduler, *, device="cpu", autocast_dtype=None):
        super().__init__(unet, scheduler, device=device, autocast_dtype=autocast_dtype)
        self.resolution = int(unet.config.sample_size)
        self.latent_shape = (int(unet.config.in_channels), self.resolution, self.resolution)

    def encode_images(self, pixels):
        return pixels.to(self.device).float()

    def decode_latents(self, z0):
        return z0.float().clamp(-1, 1)

    def _unet_output(self, z_t, t, cond):
        return self.unet(z_t.to(self.unet.dtype), t).sample
