"""What every measure needs from a diffusion model, independent of its family.

A family adapter (sd.py, ddpm.py) supplies the networks; this base supplies the schedule,
the x0/eps conversion for the scheduler's prediction type, precision, and the count of UNet
sample-evaluations (forward and backward separately) attributed to the image that asked.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from memray.measures.parameterization import PREDICTION_TYPES, eps_and_z0


class ModelCapabilityError(ValueError):
    """A measure asked of a model that cannot do it (e.g. prompt inversion on an unconditional DDPM)."""


@dataclass
class Prediction:
    """The network's noise and clean-sample predictions at (z_t, t)."""

    eps: torch.Tensor
    z0: torch.Tensor


@dataclass
class Tally:
    """UNet sample-evaluations per slot, forward and backward, counted in one EvalCounter.scope."""

    forwards: np.ndarray
    backwards: np.ndarray


class EvalCounter:
    """UNet sample-evaluations per batch slot: one forward (backward) per sample in a call."""

    def __init__(self, slots: int = 0):
        self.reset(slots)

    def reset(self, slots: int) -> None:
        """Start counting for a batch of `slots` images."""
        self.forwards = np.zeros(slots, dtype=np.int64)
        self.backwards = np.zeros(slots, dtype=np.int64)

    @contextlib.contextmanager
    def scope(self, slots: int):
        """Count the block's evaluations in a fresh tally of `slots` slots (yielded, readable after the
        block); the tally in effect before is left untouched and counts on afterwards."""
        saved = self.forwards, self.backwards
        self.reset(slots)
        tally = Tally(self.forwards, self.backwards)
        try:
            yield tally
        finally:
            self.forwards, self.backwards = saved

    def _add(self, which: np.ndarray, owner: torch.Tensor) -> None:
        counts = np.bincount(owner.cpu().numpy(), minlength=len(which))
        if len(counts) > len(which):
            raise IndexError(f"owner slot {len(counts) - 1} outside a batch of {len(which)}")
        which += counts

    def count_forward(self, owner: torch.Tensor) -> None:
        """Count one forward per sample, for the slot that owns it."""
        self._add(self.forwards, owner)

    def count_backward(self, owner: torch.Tensor) -> None:
        """Count one backward per sample, for the slot that owns it."""
        self._add(self.backwards, owner)


class DiffusionAdapter:
    """Base of the family adapters: schedule, conversions, precision and evaluation counting."""

    family: str = "abstract"
    is_conditional: bool = False

    def __init__(self, unet: torch.nn.Module, scheduler, *, device: str | torch.device, autocast_dtype=None):
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        prediction_type = scheduler.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r} in the scheduler config; memray supports {PREDICTION_TYPES}"
            )
        self.prediction_type = prediction_type
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=self.device, dtype=torch.float32)
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.counter = EvalCounter()
        self._sampling_timesteps: dict[int, torch.Tensor] = {}
        if scheduler.config.get("thresholding", False):
            raise ValueError(
                "the scheduler config asks for dynamic thresholding, which memray's DDIM does not implement"
            )
        # Pixel DDPM configs usually clip z0_hat during sampling (diffusers' default); SD latents never do.
        clip = scheduler.config.get("clip_sample", False)
        self.clip_sample_range = float(scheduler.config.get("clip_sample_range", 1.0)) if clip else None
        self.max_batch = 64

    # -- implemented by families -------------------------------------------------------------
    resolution: int
    latent_shape: tuple[int, int, int]

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, R, R) in [-1, 1] -> z0 in the space the UNet denoises."""
        raise NotImplementedError

    def decode_latents(self, z0: torch.Tensor) -> torch.Tensor:
        """z0 -> pixels (B, 3, R, R) in [-1, 1]."""
        raise NotImplementedError

    def _unet_output(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def empty_condition(self, n: int) -> torch.Tensor | None:
        """Conditioning of the unconditional branch (SD: the empty prompt) for n samples."""
        return None

    # -- shared ------------------------------------------------------------------------------
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None, owner: torch.Tensor) -> Prediction:
        """Counted UNet evaluation of n samples; `owner` (n,) names the batch slot of each sample.

        Runs in chunks of at most `max_batch` samples so callers can ask for thousands at once.
        """
        if cond is not None and not self.is_conditional:
            raise ModelCapabilityError(f"{self.family} model is unconditional; it takes no text condition")
        chunks = []
        for start in range(0, z_t.shape[0], self.max_batch):
            part = slice(start, start + self.max_batch)
            with self._autocast():
                chunks.append(self._unet_output(z_t[part], t[part], None if cond is None else cond[part]).float())
        output = torch.cat(chunks)
        self.counter.count_forward(owner)
        if output.requires_grad:
            output.register_hook(lambda grad: self.counter.count_backward(owner))
        eps, z0 = eps_and_z0(output, z_t.float(), self.alphas_cumprod[t], self.prediction_type)
        return Prediction(eps=eps, z0=z0)

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """The DDIM timesteps the checkpoint's scheduler config prescribes, first (noisiest) first."""
        if num_steps not in self._sampling_timesteps:
            from diffusers import DDIMScheduler

            ddim = DDIMScheduler.from_config(self.scheduler.config)
            ddim.set_timesteps(num_steps)
            self._sampling_timesteps[num_steps] = ddim.timesteps.to(self.device)
        return self._sampling_timesteps[num_steps]

    def final_alpha_cumprod(self) -> torch.Tensor:
        """abar after the last DDIM step (1 where the scheduler sets alpha to one)."""
        if self.scheduler.config.get("set_alpha_to_one", True):
            return torch.ones((), device=self.device)
        return self.alphas_cumprod[0]

    def measure_timesteps(self, count: int) -> torch.Tensor:
        """`count` uniformly spaced timesteps over [0, T) (bin midpoints), for estimating E_t."""
        edges = (torch.arange(count, device=self.device) + 0.5) * self.num_train_timesteps / count
        return edges.long()
