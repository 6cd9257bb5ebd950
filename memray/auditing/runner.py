"""One batch of images -> one catalog row each, running the configured measures in shared UNet calls.

No Ray here: the distributed layer calls `audit_batch` from its actors, the CLI calls it directly.
A fault that belongs to one image (unreadable bytes, NaN in its optimisation) becomes that
image's error row; the other images in the batch finish.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from dataclasses import dataclass

import numpy as np
import torch

from memray.auditing.registry import REGISTRY
from memray.auditing.run_measures import RUNS, Batch, Filled, value
from memray.auditing.verdict import decide, invmm_rate_bound
from memray.catalog.schema import AuditRow
from memray.config import AuditConfig, ConfigError
from memray.data.images import (
    ImageDecodeError,
    decode_image,
    image_row_png,
    perceptual_hash,
    read_bytes,
    sha256_hex,
    strip_height,
    to_model_tensor,
)
from memray.data.records import ImageInput
from memray.data.sources import stable_path_id
from memray.measures import rng
from memray.measures.sampling import aligned_start, ddim_generate
from memray.measures.similarity import build_similarity, null_bank, replication_targets

log = logging.getLogger(__name__)


@dataclass
class ImageAudit:
    """A catalog row plus the arrays behind it (for `memray inspect` and reports)."""

    row: AuditRow
    err_uncond: np.ndarray | None = None
    err_cond: np.ndarray | None = None
    invmm_mu: torch.Tensor | None = None
    invmm_log_var: torch.Tensor | None = None
    invmm_condition: torch.Tensor | None = None  # (L, D) the expected token mix InvMM's check used
    invmm_trace: np.ndarray | None = None  # one row per InvMM check (invmm.TRACE_COLUMNS)
    z0: torch.Tensor | None = None


def supported_measures(config: AuditConfig, model) -> tuple[str, ...]:
    """The configured measures that this model family can run (unconditional models: no prompts)."""
    if model.is_conditional:
        return config.measures
    return tuple(m for m in config.measures if not REGISTRY[m].needs_prompt)


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
    loaded,
    items,
    config: AuditConfig,
    *,
    run_id: str | None = None,
    progress=None,
    replicas: int = 4,
    slots: int | None = None,
    stage: str = "full",
) -> list[ImageAudit]:
    """Audit a batch of images (paths, URLs or ImageInput) against a loaded model.

    The iterative measures keep at most `slots` images in flight (None: the whole batch); the
    batch is their queue. Every image InvMM replicated also gets `replicas` samples from its inverted distribution,
    drawn next to its target in `replicas_png` (0: none); their UNet work joins the row's cost.
    `stage` names the rows' place in a cascade: "screen", "confirm", or "full" (no cascade).
    """
    model = loaded.adapter
    check_compatible(config, model)
    run_id = run_id or uuid.uuid4().hex[:12]
    started = time.perf_counter()
    inputs = [_image_input(item) for item in items]
    audits = [ImageAudit(row=_identity_row(inp, loaded, config, run_id, stage)) for inp in inputs]
    pixels, decoded = [], []  # the model inputs, and the indices of the images they are
    for i, inp in enumerate(inputs):
        try:
            data = inp.data
            if data is not None:  # an error row names the bytes it is about too: resume and the ledger key on them
                audits[i].row.image_sha256 = sha256_hex(data)
            if inp.error:
                raise ImageDecodeError(inp.error)
            if data is None:
                if not inp.uri:
                    raise ImageDecodeError("no image: the input has neither bytes nor a uri")
                data = read_bytes(inp.uri)
                audits[i].row.image_sha256 = sha256_hex(data)
            image = decode_image(data, max_pixels=config.images.max_pixels)
            audits[i].row.width, audits[i].row.height = image.size
            audits[i].row.phash = perceptual_hash(image)
            pixels.append(to_model_tensor(image, model.resolution, allow_upscale=config.images.allow_upscale))
            decoded.append(i)
        except ImageDecodeError as exc:
            _fail(audits[i].row, str(exc))
    model_seconds = 0.0  # the model null, the first time this model and config are audited: no image's time
    with model.counter.scope(len(decoded)) as tally:
        if decoded:
            chain = _MeasureChain(
                model, config, [inputs[i] for i in decoded], [audits[i] for i in decoded], progress, slots=slots
            )
            try:
                bank_started = time.perf_counter()
                bank = model_null_bank(loaded, config)
                model_seconds = time.perf_counter() - bank_started
                chain.run(torch.stack(pixels).to(model.device), bank)
            except Exception as exc:  # a fault of the batch (out of memory, a bug): record it, keep the job alive
                log.exception("audit of batch %s failed", [inputs[i].image_id for i in decoded])
                chain.fail(list(chain.alive), f"batch failed: {type(exc).__name__}: {exc}")
    _finish_costs([a.row for a in audits], tally, time.perf_counter() - started - model_seconds, decoded)
    if replicas:
        for a in audits:
            if a.row.status == "ok" and a.row.invmm_replicated:
                _render_replicas(loaded, a, config, replicas)
    return audits


def audit(
    images,
    model,
    config: AuditConfig | None = None,
    *,
    batch_size: int = 8,
    progress=None,
    replicas: int = 4,
    slots: int | None = None,
    stage: str = "full",
) -> list[AuditRow]:
    """Audit images (paths, URLs or ImageInput) against a model (a loaded model or a checkpoint ref),
    `batch_size` at a time; `replicas`, `slots` and `stage` as in audit_batch."""
    from memray.models import load_model

    loaded = load_model(model) if isinstance(model, str) else model
    config = config or AuditConfig()
    items = list(images)
    run_id = uuid.uuid4().hex[:12]
    rows = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = audit_batch(
            loaded, chunk, config, run_id=run_id, progress=progress, replicas=replicas, slots=slots, stage=stage
        )
        rows += [a.row for a in batch]
    return rows


def model_null_bank(loaded, config: AuditConfig) -> torch.Tensor | None:
    """The model null of this configuration (similarity.null_bank), generated once per loaded model.

    Its UNet evaluations belong to the model, not to any image: they are counted in
    `loaded.null_bank_costs` and in no row.
    """
    if not any(REGISTRY[m].replication for m in supported_measures(config, loaded.adapter)):
        return None
    if not config.similarity.null_samples:
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
def replica_samples(loaded, image_audit: ImageAudit, config: AuditConfig, count: int = 4):
    """`count` samples from the image's InvMM noise distribution and prompt: pixels (count, 3, R, R),
    and the Tally of the UNet evaluations they cost."""
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
    with model.counter.scope(1) as tally:
        z0_samples = ddim_generate(model, z_T, cond, guidance, owner, steps)
    return model.decode_latents(z0_samples), tally


def _render_replicas(loaded, image_audit: ImageAudit, config: AuditConfig, count: int) -> None:
    """The target and `count` replicas as the row's PNG strip; a failure leaves it NULL, not the row lost."""
    model, row = loaded.adapter, image_audit.row
    started = time.perf_counter()
    try:
        samples, tally = replica_samples(loaded, image_audit, config, count)
        row.unet_forwards += int(tally.forwards.sum())
        with torch.no_grad():
            target = model.decode_latents(image_audit.z0.unsqueeze(0).to(model.device))[0]
        row.replicas_png = image_row_png([target, *samples], height=strip_height(target.shape[-2]))
    except Exception:
        log.exception("could not render the replicas of %s; its row keeps no replicas_png", row.image_id)
    finally:
        row.seconds += time.perf_counter() - started


def _identity_row(inp: ImageInput, loaded, config: AuditConfig, run_id: str, stage: str) -> AuditRow:
    return AuditRow(
        image_id=inp.image_id,
        source=inp.source or inp.uri,
        source_offset=inp.source_offset,
        source_length=inp.source_length,
        url=inp.url,
        stage=stage,
        selected_by=inp.selected_by,
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


def _finish_costs(rows, counter, seconds: float, decoded: list[int]) -> None:
    """Evaluation counts per image (a Tally of the batch); wall time split in proportion to them."""
    total = int(counter.forwards.sum() + counter.backwards.sum()) if decoded else 0
    for k, i in enumerate(decoded):
        rows[i].unet_forwards = int(counter.forwards[k])
        rows[i].unet_backwards = int(counter.backwards[k])
        share = (counter.forwards[k] + counter.backwards[k]) / total if total else 1 / len(decoded)
        rows[i].seconds = float(seconds * share)
    for row in rows:
        if row.seconds is None:
            row.unet_forwards, row.unet_backwards, row.seconds = 0, 0, 0.0


class _MeasureChain:
    """Runs the configured measures (registry.REGISTRY) on the decoded images of one batch, image errors isolated."""

    def __init__(self, model, config: AuditConfig, inputs, audits, progress, *, slots: int | None = None):
        self.model, self.config, self.audits, self.progress = model, config, audits, progress
        self.slots = slots
        self.inputs = inputs
        self.measures = [REGISTRY[name] for name in REGISTRY if name in supported_measures(config, model)]
        self.alive = list(range(len(inputs)))

    def fail(self, images: list[int], message: str) -> None:
        for s in images:
            _fail(self.audits[s].row, message)
        self.alive = [s for s in self.alive if s not in set(images)]

    def drop_nonfinite(self, images: list[int], finite, what: str) -> None:
        bad = [s for s, ok in zip(images, finite) if not ok]
        if bad:
            self.fail(bad, f"non-finite values during {what}; the optimisation diverged for this image")

    def run(self, pixels: torch.Tensor, bank: torch.Tensor | None) -> None:
        """All the configured measures on the batch's pixels; `bank` is the model null (model_null_bank)."""
        model = self.model
        z0 = model.encode_images(pixels)
        self.drop_nonfinite(list(range(len(z0))), z0.flatten(1).isfinite().all(1).tolist(), "encoding")
        for s in self.alive:
            self.audits[s].z0 = z0[s].detach().cpu()
        batch = Batch(
            model=model,
            config=self.config,
            ids=[inp.image_id for inp in self.inputs],
            captions=[inp.caption for inp in self.inputs],
            z0=z0,
            owner=torch.arange(len(self.inputs), device=model.device),
            rows=[a.row for a in self.audits],
            progress=self.progress,
            slots=self.slots,
        )
        if any(m.replication for m in self.measures) and self.alive:
            self.set_replication_bar(batch, bank)
        for measure in self.measures:
            if measure.after_verdict:
                self.decide()
            alive = list(self.alive)  # a chunk's failures leave the later chunks as they are
            chunk = self.slots if self.slots and not measure.slotted else max(len(alive), 1)
            for start in range(0, len(alive), chunk):
                self.apply(measure, RUNS[measure.name](batch, alive[start : start + chunk]), batch)
        if not any(m.after_verdict for m in self.measures):
            self.decide()

    def set_replication_bar(self, batch: Batch, bank: torch.Tensor | None) -> None:
        """Every image's features and replication bar (its nulls), for the measures that generate."""
        batch.similarity, batch.targets = config_targets(self.model, self.config, batch.z0, bank)
        for s in self.alive:
            row = self.audits[s].row
            row.replication_threshold = value(batch.targets.threshold[s])
            row.null_content_similarity = value(batch.targets.content_null[s])
            row.null_model_similarity = value(batch.targets.model_null[s])
        finite = batch.targets.features.flatten(1).isfinite().all(1) & batch.targets.content_null.isfinite()
        self.drop_nonfinite(list(self.alive), finite[self.alive].tolist(), "the replication bar")

    def apply(self, measure, filled: Filled, batch: Batch) -> None:
        """Write a measure's columns and arrays into its images' rows; its non-finite images become errors.

        A column the measure does not declare (registry.py) is a fault of memray, raised, never dropped."""
        undeclared = sorted(set(filled.columns) - set(measure.columns))
        if undeclared:
            raise KeyError(f"{measure.name} filled columns it does not declare: {undeclared}")
        for column, values in filled.columns.items():
            for s, v in zip(filled.images, values):
                setattr(self.audits[s].row, column, v)
        for name, values in filled.arrays.items():
            for s, v in zip(filled.images, values):
                setattr(self.audits[s], name, v)
        if filled.handover is not None:
            batch.handovers.setdefault(measure.name, {}).update(filled.handover)
        if filled.finite is not None:
            self.drop_nonfinite(filled.images, filled.finite, measure.label)

    def decide(self) -> None:
        for s in self.alive:
            row = self.audits[s].row
            row.invmm_rate_bound = invmm_rate_bound(row, self.config.verdict)
            row.verdict, row.verdict_rule = decide(row, self.config.verdict)
