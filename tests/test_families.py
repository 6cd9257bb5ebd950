"""SD 3.x, SDXL and unconditional latent diffusion, built tiny in code and loaded through the real path.

References here are never memray's own formulas: flow matching written out in float64, diffusers'
FlowMatchEulerDiscreteScheduler tables, and the diffusers pipelines themselves (encode_prompt, their
sampling loops with output_type="latent", the LDM pipeline's decoded images).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import png_bytes, tiny_budgets, tiny_flags
from test_invariants import (
    MarkedSimilarity,
    assert_invmm_rows_equal,
    assert_z0_error_counts_n_times_k_evaluations_per_owner,
    image_z0,
    run_invmm,
)

from memray.auditing.runner import audit_batch
from memray.catalog.reader import Catalog
from memray.catalog.writer import CatalogWriter
from memray.cli import main
from memray.data.records import ImageInput
from memray.measures import rng
from memray.measures.invmm import _PromptDistribution
from memray.measures.parameterization import flow_eps_and_z0, flow_noisy_sample
from memray.measures.sampling import ddim_generate
from memray.measures.stats import kl_to_standard_normal
from memray.measures.z0_error import sampled_z0_error
from memray.models import CheckpointError, load_model, supported_pipelines
from memray.models.protocol import DiffusionModel, TextConditionedModel
from memray.models.tiny import build_tiny_ldm, build_tiny_sd3

FAMILIES = ["ldm", "sdxl", "sd3"]
CONDITIONAL = ["sdxl", "sd3"]
SHIFT = 3.0  # build_tiny_sd3's scheduler, SD 3's


def shifted_sigma(t) -> np.ndarray:
    """FlowMatchEulerDiscreteScheduler's training sigma of timestep index t (0 cleanest), by hand in float64."""
    u = (np.asarray(t, dtype=np.float64) + 1) / 1000
    return SHIFT * u / (1 + (SHIFT - 1) * u)


def networks(model) -> dict[str, torch.nn.Module]:
    """Every network an adapter holds."""
    nets = {"denoiser": model.unet}
    if hasattr(model, "codec"):
        nets["vae"] = model.codec.vae
    for k, encoder in enumerate(getattr(model, "text_encoders", [])):
        nets[f"text_encoder_{k}"] = encoder
    return nets


# -- flow matching in closed form --------------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.0, 1e-4, float(shifted_sigma(0)), 0.5, float(shifted_sigma(998)), 1.0])
def test_a_perfect_velocity_recovers_eps_and_z0(sigma):
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    eps = torch.randn(3, 4, 5, 6, generator=gen, dtype=torch.float64)
    s = torch.full((3,), sigma, dtype=torch.float64)
    x_t = flow_noisy_sample(z0, eps, s)
    torch.testing.assert_close(x_t, (1 - sigma) * z0 + sigma * eps, rtol=0, atol=1e-15)
    # the velocity the network is trained on: d x_t / d sigma = eps - z0
    eps_hat, z0_hat = flow_eps_and_z0(eps - z0, x_t, s)
    torch.testing.assert_close(eps_hat, eps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(z0_hat, z0, rtol=1e-12, atol=1e-12)


def test_flow_levels_are_the_schedulers_training_and_sampling_sigmas(tiny_families):
    from diffusers import FlowMatchEulerDiscreteScheduler

    model = tiny_families["sd3"].adapter
    reference = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config)
    t = torch.arange(1000)
    np.testing.assert_allclose(model.schedule.sigma(t).numpy(), shifted_sigma(t.numpy()), rtol=1e-6)
    np.testing.assert_allclose(model.schedule.sigma(t).numpy(), reference.sigmas.flip(0).numpy(), rtol=1e-6)
    # noising with the shift, against the scheduler's own scale_noise at the same levels
    gen = torch.Generator().manual_seed(1)
    z0, eps = (torch.randn(5, *model.latent_shape, generator=gen) for _ in range(2))
    t = torch.tensor([0, 1, 500, 998, 999])
    s = torch.tensor(shifted_sigma(t.numpy())).reshape(-1, 1, 1, 1)
    noisy = model.noisy_sample(z0, eps, t)
    torch.testing.assert_close(noisy.double(), (1 - s) * z0.double() + s * eps.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(noisy, reference.scale_noise(z0, reference.timesteps[999 - t], eps))
    # the Euler sampler's levels, given as fractional t
    reference.set_timesteps(7)
    np.testing.assert_allclose(
        model.schedule.sigma(model.sampling_timesteps(7)).numpy(), reference.sigmas[:-1].numpy(), rtol=1e-6
    )


def test_sd3_predict_converts_the_raw_velocity(tiny_families):
    model = tiny_families["sd3"].adapter
    assert model.prediction_type == "flow"
    t = torch.tensor([0, 1, 500, 998, 999])
    n = len(t)
    z_t = torch.randn(n, *model.latent_shape, generator=torch.Generator().manual_seed(2))
    cond = model.encode_ids(model.token_ids(["a red circle", "a cat", "", "blue sky", "the dog"]))
    model.counter.reset(n)
    pred = model.predict(z_t, t, cond, torch.arange(n))
    s = torch.tensor(shifted_sigma(t.numpy())).reshape(-1, 1, 1, 1)
    with torch.no_grad():
        v = model.unet(
            hidden_states=z_t,
            timestep=(s.flatten() * 1000).float(),  # the pipeline feeds sigma * T
            encoder_hidden_states=cond[:, :-1],
            pooled_projections=cond[:, -1, : model.pooled_width],
        ).sample.double()
    torch.testing.assert_close(pred.z0.double(), z_t.double() - s * v, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred.eps.double(), z_t.double() + (1 - s) * v, rtol=1e-4, atol=1e-4)
    assert model.counter.forwards.tolist() == [1] * n


def test_sd3_without_t5_conditions_on_zeros_and_dynamic_shifting_is_refused(tmp_path):
    path = build_tiny_sd3(tmp_path / "sd3-no-t5", t5=False)
    model = load_model(str(path), device="cpu").adapter
    # the pipeline without T5: zeros of max_sequence_length (256) rows in its place
    t5_rows = model.empty_condition(1)[:, model.max_length : -1]
    assert t5_rows.shape[1] == 256 and not t5_rows.any()
    config_file = path / "scheduler" / "scheduler_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_dynamic_shifting": True}))
    with pytest.raises(CheckpointError, match="use_dynamic_shifting"):
        load_model(str(path), device="cpu")


# -- against the diffusers pipelines -----------------------------------------------------------


@torch.no_grad()
def test_sd3_condition_and_guided_euler_sampling_match_the_pipeline(tiny_family_dirs, tiny_families):
    from diffusers import StableDiffusion3Pipeline

    model = tiny_families["sd3"].adapter
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_family_dirs["sd3"], local_files_only=True)
    prompts, captions = ["a red cat", "a blue house on the tree"], ["a dog in the sky", ""]

    def reference(clip_l, clip_g_and_t5):
        embeds, _, pooled, _ = pipe.encode_prompt(
            clip_l, clip_g_and_t5, clip_g_and_t5, do_classifier_free_guidance=False
        )
        return embeds, pooled

    # the prompt fills CLIP-L; CLIP-G and T5 see each image's caption ("" without one), as in the reference
    for context, others in ((model.caption_context(captions), captions), (None, ["", ""])):
        cond = model.encode_ids(model.token_ids(prompts), context)
        embeds, pooled = reference(prompts, others)
        torch.testing.assert_close(cond[:, :-1], embeds, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cond[:, -1, : model.pooled_width], pooled, rtol=1e-5, atol=1e-5)
    empty, _, empty_pooled, _ = pipe.encode_prompt("", "", "", do_classifier_free_guidance=False)
    torch.testing.assert_close(model.empty_condition(1)[:, :-1], empty, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.empty_condition(1)[:, -1, : model.pooled_width], empty_pooled)

    z_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(3))
    model.counter.reset(2)
    cond = model.encode_ids(model.token_ids(prompts), model.caption_context(prompts))  # every encoder: the prompt
    mine = ddim_generate(model, z_T, cond, torch.full((2,), 3.5), torch.arange(2), 4)
    theirs = pipe(prompt=prompts, guidance_scale=3.5, num_inference_steps=4, latents=z_T, output_type="latent").images
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert model.counter.forwards.tolist() == [4 * 2] * 2  # both CFG branches, every step


@torch.no_grad()
def test_sdxl_condition_and_guided_ddim_sampling_match_the_pipeline(tiny_family_dirs, tiny_families):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    model = tiny_families["sdxl"].adapter
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_family_dirs["sdxl"], local_files_only=True)
    prompts = ["a red cat", "a blue house on the tree"]
    cond = model.encode_ids(model.token_ids(prompts))
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(cond[:, :-1], embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond[:, -1, : model.pooled_width], pooled, rtol=1e-5, atol=1e-5)
    # force_zeros_for_empty_prompt: the unconditional branch is zeros, as in the pipeline
    assert pipe.config.force_zeros_for_empty_prompt and not model.empty_condition(3).any()

    # memray samples with DDIM from the checkpoint's config (SDXL ships Euler; docs/science.md); an Euler
    # config says nothing of clipping, where DDIMScheduler would default to clipping latents to [-1, 1]
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    z_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(4))
    model.counter.reset(2)
    mine = ddim_generate(model, z_T, cond, torch.full((2,), 3.0), torch.arange(2), 4)
    theirs = pipe(prompt=prompts, guidance_scale=3.0, num_inference_steps=4, latents=z_T, output_type="latent").images
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_ldm_latents_and_samples_match_the_pipeline(tiny_family_dirs, tiny_families):
    from diffusers import LDMPipeline

    model = tiny_families["ldm"].adapter
    assert not model.is_conditional and model.empty_condition(2) is None
    pipe = LDMPipeline.from_pretrained(tiny_family_dirs["ldm"], local_files_only=True)
    pixels = torch.rand(2, 3, model.resolution, model.resolution, generator=torch.Generator().manual_seed(5)) * 2 - 1
    scale = pipe.vqvae.config.scaling_factor
    torch.testing.assert_close(model.encode_images(pixels), pipe.vqvae.encode(pixels).latents * scale)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(6), num_inference_steps=4, output_type="np")
    z_T = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(6))
    model.counter.reset(2)
    mine = model.decode_latents(ddim_generate(model, z_T, None, torch.ones(2), torch.arange(2), 4))
    np.testing.assert_allclose((mine / 2 + 0.5).permute(0, 2, 3, 1).numpy(), images.images, atol=1e-4)


def test_ldm_with_a_kl_autoencoder_takes_its_scaled_mean(tmp_path):
    model = load_model(str(build_tiny_ldm(tmp_path / "ldm-kl", autoencoder="kl")), device="cpu").adapter
    pixels = torch.rand(1, 3, model.resolution, model.resolution) * 2 - 1
    vae = model.codec.vae
    expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(model.encode_images(pixels), expected)


# -- the protocol, gradients, counts, batch invariance -------------------------------------------


def test_every_family_provides_the_measures_protocol(tiny_families):
    for family, loaded in tiny_families.items():
        model = loaded.adapter
        assert model.family == family and isinstance(model, DiffusionModel)
        assert isinstance(model, TextConditionedModel) == model.is_conditional == (family in CONDITIONAL)
        assert model.kl_weight_delta == 1e-3  # latent models: the reference's SD step


@pytest.mark.parametrize("family", CONDITIONAL)
def test_invmm_gradients_reach_only_the_inversion_parameters(tiny_families, family):
    model = tiny_families[family].adapter
    params = {f"{n}.{p}": w for n, net in networks(model).items() for p, w in net.named_parameters()}
    assert params and not any(w.requires_grad for w in params.values())
    s, batch = 2, 2
    z0 = image_z0(model, [21, 22])
    gens = rng.image_generators(["g0", "g1"], 0, "invmm")
    context = model.caption_context(["a red cat", ""])  # SD 3: CLIP-G and T5 on the caption; SDXL: None
    prompt = _PromptDistribution(model, run_invmm.__defaults__[0], batch, model.num_free_slots, model.device, context)
    mu = (0.1 * torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))).requires_grad_()
    log_var = torch.full_like(z0, -0.2).requires_grad_()
    logits = prompt.logits.clone().requires_grad_()
    eps = mu.unsqueeze(1) + (0.5 * log_var).exp().unsqueeze(1) * rng.randn_per_image(gens, (s, *z0.shape[1:]))
    t = rng.randint_per_image(gens, model.num_train_timesteps, (s,)).flatten()
    model.counter.reset(batch)
    recon = sampled_z0_error(
        model,
        z0.repeat_interleave(s, 0),
        eps.flatten(0, 1),
        t,
        prompt.sampled_condition(logits, gens, s, torch.arange(batch)),
        torch.arange(batch).repeat_interleave(s),
    )
    (recon.reshape(batch, s).mean(1) + kl_to_standard_normal(mu, log_var)).sum().backward()
    for name, p in (("mu", mu), ("log_var", log_var), ("logits", logits)):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad.flatten(1).abs().sum(1) > 0).all(), f"no gradient reaches {name}"
    assert all(w.grad is None for w in params.values()), "a network weight received a gradient"
    np.testing.assert_array_equal(model.counter.forwards, [s, s])
    np.testing.assert_array_equal(model.counter.backwards, [s, s])


@pytest.mark.parametrize("family", FAMILIES)
def test_z0_prediction_error_counts_n_times_k_evaluations_per_owner(tiny_families, family):
    assert_z0_error_counts_n_times_k_evaluations_per_owner(tiny_families[family].adapter)


@pytest.mark.parametrize("family", FAMILIES)
def test_invmm_is_batch_invariant(tiny_families, family):
    model = tiny_families[family].adapter
    ids = ["b0", "b1", "b2"]
    z0 = image_z0(model, [40, 41, 42])
    similarity = MarkedSimilarity(z0[[0]].clone())  # image 0 replicates at the start and leaves the batch
    batch = run_invmm(model, z0, ids, similarity)
    assert batch.replicated.tolist() == [True, False, False]
    alone = run_invmm(model, z0[2:3], ids[2:3], similarity)
    assert_invmm_rows_equal(batch, [2], alone, [0])


# -- end to end ----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_every_measure_runs_end_to_end_and_writes_a_catalog_row(tiny_families, family, tmp_path):
    loaded = tiny_families[family]
    config = tiny_budgets().replace(similarity={"null_samples": 2}, hard_prompt={"run_for": "always"})
    if not loaded.adapter.is_conditional:
        config = config.replace(measures=["uncond_replication", "invmm", "z0_error", "noise_inversion"])
    items = [
        ImageInput(f"{family}-0", data=png_bytes(50), caption="a red cat"),
        ImageInput(f"{family}-1", data=png_bytes(51)),
    ]
    audits = audit_batch(loaded, items, config, replicas=0)
    rows = [a.row for a in audits]
    assert [r.status for r in rows] == ["ok", "ok"], [r.error for r in rows]
    assert all(r.invmm_steps > 0 and r.z0_error is not None and r.noise_kl is not None for r in rows)
    if loaded.adapter.is_conditional:
        assert all(r.wasserstein is not None and r.soft_prompt_norm is not None for r in rows)
        assert all(r.hard_prompt_error is not None for r in rows)
        assert rows[0].wen_score is not None and rows[1].wen_score is None  # only the captioned image
    with CatalogWriter(str(tmp_path / "catalog")) as writer:
        writer.add(rows)
    got = Catalog(str(tmp_path / "catalog")).query("SELECT image_id, model FROM latest ORDER BY image_id")
    assert got.column("image_id").to_pylist() == [f"{family}-0", f"{family}-1"]
    assert got.column("model").to_pylist() == [loaded.slug] * 2


def test_memray_inspect_detects_the_family_from_model_index(tiny_family_dirs, tmp_path, capsys):
    image = tmp_path / "target.png"
    image.write_bytes(png_bytes(52, size=(40, 40)))
    args = ["inspect", str(image), "--model", str(tiny_family_dirs["sd3"]), "--caption", "a red cat"]
    assert main([*args, "--out", str(tmp_path / "out"), "--samples", "1", *tiny_flags()]) == 0
    assert "(sd3, flow, 32px" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "row.json").read_text())["status"] == "ok"


def test_an_unsupported_family_names_itself_and_what_is_supported(tiny_family_dirs, tmp_path):
    other = tmp_path / "flux"
    shutil.copytree(tiny_family_dirs["sd3"], other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="'FluxPipeline' has no memray adapter") as info:
        load_model(str(other), device="cpu")
    for pipeline in ("StableDiffusion3Pipeline", "StableDiffusionXLPipeline", "LDMPipeline", "DDPMPipeline"):
        assert pipeline in str(info.value) and pipeline in supported_pipelines()
