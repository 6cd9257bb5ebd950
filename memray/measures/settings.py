"""The settings of every measure: plain frozen dataclasses, no torch.

The audit configuration (memray/config.py) is built from them, so it loads, validates and hashes
without torch; each measure under memray/measures/ reads its own. Defaults are the reference
values (docs/science.md); the comment of a setting says where memray departs.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Z0ErrorConfig:
    """M1 settings: how many noises and timesteps estimate the error of an image."""

    timesteps: int = 50
    noises: int = 16


@dataclass(frozen=True)
class NoiseInversionConfig:
    """M2 settings (reference: Adam lr 0.1, 32 timesteps a step; 1000 steps plain, 500 regularised, cosine)."""

    lr: float = 0.1
    samples_per_step: int = 32
    steps: int = 1000
    regularized_steps: int = 500
    ks_samples: int = 1000
    regularized: bool = True
    unregularized: bool = True


@dataclass(frozen=True)
class SoftPromptConfig:
    """M3 soft settings (reference: Adam lr 0.01, lambda 0.01, 16 samples a step, 500 steps, all 75 slots)."""

    lr: float = 0.01
    regularizer: str = "r2"  # "r1", "r2" or "none"
    weight: float = 0.01
    samples_per_step: int = 16
    steps: int = 500
    free_tokens: int | None = None  # None: every free slot of the text encoder (75 for SD)
    init: str = "caption"  # "caption": start at the image's caption's tokens where it has one; "random": random tokens


@dataclass(frozen=True)
class HardPromptConfig:
    """Algorithm 1 settings: a few tokens, top-k per position, up to 20 restarts."""

    tokens: int = 3
    top_k: int = 8
    restarts: int = 20
    test_samples: int = 8
    steps: int = 500
    run_for: str = "memorized"  # "memorized" (explain flagged images), "always" or "never"


@dataclass(frozen=True)
class WassersteinConfig:
    """M4 settings (reference: 1000 noises per distribution, 50 timesteps)."""

    noises: int = 1000
    timesteps: int = 50


@dataclass(frozen=True)
class InvMMConfig:
    """InvMM settings; defaults are the reference values for SD 1.x/2.x (departures noted)."""

    steps: int = 2000
    lr: float = 0.1
    samples_per_step: int = 16
    temperature: float = 2.0
    free_tokens: int | None = None  # None: every free slot (75 for SD)
    kl_weight_init: float = 1.0
    kl_weight_delta: float | None = None  # None: the model family's (1e-3 latent models, 1e-4 pixel DDPM)
    check_every: int = 50
    check_at_start: bool = True  # also check N(0, I) and the starting prompt before any step
    improvement_tol: float = 1e-3
    loss_window: int = 100
    check_noises: int = 8
    confirm_noises: int = 16  # fresh noises that count a replication found by counting (the verdict's evidence)
    guidance_scales: tuple[float, ...] = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    sampling_steps: int = 50
    prompt_init: str = "caption"  # "caption": start at the image's caption where it has one; "zero": the reference
    prompt_init_weight: float = 0.9  # share of each slot's expected token mix on the caption's token at the start
    prompt_lr: float | None = None  # Adam lr of the token logits; None: lr
    aligned_start: bool = False  # check from z_T = forward(z0, eps) instead of eps (mixes the target into the start)
    # The early stop (out_of_reach), calibrated on full-budget runs (docs/throughput.md); false: the reference
    early_stop: bool = True
    stop_after: int = 100  # it waits this many steps of the image's own
    stop_progress: float = 0.25  # ... then stops an image whose checks covered less of the way from null to bar
    gate_steps: int = 0  # > 0: a DDIM of this many steps on the first noise gates the full check (off: see docs)
    gate_margin: float = 0.1  # the full check runs where the gate's similarity is within this of the bar


@dataclass(frozen=True)
class StartCheckConfig:
    """Screen settings: counted noises, DDIM steps, guidance scales, and the progress that flags an image."""

    noises: int = 3
    steps: int = 8
    guidance_scales: tuple[float, ...] = (3.0, 7.0)
    flag_progress: float = 0.8  # progress at or above this sends the image to InvMM (measured: docs/laion.md)


@dataclass(frozen=True)
class WenConfig:
    """Screen settings: generations per caption, steps measured, guidance of the trajectory."""

    generations: int = 4
    steps: int = 1
    guidance: float = 7.5
    sampling_steps: int = 50
