"""The model layer through the real loading path: fsspec URLs, adapters, text embeddings, precision."""

from __future__ import annotations

import json
import shutil

import fsspec
import pytest
import torch

from memray.models import CheckpointError, load_model


def test_load_model_from_an_fsspec_url_matches_the_local_load(tiny_sd_dir, tiny_sd, tmp_path):
    fs = fsspec.filesystem("memory")
    fs.put(str(tiny_sd_dir), "memory://bucket/tiny-sd", recursive=True)
    remote = load_model("memory://bucket/tiny-sd", device="cpu", cache_dir=str(tmp_path / "cache"))
    assert remote.fingerprint == tiny_sd.fingerprint
    assert remote.slug == f"tiny-sd-{remote.fingerprint[:8]}"
    z = torch.randn(2, *remote.adapter.latent_shape)
    t = torch.tensor([10, 900])
    cond = remote.adapter.empty_condition(2)
    owner = torch.arange(2)
    remote.adapter.counter.reset(2)
    tiny_sd.adapter.counter.reset(2)
    a = remote.adapter.predict(z, t, cond, owner).z0
    b = tiny_sd.adapter.predict(z, t, cond, owner).z0
    torch.testing.assert_close(a, b)


def test_token_embedding_hook_reproduces_the_text_encoder_exactly(tiny_sd):
    model = tiny_sd.adapter
    ids = model.token_ids(["a red circle on the blue background", "a cat"])
    embeddings = model.vocabulary_embeddings.detach()[ids].clone().requires_grad_()
    via_hook = model.encode_embeddings(embeddings, ids)
    torch.testing.assert_close(via_hook, model.encode_ids(ids), rtol=0, atol=0)
    via_hook.square().sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_prompt_layout_and_readable_tokens(tiny_sd):
    model = tiny_sd.adapter
    word_ids = model.token_ids(["red cat"])[0, 1:3]
    ids = model.prompt_ids(word_ids.unsqueeze(0))
    tok = model.tokenizer
    assert ids[0, 0] == tok.bos_token_id and ids[0, 3] == tok.eos_token_id
    assert (ids[0, 4:] == tok.pad_token_id).all() and ids.shape[1] == model.max_length
    assert model.decode_tokens(word_ids.unsqueeze(0)) == ["red cat"]
    full = model.prompt_embeddings(model.vocabulary_embeddings[word_ids].unsqueeze(0))
    torch.testing.assert_close(full, model.vocabulary_embeddings[ids])
    with pytest.raises(ValueError, match="free slots"):
        model.prompt_ids(torch.zeros(1, model.num_free_slots + 1, dtype=torch.long))


def test_images_become_scaled_vae_means(tiny_sd, tiny_ddpm):
    model = tiny_sd.adapter
    pixels = torch.rand(2, 3, model.resolution, model.resolution) * 2 - 1
    expected = model.vae.encode(pixels).latent_dist.mean * model.vae.config.scaling_factor
    torch.testing.assert_close(model.encode_images(pixels), expected)
    assert model.encode_images(pixels).shape[1:] == model.latent_shape
    ddpm = tiny_ddpm.adapter
    pixels = torch.rand(1, 3, ddpm.resolution, ddpm.resolution) * 2 - 1
    torch.testing.assert_close(ddpm.encode_images(pixels), pixels)
    assert ddpm.empty_condition(3) is None and not ddpm.is_conditional


def test_pickle_checkpoints_need_the_explicit_flag(tiny_ddpm_dir, tmp_path):
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_ddpm_dir, pickled)
    weights = pickled / "unet" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), pickled / "unet" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(CheckpointError, match="allow_pickle"):
        load_model(str(pickled), device="cpu")
    assert load_model(str(pickled), device="cpu", allow_pickle=True).adapter.family == "ddpm"


def test_unsupported_pipelines_and_precisions_are_refused_at_start_up(tiny_ddpm_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_ddpm_dir, other)
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "FluxPipeline"
    (other / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="no memray adapter"):
        load_model(str(other), device="cpu")
    with pytest.raises(ValueError, match="GPUs"):
        load_model(str(tiny_ddpm_dir), device="cpu", precision="bf16")
