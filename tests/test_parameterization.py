"""Network output -> (eps_hat, z0_hat) for every prediction type, in closed form and through the adapters.

References used here, never the package's own formulas:
- perfect-model outputs built from (z0, eps, abar): epsilon -> eps, v -> sqrt(a) eps - sqrt(1-a) z0,
  sample -> z0;
- the schedule abar_t recomputed in float64 from the scaled-linear betas of build_tiny_sd;
- the raw UNet output converted with the closed forms written out below.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from memray.measures.parameterization import eps_and_z0
from memray.measures.z0_error import squared_error
from memray.models import load_model


def scaled_linear_abar(t, beta_start=0.00085, beta_end=0.012, steps=1000) -> np.ndarray:
    """abar_t of the SD scaled-linear schedule (the one build_tiny_sd writes), float64 by hand."""
    betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)[np.asarray(t)]


# abar values from t near 0 to t near T of the real schedule, plus extremes on both ends.
ABARS = [
    0.99999,
    float(scaled_linear_abar(0)),
    float(scaled_linear_abar(1)),
    0.5,
    float(scaled_linear_abar(500)),
    float(scaled_linear_abar(998)),
    float(scaled_linear_abar(999)),
    1e-4,
]


def perfect_output(kind, z0, eps, a):
    a = a.reshape(-1, *([1] * (z0.ndim - 1)))
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * z0
    if kind == "sample":
        return z0
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("abar", ABARS)
def test_perfect_model_output_recovers_eps_and_z0(kind, abar):
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    a = torch.full((3,), abar, dtype=torch.float64)
    z_t = a.sqrt().reshape(-1, 1, 1, 1) * z0 + (1 - a).sqrt().reshape(-1, 1, 1, 1) * eps
    eps_hat, z0_hat = eps_and_z0(perfect_output(kind, z0, eps, a), z_t, a, kind)
    assert eps_hat.dtype == torch.float64 and z0_hat.dtype == torch.float64
    # Recovering eps from a sample prediction at abar ~ 1 (or z0 from eps at abar ~ 0) divides
    # by a small number; the absolute tolerance scales with that amplification.
    amplification = 1.0 / min(abar, 1.0 - abar) ** 0.5
    torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-12 * amplification)
    torch.testing.assert_close(z0_hat, z0, rtol=1e-9, atol=1e-12 * amplification)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_per_sample_abar_broadcasts_over_the_batch(kind):
    gen = torch.Generator().manual_seed(1)
    a = torch.tensor(ABARS, dtype=torch.float64)
    z0 = torch.randn(len(ABARS), 2, 3, 3, generator=gen, dtype=torch.float64)
    eps = torch.randn(len(ABARS), 2, 3, 3, generator=gen, dtype=torch.float64)
    ar = a.reshape(-1, 1, 1, 1)
    z_t = ar.sqrt() * z0 + (1 - ar).sqrt() * eps
    eps_hat, z0_hat = eps_and_z0(perfect_output(kind, z0, eps, a), z_t, a, kind)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(z0_hat, z0, rtol=1e-8, atol=1e-9)


def test_float32_inputs_with_a_float64_schedule_keep_the_input_dtype():
    z_t = torch.randn(2, 4, 3, 3)
    out = torch.randn(2, 4, 3, 3)
    eps_hat, z0_hat = eps_and_z0(out, z_t, torch.tensor([0.3, 0.9], dtype=torch.float64), "epsilon")
    assert eps_hat.dtype == torch.float32 and z0_hat.dtype == torch.float32
    expected = (z_t - torch.tensor([0.7, 0.1]).sqrt().reshape(-1, 1, 1, 1) * out) / torch.tensor(
        [0.3, 0.9]
    ).sqrt().reshape(-1, 1, 1, 1)
    torch.testing.assert_close(z0_hat, expected)


@pytest.mark.parametrize("kind", ["eps", "v", "x0", "EPSILON", "banana", ""])
def test_unknown_prediction_type_raises(kind):
    z = torch.randn(1, 4, 2, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        eps_and_z0(z, z, torch.tensor([0.5]), kind)


# -- through the real adapters ----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tiny_sd_dir, tmp_path_factory):
    """The tiny SD checkpoint with each prediction type in its scheduler config, loaded for real."""
    root = tmp_path_factory.mktemp("param-ckpts")
    models = {}
    for kind in ("epsilon", "v_prediction", "sample"):
        path = root / kind
        shutil.copytree(tiny_sd_dir, path)
        config_path = path / "scheduler" / "scheduler_config.json"
        config = json.loads(config_path.read_text())
        config["prediction_type"] = kind
        config_path.write_text(json.dumps(config))
        models[kind] = load_model(str(path), device="cpu").adapter
    return models


def by_hand(kind, output, z_t, a):
    """The conversions of docs/science.md, written out independently of memray (float64)."""
    output, z_t = output.double(), z_t.double()
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1, 1, 1)
    if kind == "epsilon":
        eps = output
        z0 = (z_t - torch.sqrt(1 - a) * output) / torch.sqrt(a)
    elif kind == "v_prediction":
        z0 = torch.sqrt(a) * z_t - torch.sqrt(1 - a) * output
        eps = torch.sqrt(1 - a) * z_t + torch.sqrt(a) * output
    else:
        z0 = output
        eps = (z_t - torch.sqrt(a) * output) / torch.sqrt(1 - a)
    return eps, z0


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_adapter_predict_converts_the_raw_unet_output(checkpoints, kind):
    model = checkpoints[kind]
    assert model.prediction_type == kind
    t = torch.tensor([0, 1, 500, 998, 999])
    n = len(t)
    gen = torch.Generator().manual_seed(2)
    z_t = torch.randn(n, *model.latent_shape, generator=gen)
    cond = model.encode_ids(model.token_ids(["a red circle", "a cat", "", "blue sky", "the dog"]))
    model.counter.reset(n)
    pred = model.predict(z_t, t, cond, torch.arange(n))
    with torch.no_grad():
        raw = model.unet(z_t, t, encoder_hidden_states=cond).sample
    # The schedule: the scheduler's own table, checked against the float64 closed form.
    np.testing.assert_allclose(model.schedule.alphas_cumprod[t].numpy(), scaled_linear_abar(t.numpy()), rtol=1e-5)
    eps, z0 = by_hand(kind, raw, z_t, scaled_linear_abar(t.numpy()))
    # float32 network and schedule; dividing by sqrt(abar_999) ~ 0.07 or sqrt(1 - abar_0) ~ 0.03
    # amplifies float32 rounding, hence the 1e-4 absolute tolerance.
    torch.testing.assert_close(pred.eps.double(), eps, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.z0.double(), z0, rtol=1e-4, atol=1e-4)
    assert model.counter.forwards.tolist() == [1] * n


@pytest.mark.parametrize("kind", ["v_prediction", "sample"])
def test_prediction_types_are_not_interchangeable(checkpoints, kind):
    """Same weights, same inputs: a different prediction type must give a different z0_hat."""
    t = torch.tensor([300, 700])
    z_t = torch.randn(2, *checkpoints[kind].latent_shape, generator=torch.Generator().manual_seed(3))
    cond = checkpoints[kind].empty_condition(2)
    for model in (checkpoints["epsilon"], checkpoints[kind]):
        model.counter.reset(2)
    eps_model = checkpoints["epsilon"].predict(z_t, t, cond, torch.arange(2))
    other = checkpoints[kind].predict(z_t, t, cond, torch.arange(2))
    assert (eps_model.z0 - other.z0).abs().max() > 1e-2


def test_z0_error_equals_weighted_eps_error_for_real_unet_outputs(checkpoints):
    model = checkpoints["epsilon"]
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    n = len(t)
    gen = torch.Generator().manual_seed(4)
    z0 = torch.randn(n, *model.latent_shape, generator=gen)
    eps = torch.randn(n, *model.latent_shape, generator=gen)
    a = torch.tensor(scaled_linear_abar(t.numpy()), dtype=torch.float32).reshape(-1, 1, 1, 1)
    z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
    cond = model.encode_ids(model.token_ids(["a red circle"] * n))
    model.counter.reset(n)
    pred = model.predict(z_t, t, cond, torch.arange(n))
    lhs = squared_error(z0, pred.z0)
    rhs = (1 - a.flatten()) / a.flatten() * squared_error(eps, pred.eps)
    assert lhs.shape == (n,)
    torch.testing.assert_close(lhs, rhs, rtol=2e-3, atol=1e-6)
    # And the mean-over-entries convention of squared_error itself.
    torch.testing.assert_close(lhs, ((z0 - pred.z0) ** 2).reshape(n, -1).sum(1) / z0[0].numel())


def test_unknown_prediction_type_in_a_checkpoint_is_refused_at_load(tiny_sd_dir, tmp_path):
    path = tmp_path / "banana-sd"
    shutil.copytree(tiny_sd_dir, path)
    config_path = path / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config["prediction_type"] = "banana"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="banana") as info:
        load_model(str(path), device="cpu")
    assert "prediction_type" in str(info.value)
