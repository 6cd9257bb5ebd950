"""How alike a generated sample is to the target: SSCD, tiled L2, or latent L2.

Every kind returns a similarity where 1 means identical and larger means more alike, so one
threshold rule (similarity >= beta) decides replication whatever the kind.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@functools.lru_cache(maxsize=2)
def _load_torchscript(path: str) -> torch.jit.ScriptModule:
    """Load a TorchScript network once per process (audits build a similarity per batch)."""
    return torch.jit.load(path, map_location="cpu").eval()


@dataclass
class SSCDSimilarity:
    """Cosine similarity of SSCD copy-detection descriptors (a TorchScript file the user provides)."""

    path: str
    threshold: float = 0.5
    kind: str = "sscd"

    def __post_init__(self):
        self.network = _load_torchscript(self.path)

    def descriptors(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> L2-normalised SSCD descriptors at 320x320 with ImageNet statistics."""
        self.network.to(pixels.device)
        x = F.interpolate((pixels + 1) / 2, size=(320, 320), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        with torch.no_grad():
            return F.normalize(self.network((x - mean) / std).float(), dim=-1)

    def __call__(self, model, generated_z0, target_z0):
        a = self.descriptors(model.decode_latents(generated_z0))
        b = self.descriptors(model.decode_latents(target_z0))
        return (a * b).sum(-1)


@dataclass
class TiledL2Similarity:
    """1 - the largest per-tile RMS pixel difference (pixels in [0, 1]), Carlini et al.'s tiled L2."""

    tiles: int = 4
    threshold: float = 0.9
    kind: str = "tiled_l2"

    def __call__(self, model, generated_z0, target_z0):
        return tiled_l2_similarity(model.decode_latents(generated_z0), model.decode_latents(target_z0), self.tiles)


def tiled_l2_similarity(generated: torch.Tensor, target: torch.Tensor, tiles: int = 4) -> torch.Tensor:
    """1 - the largest per-tile RMS difference of two image batches in [-1, 1] (N, C, H, W), on a [0, 1] scale."""
    diff = (generated - target) / 2
    n, c, h, w = diff.shape
    th, tw = h // tiles, w // tiles
    parts = diff[:, :, : th * tiles, : tw * tiles].reshape(n, c, tiles, th, tiles, tw)
    rms = parts.square().mean(dim=(1, 3, 5)).sqrt()
    return 1 - rms.flatten(1).amax(1)


@dataclass
class LatentL2Similarity:
    """1 - ||z_gen - z0|| / ||z0||: the z0 error in the model's own space, no decoding needed."""

    threshold: float = 0.5
    kind: str = "latent_l2"

    def __call__(self, model, generated_z0, target_z0):
        return 1 - (generated_z0 - target_z0).flatten(1).norm(dim=1) / target_z0.flatten(1).norm(dim=1)


def build_similarity(kind: str, *, threshold: float | None = None, sscd_path: str | None = None):
    """The similarity the configuration names; its default threshold unless one is given."""
    if kind == "sscd":
        if not sscd_path:
            raise ValueError("similarity 'sscd' needs the path of an SSCD TorchScript file (sscd_path)")
        similarity = SSCDSimilarity(sscd_path)
    elif kind == "tiled_l2":
        similarity = TiledL2Similarity()
    elif kind == "latent_l2":
        similarity = LatentL2Similarity()
    else:
        raise ValueError(f"unknown similarity {kind!r}; expected sscd, tiled_l2 or latent_l2")
    if threshold is not None:
        similarity.threshold = threshold
    return similarity
