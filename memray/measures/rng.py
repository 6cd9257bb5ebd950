"""Per-image random streams: an image's draws depend only on (image_id, seed), never on its batch."""

from __future__ import annotations

import hashlib

import torch


def image_seed(image_id: str, seed: int, stream: str) -> int:
    """A 63-bit seed derived from the image id, the run seed and the name of the random stream."""
    digest = hashlib.sha256(f"{seed}\x00{stream}\x00{image_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def image_generators(image_ids, seed: int, stream: str, device="cpu") -> list[torch.Generator]:
    """One generator per image for the named stream, on the device that will use the draws.

    CPU and CUDA generators give different streams: results are reproducible per device type.
    """
    return [torch.Generator(device=device).manual_seed(image_seed(i, seed, stream)) for i in image_ids]


def randn_per_image(generators, shape) -> torch.Tensor:
    """Stack one standard-normal draw of `shape` per image: result (B, *shape)."""
    return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in generators])


def randint_per_image(generators, high: int, shape) -> torch.Tensor:
    """Stack one uniform integer draw in [0, high) of `shape` per image: result (B, *shape)."""
    return torch.stack([torch.randint(high, shape, generator=g, device=g.device) for g in generators])


def rand_per_image(generators, shape) -> torch.Tensor:
    """Stack one uniform [0, 1) draw of `shape` per image: result (B, *shape)."""
    return torch.stack([torch.rand(shape, generator=g, device=g.device) for g in generators])
