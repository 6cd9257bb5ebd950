"""Adam with per-row state, so each image in a batch keeps its own step count and moments.

torch.optim.Adam shares one step counter per tensor; images that join or leave a batch at
different times would then see different bias corrections than they would alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RowAdam:
    """Adam (coupled L2 weight decay, as torch.optim.Adam) over the rows of a parameter tensor."""

    param: torch.Tensor
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    exp_avg: torch.Tensor = field(init=False)
    exp_avg_sq: torch.Tensor = field(init=False)
    steps: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.exp_avg = torch.zeros_like(self.param)
        self.exp_avg_sq = torch.zeros_like(self.param)
        self.steps = torch.zeros(self.param.shape[0], dtype=torch.long, device=self.param.device)

    @torch.no_grad()
    def reset(self, rows: torch.Tensor) -> None:
        """Forget the moments and step counts of `rows` (a slot handed to a new image)."""
        self.exp_avg[rows] = 0
        self.exp_avg_sq[rows] = 0
        self.steps[rows] = 0

    @torch.no_grad()
    def step(self, rows: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor | float) -> None:
        """Update param[rows] with grad (same leading size as rows) and per-row or scalar lr."""
        beta1, beta2 = self.betas
        if self.weight_decay:
            grad = grad + self.weight_decay * self.param[rows]
        self.steps[rows] += 1
        shape = (-1,) + (1,) * (self.param.ndim - 1)
        steps = self.steps[rows].to(self.param.dtype).reshape(shape)
        m = self.exp_avg[rows].mul_(beta1).add_(grad, alpha=1 - beta1)
        v = self.exp_avg_sq[rows].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        self.exp_avg[rows], self.exp_avg_sq[rows] = m, v
        lr = torch.as_tensor(lr, dtype=self.param.dtype, device=self.param.device).reshape(-1)
        lr = lr.reshape(shape) if lr.numel() > 1 else lr
        denom = (v / (1 - beta2**steps)).sqrt().add_(self.eps)
        self.param[rows] -= lr * (m / (1 - beta1**steps)) / denom


def cosine_lr(base_lr: float, step: torch.Tensor, total_steps: int) -> torch.Tensor:
    """Cosine decay from base_lr to 0 over total_steps (step counts from 0)."""
    progress = step.to(torch.float32).clamp(max=total_steps) / total_steps
    return base_lr * 0.5 * (1 + torch.cos(torch.pi * progress))
