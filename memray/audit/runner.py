"""One batch of images -> one catalog row each, running the configured measures in shared UNet calls.

No Ray here: the distributed layer calls `audit_batch` from its actors, the CLI calls it directly.
A fault that belongs to one image (unreadable bytes, NaN in its optimisation) becomes that
image's error row; the other images in the batch finish.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from memray.audit.verdict import decide
from memray.catalog.schema import AuditRow
from memray.config import AuditConfig, ConfigError
from memray.data.images import (
    ImageDecodeError,
    decode_image,
    image_row_png,
    read_bytes,
    sha256_hex,
    strip_height,
    to_model_tensor,
)
from memray.data.sources import stable_path_id
from memray.measures import rng
from memray.measures.invmm import invmm
from memray.measures.noise_inversion import invert_noise
from memray.measures.prompt_inversion import hard_prompt_inversion, prompt_condition, soft_prompt_inversion
from memray.measures.sampling import aligned_start, ddim_generate
from memray.measures.similarity import build_similarity, null_bank, replication_targets
from memray.measures.wasserstein import memorization_wasserstein
from memray.measures.wen import wen_screen
from memray.measures.z0_error import z0_prediction_error

log = logging.getLogger(__name__)

CONDITIONAL_MEASURES = ("prompt_inversion", "wasserstein", "wen", "hard_prompt")
# Measures that compare generations with the target, and so need its replication bar.
REPLICATION_MEASURES = ("invmm", "uncond_replication", "hard_prompt")
# The catalog keeps these quantiles (0%, 1%, ..., 100%) of the M4 error samples, not the samples.
ERROR_QUANTILE_LEVELS = np.linspace(0, 1, 101)


@dataclass
class ImageInput:
    """One image to audit: its bytes (or where to read them) and what we know about it."""

    image_id: str
    data: bytes | None = None
    uri: str | None = None
    caption: str | None = None
    source: str | None = None
    error: str | None = None  # a fault found while reading (e.g. a truncated shard): recorded as is


@dataclass
class ImageAudit:
    """A catalog row plus the arrays behind it (for `memray inspect` and reports)."""

    row: AuditRow
    err_uncond: np.ndarray | None = None
    err_cond: np.ndarray | None = None
    invmm_mu: torch.Tensor | None = None
    invmm_log_var: torch.Tensor | None = None
    invmm_condition: torch.Tensor | None = None  # (L, D) the expected token mix InvMM's check used
    z0: torch.Tensor | None = None


def supported_measures(config: AuditConfig, model) -> tuple[str, ...]:
    """The configured measures that this model family can run (unconditional models: no prompts)."""
    if model.is_conditional:
        return config.measures
    return tuple(m for m in config.measures if m not in CONDITIONAL_MEASURES)


def check_compatible(config: AuditConfig, model) -> None:
    """Refuse at start-up a configuration that asks prompt measures of an unconditional model."""
    unsupported = sorted(set(config.measures) - set(supported_measures(config, model)))
    if unsupported:
        keep = list(supported_measures(config, model))
        raise ConfigError(
            f"the {model.family} model is unconditional: it has no text prompt, so {unsupported} cannot run; "
            f"configure measures = {keep}"
        )


def _image_input(item) -> ImageInput:
    if isinstance(item, ImageInput):
        return item
    path = str(item)
    return ImageInput(image_id=stable_path_id(path, None), uri=path, source=path)


def audit_batch(
    loaded, items, config: AuditConfig, *, run_id: str | None = None, progress=None, replicas: int = 4
) -> list[ImageAudit]:
    """Audit a batch of images (paths, URLs or ImageInput) against a loaded model.

    Every image InvMM replicated also gets `replicas` samples from its inverted distribution,
    drawn next to its target in `replicas_png` (0: none); their UNet work joins the row's cost.
    """
    model = loaded.adapter
    check_compatible(config, model)
    run_id = run_id or uuid.uuid4().hex[:12]
    started = time.perf_counter()
    inputs = [_image_input(item) for item in items]
    audits = [ImageAudit(row=_identity_row(inp, loaded, config, run_id)) for inp in inputs]
    pixels, slots = [], []
    for i, inp in enumerate(inputs):
        try:
            if inp.error:
                raise ImageDecodeError(inp.error)
            if inp.data is None and not inp.uri:
                raise ImageDecodeError("no image: the input has neither bytes nor a uri")
            data = inp.data if inp.data is not None else read_bytes(inp.uri)
            audits[i].row.image_sha256 = sha256_hex(data)
            image = decode_image(data, max_pixels=config.images.max_pixels)
            audits[i].row.width, audits[i].row.height = image.size
            pixels.append(to_model_tensor(image, model.resolution, allow_upscale=config.images.allow_upscale))
            slots.append(i)
        except ImageDecodeError as exc:
            _fail(audits[i].row, str(exc))
    model_seconds = 0.0  # the model null, the first time this model and config are audited: no image's time
    if slots:
        chain = _MeasureChain(model, config, [inputs[i] for i in slots], [audits[i] for i in slots], progress)
        model.counter.reset(len(slots))
        try:
            bank_started = time.perf_counter()
            bank = model_null_bank(loaded, config)
            model_seconds = time.perf_counter() - bank_started
            chain.run(torch.stack(pixels).to(model.device), bank)
        except Exception as exc:  # a fault of the batch (out of memory, a bug): record it, keep the job alive
            log.exception("audit of batch %s failed", [inputs[i].image_id for i in slots])
            chain.fail(list(chain.alive), f"batch failed: {type(exc).__name__}: {exc}")
    _finish_costs([a.row for a in audits], model, time.perf_counter() - started - model_seconds, slots)
    if replicas:  # after the costs are read: replica_samples resets the evaluation counter
        for a in audits:
            if a.row.status == "ok" and a.row.invmm_replicated:
                _render_replicas(loaded, a, config, replicas)
    return audits


def audit(images, model, config: AuditConfig | None = None, *, batch_size: int = 8, progress=None) -> list[AuditRow]:
    """Audit images (paths, URLs or ImageInput) against a model (a loaded model or a checkpoint ref)."""
    from memray.models import load_model

    loaded = load_model(model) if isinstance(model, str) else model
    config = config or AuditConfig()
    items = list(images)
    run_id = uuid.uuid4().hex[:12]
    rows = []
    for start in range(0, len(items), batch_size):
        batch = audit_batch(loaded, items[start : start + batch_size], config, run_id=run_id, progress=progress)
        rows += [a.row for a in batch]
    return rows


def model_null_bank(loaded, config: AuditConfig) -> torch.Tensor | None:
    """The model null of this configuration (similarity.null_bank), generated once per loaded model.

    Its UNet evaluations belong to the model, not to any image: they are counted in
    `loaded.null_bank_costs` and in no row.
    """
    if (
        not set(REPLICATION_MEASURES) & set(supported_measures(config, loaded.adapter))
        or not config.similarity.null_samples
    ):
        return None
    sim = config.similarity
    key = (sim.kind, sim.sscd_path, sim.null_samples, config.invmm.sampling_steps, config.seed, config.precision)
    if key not in loaded.null_banks:
        model = loaded.adapter
        (generator,) = rng.image_generators(["model-null-bank"], config.seed, "null_bank", model.device)
        with model.counter.scope(1) as tally:
            loaded.null_banks[key] = null_bank(
                model, config_similarity(config), sim.null_samples, config.invmm.sampling_steps, generator
            )
        loaded.null_bank_costs[key] = int(tally.forwards.sum())
    return loaded.null_banks[key]


def config_similarity(config: AuditConfig):
    """The similarity the configuration names, with its threshold."""
    sim = config.similarity
    return build_similarity(sim.kind, threshold=sim.threshold, sscd_path=sim.sscd_path)


def config_targets(model, config: AuditConfig, z0: torch.Tensor, bank: torch.Tensor | None):
    """(similarity, Targets) of B images under the configuration's replication bar (similarity.py)."""
    sim = config.similarity
    similarity = config_similarity(config)
    gain = sim.null_gain if sim.nulls else None
    return similarity, replication_targets(model, similarity, z0, bank, sim.null_quantile, gain)


@torch.no_grad()
def replica_samples(loaded, image_audit: ImageAudit, config: AuditConfig, count: int = 4) -> torch.Tensor:
    """Generate `count` samples from the image's InvMM noise distribution and prompt: pixels (count, 3, R, R)."""
    model = loaded.adapter
    if image_audit.invmm_mu is None:
        raise ValueError(f"{image_audit.row.image_id}: InvMM did not run, so there is no distribution to sample")
    gen = rng.image_generators([image_audit.row.image_id], config.seed, "replicas", model.device)
    mu = image_audit.invmm_mu.to(model.device)
    sigma = (0.5 * image_audit.invmm_log_var.to(model.device)).exp()
    noises = mu + sigma * rng.randn_per_image(gen, (count, *mu.shape))[0]
    z0 = image_audit.z0.to(model.device).expand(count, *mu.shape)
    cond = None
    if model.is_conditional:
        cond = image_audit.invmm_condition.to(model.device).expand(count, -1, -1)
    guidance = torch.full((count,), image_audit.row.invmm_guidance or 1.0, device=model.device)
    steps = config.invmm.sampling_steps
    z_T = aligned_start(model, z0, noises, steps) if config.invmm.aligned_start else noises
    owner = torch.zeros(count, dtype=torch.long, device=model.device)
    model.counter.reset(1)
    return model.decode_latents(ddim_generate(model, z_T, cond, guidance, owner, steps))


def _render_replicas(loaded, image_audit: ImageAudit, config: AuditConfig, count: int) -> None:
    """The target and `count` replicas as the row's PNG strip; a failure leaves it NULL, not the row lost."""
    model, row = loaded.adapter, image_audit.row
    started = time.perf_counter()
    model.counter.reset(1)
    try:
        samples = replica_samples(loaded, image_audit, config, count)
        with torch.no_grad():
            target = model.decode_latents(image_audit.z0.unsqueeze(0).to(model.device))[0]
        row.replicas_png = image_row_png([target, *samples], height=strip_height(target.shape[-2]))
    except Exception:
        log.exception("could not render the replicas of %s; its row keeps no replicas_png", row.image_id)
    finally:  # work done before a failure still counts
        row.unet_forwards += int(model.counter.forwards.sum())
        row.unet_backwards += int(model.counter.backwards.sum())
        row.seconds += time.perf_counter() - started


def _quantiles(samples: np.ndarray) -> list[float]:
    return np.quantile(samples, ERROR_QUANTILE_LEVELS).tolist()


def _identity_row(inp: ImageInput, loaded, config: AuditConfig, run_id: str) -> AuditRow:
    return AuditRow(
        image_id=inp.image_id,
        source=inp.source or inp.uri,
        caption=inp.caption,
        model=loaded.slug,
        model_ref=loaded.ref,
        model_fingerprint=loaded.fingerprint,
        config_hash=config.hash(),
        config=config.to_json(),
        run_id=run_id,
        audited_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        device=str(loaded.adapter.device),
        similarity_kind=config.similarity.kind,
    )


def _fail(row: AuditRow, message: str) -> None:
    row.status, row.error = "error", message


def _finish_costs(rows, model, seconds: float, slots) -> None:
    """Evaluation counts per image; wall time split in proportion to each image's evaluations."""
    counter = model.counter
    total = int(counter.forwards.sum() + counter.backwards.sum()) if slots else 0
    for k, i in enumerate(slots):
        rows[i].unet_forwards = int(counter.forwards[k])
        rows[i].unet_backwards = int(counter.backwards[k])
        share = (counter.forwards[k] + counter.backwards[k]) / total if total else 1 / len(slots)
        rows[i].seconds = float(seconds * share)
    for row in rows:
        if row.seconds is None:
            row.unet_forwards, row.unet_backwards, row.seconds = 0, 0, 0.0


def _value(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


class _MeasureChain:
    """Runs the configured measures on the decoded images of one batch, image errors isolated."""

    def __init__(self, model, config: AuditConfig, inputs, audits, progress):
        self.model, self.config, self.inputs, self.audits, self.progress = model, config, inputs, audits, progress
        self.measures = supported_measures(config, model)
        self.alive = list(range(len(inputs)))
        self.ids = [inp.image_id for inp in inputs]

    def gens(self, stream: str, slots):
        return rng.image_generators([self.ids[s] for s in slots], self.config.seed, stream, self.model.device)

    def fail(self, slots, message: str) -> None:
        for s in slots:
            _fail(self.audits[s].row, message)
        self.alive = [s for s in self.alive if s not in set(slots)]

    def drop_nonfinite(self, slots, finite, measure: str) -> None:
        bad = [s for s, ok in zip(slots, finite) if not ok]
        if bad:
            self.fail(bad, f"non-finite values during {measure}; the optimisation diverged for this image")

    def run(self, pixels: torch.Tensor, bank: torch.Tensor | None) -> None:
        """All the configured measures on the batch's pixels; `bank` is the model null (model_null_bank)."""
        model = self.model
        self.bank = bank
        z0 = model.encode_images(pixels)
        finite = z0.flatten(1).isfinite().all(1).tolist()
        self.drop_nonfinite(list(range(len(finite))), finite, "encoding")
        for s in self.alive:
            self.audits[s].z0 = z0[s].detach().cpu()
        self.z0 = z0
        self.owner = torch.arange(len(self.inputs), device=model.device)
        # The hard prompt runs last: whether it runs at all depends on the verdict.
        measures = self.measures
        if set(REPLICATION_MEASURES) & set(measures) and self.alive:
            self.set_replication_targets()
        if "uncond_replication" in measures and self.alive:
            self.run_uncond_replication()
        if "invmm" in measures and self.alive:
            self.run_invmm()
        if "z0_error" in measures and self.alive:
            self.run_z0_error()
        if "noise_inversion" in measures and self.alive:
            self.run_noise_inversion()
        if "prompt_inversion" in measures and self.alive:
            soft = self.run_prompt_inversion()
            if "wasserstein" in measures and self.alive:
                self.run_wasserstein(soft)
        if "wen" in measures and self.alive:
            self.run_wen()
        for s in self.alive:
            row = self.audits[s].row
            row.verdict, row.verdict_rule = decide(row, self.config.verdict)
        if "hard_prompt" in self.measures:
            self.run_hard_prompt()

    def select(self):
        slots = list(self.alive)
        index = torch.tensor(slots, device=self.model.device)
        return slots, index

    def set_replication_targets(self):
        """Every image's features and replication bar (its nulls), for the measures that generate."""
        self.similarity, self.targets = config_targets(self.model, self.config, self.z0, self.bank)
        for s in self.alive:
            row = self.audits[s].row
            row.replication_threshold = _value(self.targets.threshold[s])
            row.null_content_similarity = _value(self.targets.content_null[s])
            row.null_model_similarity = _value(self.targets.model_null[s])
        finite = self.targets.features.flatten(1).isfinite().all(1) & self.targets.content_null.isfinite()
        self.drop_nonfinite(list(self.alive), finite[self.alive].tolist(), "the replication bar")

    def run_uncond_replication(self):
        for s in self.alive:
            self.audits[s].row.uncond_replication_rate = float(self.targets.bank_replicas[s])

    def caption_start(self, slots, init: str) -> torch.Tensor | None:
        """Free-slot token ids of each image's caption (-1 rows without one) where a prompt starts at it."""
        model = self.model
        if not model.is_conditional or init != "caption":
            return None
        captions = [self.inputs[s].caption or "" for s in slots]
        ids = model.caption_slot_ids(captions)
        ids[torch.tensor([not c.strip() for c in captions], device=ids.device)] = -1
        return ids

    def run_invmm(self):
        slots, idx = self.select()
        result = invmm(
            self.model,
            self.z0[idx],
            self.gens("invmm", slots),
            self.owner[idx],
            self.config.invmm,
            self.similarity,
            self.targets[idx],
            start_ids=self.caption_start(slots, self.config.invmm.prompt_init),
            progress=self.progress,
        )
        for k, s in enumerate(slots):
            row = self.audits[s].row
            row.invmm_replicated = bool(result.replicated[k])
            row.invmm_kl = _value(result.kl[k]) if result.replicated[k] else None
            row.invmm_kl_nats = _value(result.kl_nats[k]) if result.replicated[k] else None
            row.invmm_steps = int(result.steps[k])
            row.invmm_similarity = _value(result.similarity[k])
            row.invmm_guidance = _value(result.guidance[k])
            row.invmm_prompt = result.prompts[k]
            row.invmm_prompt_init = result.prompt_init[k]
            if result.replicated[k] and self.model.is_conditional:
                row.invmm_prompt_replicated = bool(result.prompt_replicated[k])
            self.audits[s].invmm_mu, self.audits[s].invmm_log_var = result.mu[k], result.log_var[k]
            if result.condition is not None:
                self.audits[s].invmm_condition = result.condition[k]
        self.drop_nonfinite(slots, result.finite, "InvMM")

    def run_z0_error(self):
        slots, idx = self.select()
        cfg = self.config.z0_error
        gens = self.gens("z0_error", slots)
        n = cfg.noises
        eps = rng.randn_per_image(gens, (n, *self.z0.shape[1:])).flatten(0, 1)
        cond = self.model.empty_condition(len(slots) * n)
        with torch.no_grad():
            err = z0_prediction_error(
                self.model,
                self.z0[idx].repeat_interleave(n, 0),
                eps,
                cond,
                self.model.measure_timesteps(cfg.timesteps),
                self.owner[idx].repeat_interleave(n),
            )
        err = err.reshape(len(slots), n).mean(1).cpu().numpy()
        for k, s in enumerate(slots):
            self.audits[s].row.z0_error = _value(err[k])
        self.drop_nonfinite(slots, np.isfinite(err), "the z0-prediction error")

    def run_noise_inversion(self):
        slots, idx = self.select()
        cfg = self.config.noise_inversion
        cond = self.model.empty_condition(len(slots))
        z0, owner = self.z0[idx], self.owner[idx]
        finite = np.ones(len(slots), dtype=bool)
        if cfg.unregularized:
            plain = invert_noise(
                self.model,
                z0,
                cond,
                self.gens("noise_plain", slots),
                owner,
                cfg,
                regularized=False,
                progress=self.progress,
            )
            finite &= plain.finite
            for k, s in enumerate(slots):
                self.audits[s].row.noise_ks_p_unregularized = _value(plain.ks_p[k])
                self.audits[s].row.noise_error_unregularized = _value(plain.final_error[k])
        if cfg.regularized:
            reg = invert_noise(
                self.model,
                z0,
                cond,
                self.gens("noise_reg", slots),
                owner,
                cfg,
                regularized=True,
                progress=self.progress,
            )
            finite &= reg.finite
            for k, s in enumerate(slots):
                row = self.audits[s].row
                row.noise_ks_p, row.noise_kl = _value(reg.ks_p[k]), _value(reg.kl[k])
                row.noise_mu_mean, row.noise_sigma2_mean = _value(reg.mu_mean[k]), _value(reg.sigma2_mean[k])
                row.noise_error = _value(reg.final_error[k])
        self.drop_nonfinite(slots, finite, "noise inversion")

    def run_prompt_inversion(self):
        slots, idx = self.select()
        result = soft_prompt_inversion(
            self.model,
            self.z0[idx],
            self.gens("soft_prompt", slots),
            self.owner[idx],
            self.config.prompt_inversion,
            init_ids=self.caption_start(slots, self.config.prompt_inversion.init),
            progress=self.progress,
        )
        for k, s in enumerate(slots):
            row = self.audits[s].row
            row.soft_prompt_error, row.soft_prompt_norm = _value(result.final_error[k]), _value(result.norm[k])
        self.drop_nonfinite(slots, result.finite, "soft prompt inversion")
        return dict(zip(slots, result.embeddings))

    def run_wasserstein(self, soft):
        slots, idx = self.select()
        with torch.no_grad():
            cond = prompt_condition(self.model, torch.stack([soft[s] for s in slots]))
        result = memorization_wasserstein(
            self.model, self.z0[idx], cond, self.gens("wasserstein", slots), self.owner[idx], self.config.wasserstein
        )
        for k, s in enumerate(slots):
            row = self.audits[s].row
            row.wasserstein, row.wasserstein_shift_sd = _value(result.w1[k]), _value(result.shift_sd[k])
            row.err_shift_relative = _value(result.shift_relative[k])
            row.err_uncond_mean, row.err_cond_mean = _value(result.err_uncond_mean[k]), _value(result.err_cond_mean[k])
            self.audits[s].err_uncond, self.audits[s].err_cond = result.err_uncond[k], result.err_cond[k]
            row.err_uncond_quantiles = _quantiles(result.err_uncond[k])
            row.err_cond_quantiles = _quantiles(result.err_cond[k])
        self.drop_nonfinite(slots, np.isfinite(result.w1), "the Wasserstein measure")

    def run_wen(self):
        slots = [s for s in self.alive if self.inputs[s].caption]
        if not slots:
            return
        idx = torch.tensor(slots, device=self.model.device)
        result = wen_screen(
            self.model,
            [self.inputs[s].caption for s in slots],
            self.gens("wen", slots),
            self.owner[idx],
            self.config.wen,
        )
        for k, s in enumerate(slots):
            self.audits[s].row.wen_score = _value(result.score[k])
            self.audits[s].row.wen_tokens = json.dumps(result.attribution[k])

    def run_hard_prompt(self):
        """Algorithm 1 where a readable prompt is still wanted: memorized, and InvMM's own prompt did not replicate."""
        run_for, minimum = self.config.hard_prompt.run_for, self.config.verdict.uncond_rate_min

        def wanted(row) -> bool:
            rate = row.uncond_replication_rate or 0.0
            unprompted = rate > 0 and rate >= minimum  # the empty prompt replicates it: no prompt to find
            return row.verdict == "memorized" and not row.invmm_prompt_replicated and not unprompted

        slots = [
            s for s in self.alive if run_for == "always" or (run_for == "memorized" and wanted(self.audits[s].row))
        ]
        if not slots:
            return
        idx = torch.tensor(slots, device=self.model.device)
        result = hard_prompt_inversion(
            self.model,
            self.z0[idx],
            self.gens("hard_prompt", slots),
            self.owner[idx],
            self.config.hard_prompt,
            self.config.prompt_inversion,
            self.similarity,
            self.targets[idx],
            guidance_scales=self.config.invmm.guidance_scales,
            sampling_steps=self.config.invmm.sampling_steps,
        )
        for k, s in enumerate(slots):
            row = self.audits[s].row
            row.hard_prompt, row.hard_prompt_error = result.prompts[k], _value(result.error[k])
            row.hard_prompt_replicated = bool(result.replicated[k])
