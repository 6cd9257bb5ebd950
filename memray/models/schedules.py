"""The noise schedules memray samples and measures with: variance preserving (DDPM/DDIM) and flow matching.

A schedule owns what differs between them: the forward process z_t(z0, eps, t), the conversion of
the network output into (eps_hat, z0_hat), the timestep the network is fed, and the sampler's
levels. memray's t is always an index into the training levels, 0 (cleanest) to T - 1 (noisiest),
so the measures draw t the same way for every family.

The sampler is one update for both: z_next = forward(z0_hat, eps_hat, next level). For a variance
preserving schedule that is DDIM with eta = 0; for flow matching it is exactly the Euler step
x + (sigma_next - sigma) v, since x = (1 - sigma) z0_hat + sigma eps_hat and v = eps_hat - z0_hat.
"""

from __future__ import annotations

import torch

from memray.errors import CheckpointError
from memray.measures.parameterization import (
    PREDICTION_TYPES,
    eps_and_z0,
    flow_eps_and_z0,
    flow_noisy_sample,
    noisy_sample,
)


class VariancePreservingSchedule:
    """z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps; epsilon, v or sample prediction; DDIM (eta = 0) sampling."""

    def __init__(self, scheduler, device: torch.device):
        self.config = scheduler.config
        prediction_type = self.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction_type {prediction_type!r} in the scheduler config; memray supports {PREDICTION_TYPES}"
            )
        if self.config.get("thresholding", False):
            raise ValueError(
                "the scheduler config asks for dynamic thresholding, which memray's DDIM does not implement"
            )
        self.prediction_type = prediction_type
        self.device = device
        self.num_train_timesteps = int(self.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
        # Pixel DDPM configs usually clip z0_hat during sampling (diffusers' default); latents never do.
        clip = self.config.get("clip_sample", False)
        self.clip_sample_range = float(self.config.get("clip_sample_range", 1.0)) if clip else None
        # abar after the last DDIM step: 1 where the scheduler sets alpha to one.
        self.final_alpha_cumprod = (
            torch.ones((), device=device) if self.config.get("set_alpha_to_one", True) else self.alphas_cumprod[0]
        )
        self._sampling: dict[int, torch.Tensor] = {}

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the network is conditioned on: t itself."""
        return t

    def noisy_sample(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process at per-sample timesteps t."""
        return noisy_sample(z0, eps, self.alphas_cumprod[t])

    def eps_and_z0(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
        """The network output at (z_t, t) as (eps_hat, z0_hat)."""
        return eps_and_z0(output, z_t, self.alphas_cumprod[t], self.prediction_type)

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """The DDIM timesteps the checkpoint's scheduler config prescribes, first (noisiest) first."""
        if num_steps not in self._sampling:
            from diffusers import DDIMScheduler

            ddim = DDIMScheduler.from_config(self.config)
            ddim.set_timesteps(num_steps)
            self._sampling[num_steps] = ddim.timesteps.to(self.device)
        return self._sampling[num_steps]

    def step(self, timesteps: torch.Tensor, i: int, eps: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """eta = 0 update from timesteps[i]: sqrt(abar_next) z0_hat + sqrt(1 - abar_next) eps_hat.

        z0_hat is clipped where the scheduler config says so; eps_hat is not recomputed from the
        clipped z0_hat (diffusers' DDIMScheduler.step default, use_clipped_model_output=False).
        """
        if self.clip_sample_range is not None:
            z0 = z0.clamp(-self.clip_sample_range, self.clip_sample_range)
        abar = self.alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else self.final_alpha_cumprod
        return noisy_sample(z0, eps, abar.expand(z0.shape[0]))


class FlowMatchingSchedule:
    """x_t = (1 - sigma_t) z0 + sigma_t eps, velocity prediction v = eps - z0, Euler sampling (SD 3.x).

    The levels are the scheduler's: sigma(t) = s u / (1 + (s - 1) u) with u = (t + 1) / T and s the
    config's shift, so integer t in [0, T) are exactly FlowMatchEulerDiscreteScheduler's training
    sigmas; the sampler's sigmas lie between them and are given as fractional t.
    """

    prediction_type = "flow"
    clip_sample_range = None

    def __init__(self, scheduler, device: torch.device):
        self.config = scheduler.config
        for option in ("use_dynamic_shifting", "invert_sigmas", "stochastic_sampling"):
            if self.config.get(option, False):
                raise CheckpointError(
                    f"the flow-matching scheduler config sets {option}, which memray does not implement "
                    "(SD 3.x checkpoints use a fixed shift)"
                )
        self.device = device
        self.num_train_timesteps = int(self.config.num_train_timesteps)
        self.shift = float(self.config.get("shift", 1.0))
        self._sampling: dict[int, torch.Tensor] = {}

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level of (fractional) timesteps t."""
        u = (t.double() + 1) / self.num_train_timesteps
        return (self.shift * u / (1 + (self.shift - 1) * u)).float()

    def timestep_of(self, sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of sigma(t): the fractional t of a noise level."""
        sigma = sigma.double()
        return sigma / (self.shift - (self.shift - 1) * sigma) * self.num_train_timesteps - 1

    def network_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep the transformer is conditioned on: sigma * T, as the SD 3.x pipeline feeds it."""
        return self.sigma(t) * self.num_train_timesteps

    def noisy_sample(self, z0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process at per-sample timesteps t."""
        return flow_noisy_sample(z0, eps, self.sigma(t))

    def eps_and_z0(self, output: torch.Tensor, z_t: torch.Tensor, t: torch.Tensor):
        """The velocity at (z_t, t) as (eps_hat, z0_hat)."""
        return flow_eps_and_z0(output, z_t, self.sigma(t))

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """The Euler sampler's levels from the checkpoint's scheduler config, as fractional t, noisiest first."""
        if num_steps not in self._sampling:
            from diffusers import FlowMatchEulerDiscreteScheduler

            euler = FlowMatchEulerDiscreteScheduler.from_config(self.config)
            euler.set_timesteps(num_steps)
            self._sampling[num_steps] = self.timestep_of(euler.sigmas[:-1]).to(self.device)
        return self._sampling[num_steps]

    def step(self, timesteps: torch.Tensor, i: int, eps: torch.Tensor, z0: torch.Tensor) -> torch.Tensor:
        """Euler update from timesteps[i] to the next level (sigma 0 after the last): forward(z0_hat, eps_hat)."""
        if i + 1 == len(timesteps):
            return z0
        return flow_noisy_sample(z0, eps, self.sigma(timesteps[i + 1]).expand(z0.shape[0]))


def schedule_for(scheduler, device: torch.device):
    """The schedule of a diffusers scheduler: flow matching for FlowMatchEulerDiscreteScheduler, else abar."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return FlowMatchingSchedule(scheduler, device)
    if not hasattr(scheduler, "alphas_cumprod"):
        raise CheckpointError(
            f"scheduler {type(scheduler).__name__} has neither a variance-preserving (alphas_cumprod) nor a "
            "flow-matching schedule memray knows"
        )
    return VariancePreservingSchedule(scheduler, device)
