"""The audit configuration: typed, validated, loadable from TOML/YAML, and hashed.

The hash identifies results in the catalog, so it covers everything that changes a result
(measures, hyperparameters, seed, thresholds) and nothing that does not (device, batch size).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from memray.auditing.registry import REGISTRY
from memray.errors import ConfigError
from memray.measures.settings import (
    HardPromptConfig,
    InvMMConfig,
    NoiseInversionConfig,
    SoftPromptConfig,
    StartCheckConfig,
    WassersteinConfig,
    WenConfig,
    Z0ErrorConfig,
)

# The measures an audit can run, in the order they run, each with the measures it needs run before it
# (memray.auditing.registry, torch-free, so a configuration is checked without loading a model's libraries).
MEASURE_NEEDS = {name: measure.needs for name, measure in REGISTRY.items()}
MEASURES = tuple(MEASURE_NEEDS)
V1_CHAIN = ("z0_error", "noise_inversion", "prompt_inversion", "wasserstein")
# Precision: the name, and the torch dtype the networks autocast to (memray.models.autocast_dtype).
PRECISIONS = {"fp32": None, "bf16": "bfloat16", "fp16": "float16"}


@dataclass(frozen=True)
class SimilarityConfig:
    """Which similarity decides replication, and the bar a replica must clear (docs/science.md).

    A replica must reach the threshold and remove a share `null_gain` of the distance that each
    null leaves: the content null (the target without its detail) and the model null (the
    `null_quantile` of the target's similarity to `null_samples` samples of the model from the
    empty prompt; 0 samples: no model null, and no uncond_replication measure).
    """

    kind: str = "tiled_l2"  # "sscd" (needs sscd_path), "tiled_l2" or "latent_l2"
    threshold: float | None = None  # None: the kind's default (sscd 0.5, tiled_l2 0.9, latent_l2 0.5)
    nulls: bool = True  # false: the reference's absolute threshold alone (the nulls are still recorded)
    null_gain: float = 0.5
    null_samples: int = 64
    null_quantile: float = 0.9
    sscd_path: str | None = None


@dataclass(frozen=True)
class VerdictConfig:
    """The rule from scores to memorized / not_memorized / inconclusive."""

    # replicated by InvMM where the KL bound says plain N(0, I) noise under that prompt replicates the
    # image in at least this share of samples: memorized (docs/science.md, "the verdict")
    invmm_rate_min: float = 0.001
    # "count": the bound at the Clopper-Pearson lower limit of k of n counted replicas (InvMM also stops
    # where k of K already clear it, and counts again on fresh noises); "all": the reference, where a
    # check succeeds only when all K replicate and q(A) is taken as 1
    evidence: str = "count"
    confidence: float = 0.95  # of the lower limit of q(A)
    uncond_rate_min: float = 0.03  # replicated by at least this share of the empty prompt's samples: memorized
    shift_sd_memorized: float = 10.0  # Chebyshev: P <= 1/k^2 = 1% under the safe model
    shift_sd_clear: float = 3.0


@dataclass(frozen=True)
class ImageConfig:
    """How untrusted image bytes become model input."""

    allow_upscale: bool = False
    max_pixels: int = 89_478_485


@dataclass(frozen=True)
class AuditConfig:
    """Everything that determines an audit's results. Reference hyperparameters are the defaults."""

    measures: tuple[str, ...] = (
        "invmm",
        "uncond_replication",
        "z0_error",
        "noise_inversion",
        "prompt_inversion",
        "wasserstein",
        "wen",
        "hard_prompt",
    )
    # what a cascade's stage 1 runs on every image (its flag: start_check.flag_progress); stage 2 runs `measures`
    screens: tuple[str, ...] = ("uncond_replication", "start_check")
    seed: int = 0
    # Autocast on GPU: bf16/fp16 change the numbers, so precision is part of the config and its hash.
    precision: str = "fp32"
    images: ImageConfig = field(default_factory=ImageConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    z0_error: Z0ErrorConfig = field(default_factory=Z0ErrorConfig)
    noise_inversion: NoiseInversionConfig = field(default_factory=NoiseInversionConfig)
    prompt_inversion: SoftPromptConfig = field(default_factory=SoftPromptConfig)
    hard_prompt: HardPromptConfig = field(default_factory=HardPromptConfig)
    wasserstein: WassersteinConfig = field(default_factory=WassersteinConfig)
    invmm: InvMMConfig = field(default_factory=InvMMConfig)
    start_check: StartCheckConfig = field(default_factory=StartCheckConfig)
    wen: WenConfig = field(default_factory=WenConfig)
    verdict: VerdictConfig = field(default_factory=VerdictConfig)

    def __post_init__(self):
        validate(self)
        # One order and no repeats: the same measures listed in another order, or one twice, are the
        # same audit (they run in the registry's order whatever the list says) and have one hash.
        object.__setattr__(self, "measures", tuple(name for name in _MEASURE_ORDER if name in self.measures))

    def to_dict(self) -> dict:
        """Plain JSON-able dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, no whitespace; what the hash is taken of."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    def hash(self) -> str:
        """First 16 hex digits of sha256 of the canonical JSON."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def replace(self, **changes) -> AuditConfig:
        """A copy with nested changes: replace(invmm={"steps": 100}, seed=1)."""
        return apply_overrides(self, [], **changes)

    def screen_config(self) -> AuditConfig:
        """The configuration of a cascade's stage 1: the screens in place of the measures."""
        return self.replace(measures=list(self.screens))


# The order of `measures` in every config, and so in its hash: the default's (the order that configs
# hashed before measures were put in order used, so their catalogs still resume), then any other
# registered measure in the registry's order.
_MEASURE_ORDER = (*AuditConfig.measures, *(name for name in MEASURES if name not in AuditConfig.measures))


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a table of settings, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(data) - set(fields))
    if unknown and where:
        raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    if unknown:  # the top level: say what each unknown name was taken for, a section or a setting
        sections = sorted(name for name in fields if dataclasses.is_dataclass(hints[name]))
        named = [f"{'section' if isinstance(data[name], dict) else 'setting'} {name!r}" for name in unknown]
        raise ConfigError(
            f"unknown {', '.join(named)}; sections: {sections}; settings: {sorted(set(fields) - set(sections))}"
        )
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where or 'config'}: {exc}") from exc


def _coerce(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return tuple(_coerce(args[0], v, where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")
    return value


def _numbers(node, where: str = ""):
    """(name, value) of every number in a config tree, tuples item by item."""
    for f in dataclasses.fields(node):
        value, name = getattr(node, f.name), f"{where}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from _numbers(value, name + ".")
        elif isinstance(value, tuple):
            yield from ((f"{name}[{i}]", v) for i, v in enumerate(value) if isinstance(v, (int, float)))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield name, value


def validate(config: AuditConfig) -> None:
    """Range and consistency checks, so faults surface at start-up, not hours into a job."""
    # A NaN compares false with everything: as a threshold or a scale it silently turns verdicts.
    problems = [
        f"{name}: must be a finite number, got {value}" for name, value in _numbers(config) if not math.isfinite(value)
    ]
    if problems:  # the range checks below would only restate these
        raise ConfigError("invalid audit configuration:\n  " + "\n  ".join(problems))
    if not config.measures:
        problems.append(f"measures: at least one measure is needed; known: {list(MEASURES)}")
    if config.seed < 0:
        problems.append(f"seed: must be >= 0, got {config.seed}")
    unknown = sorted(set(config.measures) - set(MEASURES))
    if unknown:
        problems.append(f"measures: unknown {unknown}; known: {list(MEASURES)}")
    unknown = sorted(set(config.screens) - set(MEASURES))
    if unknown or "start_check" not in config.screens:
        problems.append(
            f"screens: must name start_check (the cascade's flag) and known measures, got {list(config.screens)}"
        )
    if config.precision not in PRECISIONS:
        problems.append(f"precision: {config.precision!r} is not one of {list(PRECISIONS)}")
    for name in config.measures:
        missing = [need for need in MEASURE_NEEDS.get(name, ()) if need not in config.measures]
        if missing:
            problems.append(f"measures: {name!r} needs {', '.join(map(repr, missing))} (it uses what it finds)")
    positive = {
        "z0_error.timesteps": config.z0_error.timesteps,
        "z0_error.noises": config.z0_error.noises,
        "noise_inversion.samples_per_step": config.noise_inversion.samples_per_step,
        "noise_inversion.ks_samples": config.noise_inversion.ks_samples,
        "prompt_inversion.samples_per_step": config.prompt_inversion.samples_per_step,
        "hard_prompt.tokens": config.hard_prompt.tokens,
        "hard_prompt.top_k": config.hard_prompt.top_k,
        "hard_prompt.restarts": config.hard_prompt.restarts,
        "hard_prompt.test_samples": config.hard_prompt.test_samples,
        "wasserstein.noises": config.wasserstein.noises,
        "wasserstein.timesteps": config.wasserstein.timesteps,
        "invmm.steps": config.invmm.steps,
        "invmm.samples_per_step": config.invmm.samples_per_step,
        "invmm.check_every": config.invmm.check_every,
        "invmm.check_noises": config.invmm.check_noises,
        "invmm.confirm_noises": config.invmm.confirm_noises,
        "start_check.noises": config.start_check.noises,
        "start_check.steps": config.start_check.steps,
        "invmm.sampling_steps": config.invmm.sampling_steps,
        "invmm.loss_window": config.invmm.loss_window,
        "invmm.temperature": config.invmm.temperature,
        "invmm.lr": config.invmm.lr,
        "noise_inversion.lr": config.noise_inversion.lr,
        "prompt_inversion.lr": config.prompt_inversion.lr,
        "wen.generations": config.wen.generations,
        "wen.steps": config.wen.steps,
        "images.max_pixels": config.images.max_pixels,
    }
    problems += [f"{name}: must be > 0, got {value}" for name, value in positive.items() if not value > 0]
    problems += [f"{name}: must be at most {high:,}, got {value:,}" for name, (value, high) in _upper_bounds(config)]
    # At or below the similarity's least value every sample replicates; above 1 (an exact copy) none does.
    lowest = {"tiled_l2": 0.0, "sscd": -1.0, "latent_l2": -math.inf}.get(config.similarity.kind)
    threshold = config.similarity.threshold
    if threshold is not None and lowest is not None and not lowest < threshold <= 1:
        problems.append(
            f"similarity.threshold: must be in ({lowest:g}, 1] for {config.similarity.kind} (1: an exact copy), "
            f"got {threshold}"
        )
    if config.wasserstein.noises < 2:
        problems.append("wasserstein.noises: needs at least 2 noises for a spread")
    if config.hard_prompt.top_k**config.hard_prompt.tokens > 100_000:
        problems.append("hard_prompt: top_k ** tokens candidates exceed 100000; lower one of them")
    if config.wen.steps > config.wen.sampling_steps:
        problems.append("wen.steps: cannot exceed wen.sampling_steps")
    choices = {
        "similarity.kind": (config.similarity.kind, ("sscd", "tiled_l2", "latent_l2")),
        "prompt_inversion.regularizer": (config.prompt_inversion.regularizer, ("r1", "r2", "none")),
        "hard_prompt.run_for": (config.hard_prompt.run_for, ("memorized", "always", "never")),
        "invmm.prompt_init": (config.invmm.prompt_init, ("caption", "zero")),
        "prompt_inversion.init": (config.prompt_inversion.init, ("caption", "random")),
        "verdict.evidence": (config.verdict.evidence, ("count", "all")),
    }
    problems += [
        f"{name}: {value!r} not in {allowed}" for name, (value, allowed) in choices.items() if value not in allowed
    ]
    if config.similarity.kind == "sscd" and not config.similarity.sscd_path:
        problems.append("similarity.sscd_path: required when similarity.kind = 'sscd'")
    for name, scales in (
        ("invmm.guidance_scales", config.invmm.guidance_scales),
        ("start_check.guidance_scales", config.start_check.guidance_scales),
    ):
        if not scales:
            problems.append(f"{name}: needs at least one scale")
        if not all(scale > 0 for scale in scales):
            problems.append(f"{name}: must be > 0, got {list(scales)}")
    if not 0 < config.verdict.confidence < 1:
        problems.append(f"verdict.confidence: must be in (0, 1), got {config.verdict.confidence}")
    if config.invmm.prompt_lr is not None and not config.invmm.prompt_lr > 0:
        problems.append(f"invmm.prompt_lr: must be > 0 (or unset: lr), got {config.invmm.prompt_lr}")
    if not 0 <= config.verdict.uncond_rate_min <= 1:
        problems.append(f"verdict.uncond_rate_min: must be in [0, 1], got {config.verdict.uncond_rate_min}")
    if not 0 < config.verdict.invmm_rate_min <= 1:
        problems.append(f"verdict.invmm_rate_min: must be in (0, 1], got {config.verdict.invmm_rate_min}")
    if not config.verdict.shift_sd_clear <= config.verdict.shift_sd_memorized:
        problems.append("verdict.shift_sd_clear: cannot exceed verdict.shift_sd_memorized")
    if not 0 < config.invmm.prompt_init_weight < 1:
        problems.append(f"invmm.prompt_init_weight: must be in (0, 1), got {config.invmm.prompt_init_weight}")
    if not 0 <= config.similarity.null_gain < 1:
        problems.append(f"similarity.null_gain: must be in [0, 1), got {config.similarity.null_gain}")
    if not 0 <= config.similarity.null_quantile <= 1:
        problems.append(f"similarity.null_quantile: must be in [0, 1], got {config.similarity.null_quantile}")
    if config.similarity.null_samples < 0:
        problems.append(f"similarity.null_samples: must be >= 0, got {config.similarity.null_samples}")
    if "uncond_replication" in config.measures and not config.similarity.null_samples:
        problems.append(
            "measures: 'uncond_replication' counts replicas among the model null's samples (null_samples > 0)"
        )
    if problems:
        raise ConfigError("invalid audit configuration:\n  " + "\n  ".join(problems))


# Far above any useful value (the reference protocol runs 2000 steps, 16 samples a step, 1000 noises,
# 50 timesteps) and low enough that a typo (three zeros too many) stops at start-up instead of running
# out of memory, or for a year.
MAX_ITERATIONS = 1_000_000  # optimisation steps, restarts: sequential work
MAX_BATCH = 4096  # samples evaluated at once: per step, per check, per generation
MAX_NOISES = 100_000  # noise sets drawn for one image
MAX_TIMESTEPS = 1000  # a diffusion schedule has 1000 training timesteps
MAX_PROMPT_TOKENS = 75  # CLIP's 77 slots less the start and end tokens
MAX_PIXELS = 1_000_000_000


def _upper_bounds(config: AuditConfig):
    """(name, (value, bound)) of every setting above its upper bound."""
    bounds = {
        "invmm.steps": (config.invmm.steps, MAX_ITERATIONS),
        "invmm.check_every": (config.invmm.check_every, MAX_ITERATIONS),
        "invmm.loss_window": (config.invmm.loss_window, MAX_ITERATIONS),
        "invmm.stop_after": (config.invmm.stop_after, MAX_ITERATIONS),
        "invmm.gate_steps": (config.invmm.gate_steps, MAX_ITERATIONS),
        "noise_inversion.steps": (config.noise_inversion.steps, MAX_ITERATIONS),
        "noise_inversion.regularized_steps": (config.noise_inversion.regularized_steps, MAX_ITERATIONS),
        "prompt_inversion.steps": (config.prompt_inversion.steps, MAX_ITERATIONS),
        "hard_prompt.steps": (config.hard_prompt.steps, MAX_ITERATIONS),
        "hard_prompt.restarts": (config.hard_prompt.restarts, MAX_ITERATIONS),
        "invmm.samples_per_step": (config.invmm.samples_per_step, MAX_BATCH),
        "invmm.check_noises": (config.invmm.check_noises, MAX_BATCH),
        "noise_inversion.samples_per_step": (config.noise_inversion.samples_per_step, MAX_BATCH),
        "prompt_inversion.samples_per_step": (config.prompt_inversion.samples_per_step, MAX_BATCH),
        "hard_prompt.test_samples": (config.hard_prompt.test_samples, MAX_BATCH),
        "wen.generations": (config.wen.generations, MAX_BATCH),
        "z0_error.noises": (config.z0_error.noises, MAX_NOISES),
        "wasserstein.noises": (config.wasserstein.noises, MAX_NOISES),
        "noise_inversion.ks_samples": (config.noise_inversion.ks_samples, MAX_NOISES),
        "similarity.null_samples": (config.similarity.null_samples, MAX_NOISES),
        "z0_error.timesteps": (config.z0_error.timesteps, MAX_TIMESTEPS),
        "wasserstein.timesteps": (config.wasserstein.timesteps, MAX_TIMESTEPS),
        "invmm.sampling_steps": (config.invmm.sampling_steps, MAX_TIMESTEPS),
        "wen.sampling_steps": (config.wen.sampling_steps, MAX_TIMESTEPS),
        "hard_prompt.tokens": (config.hard_prompt.tokens, MAX_PROMPT_TOKENS),
        "images.max_pixels": (config.images.max_pixels, MAX_PIXELS),
    }
    return [(name, bound) for name, bound in bounds.items() if bound[0] > bound[1]]


def apply_overrides(config: AuditConfig, overrides, **changes) -> AuditConfig:
    """`config` with SECTION.KEY=VALUE overrides (values in TOML syntax; a bare word is a string), then
    nested `changes` as in AuditConfig.replace, validated once at the end."""
    data = config.to_dict()
    for text in overrides:
        key, sep, value = text.partition("=")
        if not sep:
            raise ConfigError(f"override {text!r}: expected SECTION.KEY=VALUE, e.g. invmm.steps=500")
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value  # a bare word such as tiled_l2
        *sections, name = key.split(".")
        target = data
        for part in sections:
            target = target.setdefault(part, {})
        target[name] = parsed
    for key, value in changes.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(data)


def from_dict(data: dict) -> AuditConfig:
    """Build and validate an AuditConfig from nested plain data."""
    return _build(AuditConfig, data, "")


def load_config(path: str | Path) -> AuditConfig:
    """Load a .toml, .yaml/.yml or .json configuration file; unspecified settings keep their defaults."""
    import yaml

    path = Path(path)
    if path.suffix not in (".toml", ".yaml", ".yml", ".json"):
        raise ConfigError(f"{path}: unknown configuration format (use .toml, .yaml or .json)")
    try:
        text = path.read_text()
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = yaml.safe_load(text) or {}
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as error:  # TOML and JSON errors are ValueErrors
        reason = " ".join(str(error).split())
        raise ConfigError(f"{path}: not a readable configuration file: {reason}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table of settings at the top, got {type(data).__name__}")
    preset = data.pop("preset", None)
    if preset is not None and preset not in PRESETS:
        raise ConfigError(f"{path}: unknown preset {preset!r}; known: {list(PRESETS)}")
    base = preset_config(preset).to_dict() if preset else {}
    for key, value in data.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return from_dict(base)


# Named configurations, one TOML file each (memray/presets/NAME.toml); a file may start from another
# preset (`preset = "quick"`) and set only what differs. `memray config --preset NAME` prints one.
PRESET_FOLDER = Path(__file__).parent / "presets"
PRESETS = tuple(sorted(path.stem for path in PRESET_FOLDER.glob("*.toml")))


def preset_config(name: str) -> AuditConfig:
    """The configuration a preset names."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known: {list(PRESETS)}")
    return load_config(PRESET_FOLDER / f"{name}.toml")
