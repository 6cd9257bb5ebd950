"""AuditConfig: typed loading from TOML/YAML/JSON, validation at start-up, a hash that means something."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import pytest
from conftest import tiny_budgets, tiny_flags

from memray.config import (
    PRESETS,
    AuditConfig,
    ConfigError,
    from_dict,
    load_config,
    preset_config,
)
from memray.demo import demo_audit_config


def test_defaults_are_the_reference_hyperparameters():
    config = AuditConfig()
    assert (config.invmm.steps, config.invmm.lr, config.invmm.samples_per_step) == (2000, 0.1, 16)
    assert (config.invmm.temperature, config.invmm.check_every, config.invmm.check_noises) == (2.0, 50, 8)
    assert (config.invmm.improvement_tol, config.invmm.kl_weight_init, config.invmm.loss_window) == (1e-3, 1.0, 100)
    assert config.invmm.guidance_scales == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0)
    assert (config.noise_inversion.steps, config.noise_inversion.regularized_steps) == (1000, 500)
    assert (config.noise_inversion.samples_per_step, config.noise_inversion.ks_samples) == (32, 1000)
    assert (config.prompt_inversion.lr, config.prompt_inversion.weight, config.prompt_inversion.steps) == (
        0.01,
        0.01,
        500,
    )
    assert (config.wasserstein.noises, config.wasserstein.timesteps) == (1000, 50)
    assert config.hard_prompt.restarts == 20


def test_toml_yaml_and_json_load_the_same_config(tmp_path):
    (tmp_path / "a.toml").write_text(
        'seed = 3\nmeasures = ["invmm"]\n[invmm]\nsteps = 100\nguidance_scales = [1, 2.5]\n'
    )
    (tmp_path / "a.yaml").write_text("seed: 3\nmeasures: [invmm]\ninvmm:\n  steps: 100\n  guidance_scales: [1, 2.5]\n")
    (tmp_path / "a.json").write_text(
        json.dumps({"seed": 3, "measures": ["invmm"], "invmm": {"steps": 100, "guidance_scales": [1, 2.5]}})
    )
    configs = [load_config(tmp_path / name) for name in ("a.toml", "a.yaml", "a.json")]
    assert configs[0] == configs[1] == configs[2]
    assert configs[0].invmm.steps == 100 and configs[0].invmm.guidance_scales == (1.0, 2.5)
    assert configs[0].invmm.lr == 0.1  # unspecified settings keep their defaults


def test_preset_in_a_file_is_the_base_of_its_settings(tmp_path):
    (tmp_path / "q.toml").write_text('preset = "quick"\n[invmm]\nsteps = 7\n')
    config = load_config(tmp_path / "q.toml")
    assert config.invmm.steps == 7
    assert config.wasserstein.noises == preset_config("quick").wasserstein.noises


@pytest.mark.parametrize(
    "data, message",
    [
        ({"invmm": {"stepz": 3}}, "unknown setting"),
        ({"invmm": {"steps": "many"}}, "expected int"),
        ({"invmm": {"steps": 0}}, "invmm.steps: must be > 0"),
        ({"measures": ["invmm", "telepathy"]}, "unknown ['telepathy']"),
        ({"measures": ["wasserstein"]}, "needs 'prompt_inversion'"),
        ({"similarity": {"kind": "sscd"}}, "sscd_path"),
        ({"similarity": {"kind": "psnr"}}, "similarity.kind"),
        ({"hard_prompt": {"top_k": 100, "tokens": 5}}, "exceed 100000"),
        ({"invmm": {"guidance_scales": []}}, "at least one scale"),
        ({"invmm": 3}, "expected a table"),
        ({"precision": "int8"}, "precision: 'int8'"),
    ],
)
def test_invalid_configurations_fail_at_start_up_with_a_clear_message(data, message):
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert message in str(info.value)


def test_hash_is_stable_and_sensitive_to_every_result_changing_setting():
    base = AuditConfig()
    assert base.hash() == AuditConfig().hash() == from_dict(base.to_dict()).hash()
    changed = [
        base.replace(seed=1),
        base.replace(invmm={"steps": 1999}),
        base.replace(similarity={"threshold": 0.8}),
        base.replace(verdict={"invmm_rate_min": 0.01}),
        base.replace(measures=["invmm"]),
        base.replace(precision="bf16"),  # autocast changes the numbers: resume must not mix them
    ]
    hashes = {c.hash() for c in changed} | {base.hash()}
    assert len(hashes) == len(changed) + 1
    assert len(base.hash()) == 16 and int(base.hash(), 16) >= 0


def test_replace_merges_nested_sections():
    config = AuditConfig().replace(invmm={"steps": 10})
    assert config.invmm.steps == 10 and config.invmm.lr == 0.1
    assert json.loads(config.to_json())["invmm"]["steps"] == 10


def test_the_precision_flag_sets_the_config_and_its_hash():
    from memray.cli import add_model_args, build_config

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    default = build_config(parser.parse_args(["--model", "m"]))
    bf16 = build_config(parser.parse_args(["--model", "m", "--precision", "bf16"]))
    assert (default.precision, bf16.precision) == ("fp32", "bf16")
    assert default.hash() != bf16.hash()


def test_presets_are_files_and_keep_their_hashes():
    # A config hash identifies results in catalogs (resume): a preset that changes them is a new preset.
    assert {name: preset_config(name).hash() for name in PRESETS} == {
        "bench": "21b870de58d3ff14",
        "cpu": "a4244ef188d6b1d3",
        "default": "7a88ffde7e8b0d3a",
        "quick": "dec2d8f5dca8f5da",
        "reference": "adadaac7bda56067",
        "smoke": "4037639d3708901a",
    }
    assert preset_config("default") == AuditConfig()
    reference = preset_config("reference")
    assert (reference.invmm.early_stop, reference.verdict.evidence) == (False, "all")
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        preset_config("fast")


def test_a_preset_file_may_start_from_another_preset():
    smoke, quick = preset_config("smoke"), preset_config("quick")
    assert smoke.invmm.steps == 4 and smoke.invmm.confirm_noises == quick.invmm.confirm_noises == 4
    demo, cpu = load_config(demo_audit_config()), preset_config("cpu")  # the cpu preset, the verdict's measures
    assert demo.invmm == dataclasses.replace(cpu.invmm, confirm_noises=4) and demo.similarity == cpu.similarity
    assert demo.measures == ("invmm", "uncond_replication", "wen") and demo.wen.generations == 2


def test_the_test_flags_give_the_test_configuration():
    from memray.cli import add_model_args, build_config

    parser = argparse.ArgumentParser()
    add_model_args(parser)
    changes = {"measures": ["invmm", "z0_error"], "invmm": {"steps": 8, "guidance_scales": [1.0, 3.0]}}
    flags = tiny_flags(**changes)
    assert build_config(parser.parse_args(["--model", "m", *flags])) == tiny_budgets().replace(**changes)


def test_the_configuration_loads_and_validates_without_torch():
    probe = (
        "import sys, memray.config as c; [c.preset_config(name) for name in c.PRESETS]; "
        f"c.load_config({str(demo_audit_config())!r}); print('torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
