"""What every measure needs from a diffusion model, independent of its family.

A family adapter (sd.py, sdxl.py, sd3.py, ldm.py, ddpm.py) supplies the networks; this base supplies
the schedule (schedules.py: the forward process, the x0/eps conversion and the sampler), precision,
and the count of network sample-evaluations (forward and backward separately) attributed to the
image that asked. protocol.py writes down the interface the measures use.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from memray.models.schedules import schedule_for


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
    """Base of the family adapters (protocol.DiffusionModel): schedule, precision and evaluation counting."""

    family: str = "abstract"
    is_conditional: bool = False
    kl_weight_delta: float = 1e-3  # InvMM's KL weight step for latent models (the reference's SD value)

    def __init__(self, unet: torch.nn.Module, scheduler, *, device: str | torch.device, autocast_dtype=None):
        self.unet = unet.to(device).eval().requires_grad_(False)
        self.scheduler = scheduler
        self.device = torch.device(device)
        self.autocast_dtype = autocast_dtype
        self.schedule = schedule_for(scheduler, self.device)
        self.prediction_type = self.schedule.prediction_type
        self.clip_sample_range = self.schedule.clip_sample_range
        self.num_train_timesteps = self.schedule.num_train_timesteps
        self.counter = EvalCounter()
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
            timestep = self.schedule.network_timestep(t[part])
            with self._autocast():
                chunks.append(self._unet_output(z_t[part], timestep, None if cond is None else cond[part]).float())
        output = torch.cat(chunks)
        self.counter.count_forward(owner)
        if output.requires_grad:
            output.register_hook(lambda grad: self.counter.count_backward(owner))
        eps, z0 = self.schedule.eps_and_z0(output, z_t.float(), t)
        return Prediction(eps=eps, z0=z0)

    def noisy_sample(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process of the checkpoint's schedule at per-sample t."""
        return self.schedule.noisy_sample(z0, eps, t)

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """The sampler's timesteps from the checkpoint's scheduler config, first (noisiest) first."""
        return self.schedule.sampling_timesteps(num_steps)

    def sampler_step(self, timesteps: torch.Tensor, i: int, eps: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """The deterministic update from timesteps[i] (DDIM eta = 0; the Euler step for flow matching)."""
        return self.schedule.step(timesteps, i, eps, z0)

    def measure_timesteps(self, count: int) -> torch.Tensor:
        """`count` uniformly spaced timesteps over [0, T) (bin midpoints), for estimating E_t."""
        edges = (torch.arange(count, device=self.device) + 0.5) * self.num_train_timesteps / count
        return edges.long()
