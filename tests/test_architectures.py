"""The shipped real-size architectures build the networks of the checkpoints they name.

Built on the meta device (shapes without memory), so the check costs no weights: the parameter
counts are the published checkpoints' (SD 1.5: runwayml/stable-diffusion-v1-5; SD 2.1:
stabilityai/stable-diffusion-2-1).
"""

from __future__ import annotations

import pytest
import torch

from memray.models.architectures import ARCHITECTURES, architecture

PUBLISHED = {
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_an_architecture_builds_the_published_parameter_counts(name):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    config = architecture(name)
    with torch.device("meta"):
        built = {
            "unet": UNet2DConditionModel.from_config(config["unet"]),
            "vae": AutoencoderKL.from_config(config["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config["text_encoder"])),
        }
    assert {part: count(module) for part, module in built.items()} == PUBLISHED[name]
    assert built["unet"].config.cross_attention_dim == built["text_encoder"].config.hidden_size
    scheduler = DDIMScheduler.from_config(config["scheduler"])
    assert scheduler.config.prediction_type == {"sd15": "epsilon", "sd21": "v_prediction"}[name]


def test_every_shipped_architecture_is_checked_and_unknown_names_are_refused():
    assert set(ARCHITECTURES) == set(PUBLISHED)
    with pytest.raises(ValueError, match="unknown architecture 'sdxl'.*shipped: \\['sd15', 'sd21'\\]"):
        architecture("sdxl")


def test_the_random_weight_adapter_is_a_stable_diffusion_model_of_the_real_size():
    from memray.models.architectures import random_weight_adapter
    from memray.models.protocol import TextConditionedModel

    model = random_weight_adapter("sd15", device="meta")  # shapes only: the real build takes minutes on a CPU
    assert isinstance(model, TextConditionedModel) and model.family == "sd"
    assert (model.resolution, model.latent_shape, model.num_free_slots) == (512, (4, 64, 64), 75)
    assert tuple(model.vocabulary_embeddings.shape) == (49408, 768)
    assert count(model.unet) == PUBLISHED["sd15"]["unet"]
