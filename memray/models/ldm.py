"""Unconditional latent diffusion (LDMPipeline): a VQ-VAE or KL VAE and an unconditional UNet2DModel."""

from __future__ import annotations

from memray.errors import CheckpointError
from memray.models.adapter import DiffusionAdapter
from memray.models.latents import LatentCodec
from memray.models.loading import component_class_name, load_component

AUTOENCODERS = ("VQModel", "AutoencoderKL")


class LatentDiffusionAdapter(DiffusionAdapter):
    """UNet2DModel denoising the latents of the `vqvae` component (VQModel or AutoencoderKL); no text condition."""

    family = "ldm"
    is_conditional = False
    pipelines = frozenset({"LDMPipeline"})

    @classmethod
    def load(cls, path, *, scheduler, allow_pickle: bool, **options) -> LatentDiffusionAdapter:
        """Load the UNet and the autoencoder of a checkpoint directory."""
        import diffusers

        autoencoder = component_class_name(path, "vqvae")
        if autoencoder not in AUTOENCODERS:
            raise CheckpointError(f"{path}: vqvae is a {autoencoder!r}; memray's LDM adapter takes {AUTOENCODERS}")
        return cls(
            unet=load_component(path, "unet", diffusers.UNet2DModel, allow_pickle=allow_pickle),
            vae=load_component(path, "vqvae", getattr(diffusers, autoencoder), allow_pickle=allow_pickle),
            scheduler=scheduler,
            **options,
        )

    def __init__(self, unet, vae, scheduler, *, device="cpu", autocast_dtype=None):
        super().__init__(unet, scheduler, device=device, autocast_dtype=autocast_dtype)
        self.codec = LatentCodec(vae, self.device, self._autocast)
        size = int(unet.config.sample_size)
        self.resolution = size * self.codec.downsampling
        self.latent_shape = (int(unet.config.in_channels), size, size)

    def encode_images(self, pixels):
        return self.codec.encode(pixels)

    def decode_latents(self, z0):
        return self.codec.decode(z0)

    def _unet_output(self, z_t, t, cond):
        return self.unet(z_t.to(self.unet.dtype), t).sample
