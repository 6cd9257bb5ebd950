"""How each measure runs on a batch of images and fills its columns (the registry, registry.py, names them).

Adding a measure is one module under memray/measures/, one entry in registry.py and one function
here. A function takes the Batch of images still being measured and the indices of those to
measure, and returns Filled: its columns' values per image, the arrays kept beside the row for
`memray inspect` and the report, what a later measure needs from it, and which images stayed
finite. The runner (runner.py) runs the configured measures in registry order, writes the columns
into the rows, and turns every non-finite image into an error row of its own while the rest of
the batch goes on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from memray.auditing.registry import REGISTRY
from memray.catalog.schema import COLUMNS
from memray.measures import rng
from memray.measures.invmm import invmm
from memray.measures.noise_inversion import invert_noise
from memray.measures.prompt_inversion import hard_prompt_inversion, prompt_condition, soft_prompt_inversion
from memray.measures.start_check import start_check
from memray.measures.wasserstein import memorization_wasserstein
from memray.measures.wen import wen_screen
from memray.measures.z0_error import z0_prediction_error

# The catalog keeps these quantiles (0%, 1%, ..., 100%) of the M4 error samples, not the samples.
ERROR_QUANTILE_LEVELS = np.linspace(0, 1, 101)


@dataclass
class Batch:
    """The decoded images of one batch and what every measure may use; measures get indices into it."""

    model: object  # a DiffusionAdapter
    config: object  # the AuditConfig
    ids: list[str]
    captions: list[str | None]
    z0: torch.Tensor  # (B, ...) every image of the batch
    owner: torch.Tensor  # (B,) the slot each UNet evaluation is charged to
    rows: list  # the AuditRows, for measures whose work depends on earlier results (the hard prompt)
    progress: Callable | None = None
    slots: int | None = None  # images optimised at once by an iterative measure (None: the whole batch)
    similarity: object = None  # the replication bar (set by the runner when a measure needs it)
    targets: object = None
    handovers: dict = field(default_factory=dict)  # measure name -> {slot: what it hands to later measures}

    def gens(self, stream: str, images: list[int]) -> list[torch.Generator]:
        """One generator per image of `images` for the named random stream (rng.image_generators)."""
        return rng.image_generators([self.ids[s] for s in images], self.config.seed, stream, self.model.device)

    def index(self, images: list[int]) -> torch.Tensor:
        """`images` as an index tensor on the model's device."""
        return torch.tensor(images, device=self.model.device)

    def caption_start(self, images: list[int], init: str) -> torch.Tensor | None:
        """Free-slot token ids of each image's caption (-1 rows without one) where a prompt starts at it."""
        if not self.model.is_conditional or init != "caption":
            return None
        captions = [self.captions[s] or "" for s in images]
        ids = self.model.caption_slot_ids(captions)
        ids[torch.tensor([not c.strip() for c in captions], device=ids.device)] = -1
        return ids

    def caption_context(self, images: list[int]) -> torch.Tensor | None:
        """Each image's caption context (the model's caption_context; "" without a caption), None where unused."""
        if not self.model.is_conditional:
            return None
        return self.model.caption_context([self.captions[s] or "" for s in images])


@dataclass
class Filled:
    """What a measure produced for the images at `images` (indices into the batch): column -> value per image, and more."""

    images: list[int]
    columns: dict[str, list]
    finite: list[bool] | None = None  # None: every image finite
    arrays: dict[str, list] = field(default_factory=dict)  # ImageAudit attribute -> value per image
    handover: object = None


def value(x) -> float | None:
    """A finite float, or None (a catalog NULL) for NaN and infinities."""
    x = float(x)
    return x if math.isfinite(x) else None


def _uncond_replication(batch: Batch, images: list[int]) -> Filled:
    return Filled(images, {"uncond_replication_rate": [float(batch.targets.bank_replicas[s]) for s in images]})


def _invmm(batch: Batch, images: list[int]) -> Filled:
    idx = batch.index(images)
    result = invmm(
        batch.model,
        batch.z0[idx],
        batch.gens("invmm", images),
        batch.owner[idx],
        batch.config.invmm,
        batch.similarity,
        batch.targets[idx],
        start_ids=batch.caption_start(images, batch.config.invmm.prompt_init),
        context=batch.caption_context(images),
        slots=batch.slots,
        counting=batch.config.verdict.evidence == "count",
        stop_rate=batch.config.verdict.invmm_rate_min,
        progress=batch.progress,
    )
    replicated = [bool(r) for r in result.replicated]
    readable = [
        bool(p) if r and batch.model.is_conditional else None for r, p in zip(replicated, result.prompt_replicated)
    ]
    columns = {
        "invmm_replicated": replicated,
        "invmm_kl": [value(kl) if r else None for r, kl in zip(replicated, result.kl)],
        "invmm_kl_nats": [value(kl) if r else None for r, kl in zip(replicated, result.kl_nats)],
        "invmm_steps": [int(s) for s in result.steps],
        "invmm_similarity": [value(s) for s in result.similarity],
        "invmm_guidance": [value(g) for g in result.guidance],
        "invmm_prompt": list(result.prompts),
        "invmm_prompt_init": list(result.prompt_init),
        "invmm_prompt_replicated": readable,
        "invmm_stop_reason": list(result.stop_reason),
        "invmm_replicas": [int(k) if r else None for r, k in zip(replicated, result.replicas)],
        "invmm_samples": [int(n) if r else None for r, n in zip(replicated, result.samples)],
    }
    arrays = {"invmm_mu": list(result.mu), "invmm_log_var": list(result.log_var), "invmm_trace": result.trace}
    if result.condition is not None:
        arrays["invmm_condition"] = list(result.condition)
    return Filled(images, columns, list(result.finite), arrays)


def _start_check(batch: Batch, images: list[int]) -> Filled:
    """The screen, captioned images under their caption and guidance, the others under the empty prompt."""
    model, config = batch.model, batch.config.start_check
    captioned = [s for s in images if model.is_conditional and batch.captions[s]]
    groups = [(captioned, True), ([s for s in images if s not in set(captioned)], False)]
    columns: dict[str, dict] = {name: {} for name in ("similarity", "progress", "replicas", "guidance")}
    for group, guided in groups:
        if not group:
            continue
        idx = batch.index(group)
        cond = None
        if model.is_conditional:
            with torch.no_grad():
                texts = [batch.captions[s] or "" for s in group]
                context = batch.caption_context(group)
                cond = (
                    model.encode_ids(model.token_ids(texts), context) if guided else model.empty_condition(len(group))
                )
        result = start_check(
            model,
            batch.z0[idx],
            cond,
            batch.gens("start_check", group),
            batch.owner[idx],
            config,
            batch.similarity,
            batch.targets[idx],
            guided=guided,
        )
        for name in columns:
            columns[name].update(zip(group, getattr(result, name).tolist()))
    progress = [value(columns["progress"][s]) for s in images]
    unprompted = [batch.rows[s].uncond_replication_rate or 0.0 for s in images]
    return Filled(
        images,
        {
            "screen_similarity": [value(columns["similarity"][s]) for s in images],
            "screen_progress": progress,
            "screen_replicas": [int(columns["replicas"][s]) for s in images],
            "screen_samples": [config.noises] * len(images),
            "screen_guidance": [value(columns["guidance"][s]) for s in images],
            # a sample of the empty prompt's that replicated it flags it too (the premise check)
            "screen_flagged": [
                (p is not None and p >= config.flag_progress) or rate > 0 for p, rate in zip(progress, unprompted)
            ],
        },
        finite=[math.isfinite(columns["similarity"][s]) for s in images],
    )


def _z0_error(batch: Batch, images: list[int]) -> Filled:
    idx, cfg, model = batch.index(images), batch.config.z0_error, batch.model
    n = cfg.noises
    eps = rng.randn_per_image(batch.gens("z0_error", images), (n, *batch.z0.shape[1:])).flatten(0, 1)
    with torch.no_grad():
        err = z0_prediction_error(
            model,
            batch.z0[idx].repeat_interleave(n, 0),
            eps,
            model.empty_condition(len(images) * n),
            model.measure_timesteps(cfg.timesteps),
            batch.owner[idx].repeat_interleave(n),
        )
    err = err.reshape(len(images), n).mean(1).cpu().numpy()
    return Filled(images, {"z0_error": [value(e) for e in err]}, list(np.isfinite(err)))


def _noise_inversion(batch: Batch, images: list[int]) -> Filled:
    idx, cfg, model = batch.index(images), batch.config.noise_inversion, batch.model
    cond = model.empty_condition(len(images))
    z0, owner = batch.z0[idx], batch.owner[idx]
    finite = np.ones(len(images), dtype=bool)
    columns = {}
    if cfg.unregularized:
        plain = invert_noise(
            model, z0, cond, batch.gens("noise_plain", images), owner, cfg, regularized=False, progress=batch.progress
        )
        finite &= plain.finite
        columns["noise_ks_p_unregularized"] = [value(p) for p in plain.ks_p]
        columns["noise_error_unregularized"] = [value(e) for e in plain.final_error]
    if cfg.regularized:
        reg = invert_noise(
            model, z0, cond, batch.gens("noise_reg", images), owner, cfg, regularized=True, progress=batch.progress
        )
        finite &= reg.finite
        columns["noise_ks_p"] = [value(p) for p in reg.ks_p]
        columns["noise_kl"] = [value(k) for k in reg.kl]
        columns["noise_mu_mean"] = [value(m) for m in reg.mu_mean]
        columns["noise_sigma2_mean"] = [value(s) for s in reg.sigma2_mean]
        columns["noise_error"] = [value(e) for e in reg.final_error]
    return Filled(images, columns, list(finite))


def _prompt_inversion(batch: Batch, images: list[int]) -> Filled:
    idx = batch.index(images)
    result = soft_prompt_inversion(
        batch.model,
        batch.z0[idx],
        batch.gens("soft_prompt", images),
        batch.owner[idx],
        batch.config.prompt_inversion,
        init_ids=batch.caption_start(images, batch.config.prompt_inversion.init),
        context=batch.caption_context(images),
        progress=batch.progress,
    )
    columns = {
        "soft_prompt_error": [value(e) for e in result.final_error],
        "soft_prompt_norm": [value(n) for n in result.norm],
    }
    return Filled(images, columns, list(result.finite), handover=dict(zip(images, result.embeddings)))


def _quantiles(samples: np.ndarray) -> list[float]:
    return np.quantile(samples, ERROR_QUANTILE_LEVELS).tolist()


def _wasserstein(batch: Batch, images: list[int]) -> Filled:
    idx, soft = batch.index(images), batch.handovers["prompt_inversion"]
    with torch.no_grad():
        cond = prompt_condition(batch.model, torch.stack([soft[s] for s in images]), batch.caption_context(images))
    result = memorization_wasserstein(
        batch.model, batch.z0[idx], cond, batch.gens("wasserstein", images), batch.owner[idx], batch.config.wasserstein
    )
    columns = {
        "wasserstein": [value(w) for w in result.w1],
        "wasserstein_shift_sd": [value(s) for s in result.shift_sd],
        "err_shift_relative": [value(s) for s in result.shift_relative],
        "err_uncond_mean": [value(m) for m in result.err_uncond_mean],
        "err_cond_mean": [value(m) for m in result.err_cond_mean],
        "err_uncond_quantiles": [_quantiles(e) for e in result.err_uncond],
        "err_cond_quantiles": [_quantiles(e) for e in result.err_cond],
    }
    arrays = {"err_uncond": list(result.err_uncond), "err_cond": list(result.err_cond)}
    return Filled(images, columns, list(np.isfinite(result.w1)), arrays)


def _wen(batch: Batch, images: list[int]) -> Filled:
    images = [s for s in images if batch.captions[s]]  # a screen of the caption: none, nothing to screen
    if not images:
        return Filled(images, {})
    result = wen_screen(
        batch.model,
        [batch.captions[s] for s in images],
        batch.gens("wen", images),
        batch.owner[batch.index(images)],
        batch.config.wen,
    )
    columns = {
        "wen_score": [value(s) for s in result.score],
        "wen_tokens": [json.dumps(tokens) for tokens in result.attribution],
        "one_step_confidence": [value(c) for c in result.one_step_confidence],
    }
    return Filled(images, columns)


def _hard_prompt(batch: Batch, images: list[int]) -> Filled:
    """Algorithm 1 where a readable prompt is still wanted: memorized, and InvMM's own prompt did not replicate."""
    config = batch.config
    run_for, minimum = config.hard_prompt.run_for, config.verdict.uncond_rate_min

    def wanted(row) -> bool:
        rate = row.uncond_replication_rate or 0.0
        unprompted = rate > 0 and rate >= minimum  # the empty prompt replicates it: no prompt to find
        return row.verdict == "memorized" and not row.invmm_prompt_replicated and not unprompted

    images = [s for s in images if run_for == "always" or (run_for == "memorized" and wanted(batch.rows[s]))]
    if not images:
        return Filled(images, {})
    idx = batch.index(images)
    result = hard_prompt_inversion(
        batch.model,
        batch.z0[idx],
        batch.gens("hard_prompt", images),
        batch.owner[idx],
        config.hard_prompt,
        config.prompt_inversion,
        batch.similarity,
        batch.targets[idx],
        guidance_scales=config.invmm.guidance_scales,
        sampling_steps=config.invmm.sampling_steps,
        context=batch.caption_context(images),
    )
    columns = {
        "hard_prompt": list(result.prompts),
        "hard_prompt_error": [value(e) for e in result.error],
        "hard_prompt_replicated": [bool(r) for r in result.replicated],
    }
    return Filled(images, columns)


# How each measure of the registry (registry.py) runs on a batch, by name.
RUNS: dict[str, Callable[[Batch, list[int]], Filled]] = {
    "uncond_replication": _uncond_replication,
    "invmm": _invmm,
    "start_check": _start_check,
    "z0_error": _z0_error,
    "noise_inversion": _noise_inversion,
    "prompt_inversion": _prompt_inversion,
    "wasserstein": _wasserstein,
    "wen": _wen,
    "hard_prompt": _hard_prompt,
}

# A measure without a run, or a declared column the catalog lacks, must stop the import, not vanish at write time.
if set(RUNS) != set(REGISTRY):
    raise ImportError(f"measures without a run, or runs without a measure: {sorted(set(RUNS) ^ set(REGISTRY))}")
_UNKNOWN = sorted(c for m in REGISTRY.values() for c in m.columns if c not in COLUMNS)
if _UNKNOWN:
    raise ImportError(f"measures declare columns the catalog schema lacks: {_UNKNOWN}")
