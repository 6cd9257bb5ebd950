"""RowAdam against torch.optim.Adam, per-row state, and the cosine schedule's closed form."""

from __future__ import annotations

import math

import pytest
import torch

from memray.measures.optim import RowAdam, cosine_lr

SHAPE = (4, 3, 5)


def grads(steps, shape=SHAPE, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) * (1 + k) for k in range(steps)]


def torch_adam_trajectory(start, grad_list, *, lr, betas, eps, weight_decay):
    """Parameter after each step of torch.optim.Adam fed the given gradients."""
    p = start.clone().requires_grad_()
    opt = torch.optim.Adam([p], lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    out = []
    for g in grad_list:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out, opt.state[p]


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
@pytest.mark.parametrize("lr_kind", ["scalar", "tensor-scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_rows_together_match_torch_adam_step_by_step(weight_decay, lr_kind, dtype):
    lr, betas, eps = 0.05, (0.8, 0.95), 1e-6
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1), dtype=dtype)
    gs = grads(12, dtype=dtype)
    expected, state = torch_adam_trajectory(start, gs, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    param = start.clone()
    opt = RowAdam(param, betas=betas, eps=eps, weight_decay=weight_decay)
    lr_arg = {
        "scalar": lr,
        "tensor-scalar": torch.tensor(lr, dtype=dtype),
        "vector": torch.full((SHAPE[0],), lr, dtype=dtype),
    }[lr_kind]
    rows = torch.arange(SHAPE[0])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    for g, want in zip(gs, expected):
        opt.step(rows, g, lr_arg)
        torch.testing.assert_close(param, want, **tol)
    torch.testing.assert_close(opt.exp_avg, state["exp_avg"], **tol)
    torch.testing.assert_close(opt.exp_avg_sq, state["exp_avg_sq"], **tol)
    assert opt.steps.tolist() == [12] * SHAPE[0]


def test_default_hyperparameters_are_torch_adams():
    start = torch.randn(SHAPE, dtype=torch.float64)
    gs = grads(3)
    expected, _ = torch_adam_trajectory(start, gs, lr=0.1, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    param = start.clone()
    opt = RowAdam(param)
    for g in gs:
        opt.step(torch.arange(SHAPE[0]), g, 0.1)
    torch.testing.assert_close(param, expected[-1], rtol=1e-12, atol=1e-12)


def test_per_row_learning_rates_match_separate_torch_adams():
    lrs = torch.tensor([0.3, 0.1, 0.01, 0.0], dtype=torch.float64)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    gs = grads(5, seed=3)
    param = start.clone()
    opt = RowAdam(param, weight_decay=0.01)
    for g in gs:
        opt.step(torch.arange(SHAPE[0]), g, lrs)
    for i, lr in enumerate(lrs.tolist()):
        want, _ = torch_adam_trajectory(
            start[i], [g[i] for g in gs], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01
        )
        torch.testing.assert_close(param[i], want[-1], rtol=1e-12, atol=1e-12)
    assert torch.equal(param[3], start[3])


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_subset_updates_leave_other_rows_and_their_moments_alone(weight_decay):
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    gs = grads(4, seed=5)
    param = start.clone()
    opt = RowAdam(param, weight_decay=weight_decay)
    opt.step(torch.arange(4), gs[0], 0.1)
    before = {k: getattr(opt, k).clone() for k in ("param", "exp_avg", "exp_avg_sq", "steps")}
    rows = torch.tensor([0, 2])
    opt.step(rows, gs[1][rows], 0.1)
    for name, old in before.items():
        new = getattr(opt, name)
        for r in (1, 3):
            assert torch.equal(new[r], old[r]), f"{name}[{r}] changed"
        for r in (0, 2):
            assert not torch.equal(new[r], old[r]), f"{name}[{r}] did not change"
    assert opt.steps.tolist() == [2, 1, 2, 1]
    assert param is opt.param  # updated in place, the caller's tensor


def test_per_row_step_counts_follow_each_row_alone():
    """Rows that skip steps see the bias correction of their own step count, as if optimised alone."""
    betas, wd, lr = (0.9, 0.999), 0.01, 0.1
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    gs = grads(5, seed=7)
    schedule = [torch.arange(4), torch.tensor([0]), torch.tensor([0, 3]), torch.tensor([1, 2, 3]), torch.arange(4)]
    param = start.clone()
    opt = RowAdam(param, betas=betas, weight_decay=wd)
    for rows, g in zip(schedule, gs):
        opt.step(rows, g[rows], lr)
    for i in range(4):
        mine = [g[i] for rows, g in zip(schedule, gs) if i in rows.tolist()]
        want, state = torch_adam_trajectory(start[i], mine, lr=lr, betas=betas, eps=1e-8, weight_decay=wd)
        torch.testing.assert_close(param[i], want[-1], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.exp_avg[i], state["exp_avg"], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(opt.exp_avg_sq[i], state["exp_avg_sq"], rtol=1e-12, atol=1e-12)
        assert int(opt.steps[i]) == len(mine) == int(state["step"])


def test_a_row_updated_alone_equals_the_same_row_updated_in_a_batch():
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8), dtype=torch.float32)
    gs = grads(6, seed=9, dtype=torch.float32)
    together, alone = start.clone(), start.clone()
    opt_t = RowAdam(together, weight_decay=0.01)
    opt_a = RowAdam(alone, weight_decay=0.01)
    for g in gs:
        opt_t.step(torch.arange(4), g, 0.1)
        for r in range(4):
            opt_a.step(torch.tensor([r]), g[r : r + 1], 0.1)
    torch.testing.assert_close(alone, together, rtol=0, atol=0)
    torch.testing.assert_close(opt_a.exp_avg, opt_t.exp_avg, rtol=0, atol=0)
    torch.testing.assert_close(opt_a.exp_avg_sq, opt_t.exp_avg_sq, rtol=0, atol=0)


# -- cosine learning-rate schedule -------------------------------------------------------------


def test_cosine_lr_closed_form():
    base, total = 0.1, 500
    steps = torch.tensor([0, 125, 250, 375, 500, 700])
    lr = cosine_lr(base, steps, total)
    expected = torch.tensor(
        [base, base * (1 + math.cos(math.pi / 4)) / 2, base / 2, base * (1 + math.cos(3 * math.pi / 4)) / 2, 0.0, 0.0]
    )
    torch.testing.assert_close(lr, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(cosine_lr(base, torch.tensor(0), total), torch.tensor(base))
    assert (lr[1:] <= lr[:-1]).all()
