"""The distributed audit: Ray Data from image sources to Auditor actors to the Parquet catalog.

The only module that imports ray. Reading runs in Ray tasks, one per unit (an image file, a
webdataset shard, an img2dataset parquet, a manifest, or a chunk of images located by their
catalog rows: memray.data.readers); auditing runs in memray's own pool of Auditor actors, each
holding one loaded model for the whole session (AuditorPools); the driver hands them the read
blocks, gathered into calls of slots x queue images, and streams result rows into the catalog's sink as they arrive
(memray.distributed.sink: the lease, the ledger, the writer). A crash loses at most the rows still
buffered, and a rerun finishes the work: resume skips every image that already has a row for the
same model fingerprint and config hash.

A cascade (run_cascade) is two such stages on the same actors: the screens on every image, then,
once every image is screened, the selection (memray.cascade.selection) and the full chain on the selected images, each
read again by one ranged read from where the screen found it (memray.data.readers.located).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from memray.auditing.runner import audit_batch, check_compatible
from memray.cascade.selection import CascadeOptions, Screened, select
from memray.catalog.cascade import CascadeSummary, cascade_summary, screened_rows, write_selection
from memray.catalog.reader import Catalog
from memray.catalog.schema import AuditRow, rows_to_table
from memray.catalog.writer import check_writable
from memray.config import AuditConfig, ConfigError, from_dict
from memray.data.images import sha256_hex
from memray.data.readers import reader_of
from memray.data.readers.located import Located
from memray.data.records import ImageInput
from memray.data.sources import Unit, count_images, list_units, read_unit
from memray.data.uris import normal_prefix
from memray.distributed.bookkeeping import CrashJournal, RunLedger
from memray.distributed.sink import CatalogSink, Key
from memray.errors import Terminated

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineOptions:
    """How the audit is spread over the cluster; none of it changes a result."""

    actors: int = 1
    slots: int = 4  # images an actor optimises at once in shared UNet calls (sized by GPU memory)
    screen_slots: int = 64  # the same in a cascade's stage 1, whose screens keep no optimiser state
    queue: int = 4  # each actor call brings slots * queue images: a freed slot takes the next at once
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0
    device: str | None = None
    allow_pickle: bool = False
    retry_errors: bool = False  # audit again images whose last row is an error
    # An image whose worker died this often while auditing it becomes an error row (CrashJournal).
    # Ray restarts a dead auditor and retries its call without limit: the journal is what ends
    # the retries of a poison image (one death with its batch, one alone, then an error row).
    max_worker_deaths: int = 2
    max_failed_batches: int = 64  # a batch that fails past its retries is skipped (and reported)
    rows_per_file: int = 2000
    flush_seconds: float = 60.0
    allow_uri_prefixes: tuple[str, ...] = ()  # where manifests may point besides their own root
    verbose: bool = False  # show Ray's own logs, warnings and progress bars (its workers' output too)

    def __post_init__(self):
        problems = [
            f"{name} must be at least 1, got {getattr(self, name)}"
            for name in ("actors", "slots", "screen_slots", "queue", "rows_per_file", "max_worker_deaths")
            if not getattr(self, name) >= 1
        ]
        if not self.cpus_per_actor > 0:
            problems.append(f"cpus_per_actor must be > 0, got {self.cpus_per_actor}")
        if self.gpus_per_actor is not None and not self.gpus_per_actor >= 0:
            problems.append(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if problems:
            raise PipelineError("; ".join(problems))
        # In normal form, or refused now (UriError, one line): before any file or Ray work.
        object.__setattr__(self, "allow_uri_prefixes", tuple(map(normal_prefix, self.allow_uri_prefixes)))

    def stage_slots(self, stage: str) -> int:
        """The slots of an actor in `stage` ("screen", "confirm" or "full")."""
        return self.screen_slots if stage == "screen" else self.slots


class PipelineError(ConfigError):
    """Pipeline options or a cluster that cannot run the audit, found before any work starts."""


@dataclass(frozen=True)
class StageCall:
    """What a call carries besides its images: the stage's configuration, run and crash journal. Small values,
    sent with every call, so an actor restarted mid-stage needs nothing it was told before."""

    config_json: str
    run_id: str
    stage: str
    journal: CrashJournal


class Auditor:
    """Ray actor: loads the model once, maps blocks of source records to catalog rows. A cascade's stages share
    it, so the model (and its null bank, drawn once per configuration of it) is loaded once per session."""

    def __init__(self, model_ref: str, precision: str, options: PipelineOptions):
        from memray.models import load_model

        self.loaded = load_model(
            model_ref, device=options.device, precision=precision, allow_pickle=options.allow_pickle
        )
        self.options = options
        self.configs: dict[str, AuditConfig] = {}  # by their JSON: each stage's, parsed once

    def audit_blocks(self, call: StageCall, parts: list, *blocks: pa.Table) -> pa.Table:
        """The catalog rows of blocks of source records (`parts`: the slice of each that is this call's, or None)."""
        if call.config_json not in self.configs:
            self.configs[call.config_json] = from_dict(json.loads(call.config_json))
        records = [
            record
            for block, part in zip(blocks, parts)
            for record in (block if part is None else block.slice(part.start_offset, part.num_rows)).to_pylist()
        ]
        inputs = [ImageInput(**record) for record in records]
        deaths = {_key(inp): call.journal.deaths(_key(inp)) for inp in inputs}
        if any(deaths.values()):
            # A worker died on this batch before: one image at a time, so a death points at one image.
            rows = [row for inp in inputs for row in self._audit(call, [inp], deaths)]
        else:
            rows = self._audit(call, inputs, deaths)
        return rows_to_table(rows)

    def _audit(self, call: StageCall, inputs: list[ImageInput], deaths: dict) -> list[AuditRow]:
        for inp in inputs:
            if deaths[_key(inp)] >= self.options.max_worker_deaths:
                inp.error = (
                    f"the worker died {deaths[_key(inp)]} times while auditing this image (out of memory, "
                    "or a crash in native code); not retried"
                )
            else:
                call.journal.mark(_key(inp), deaths[_key(inp)])
        config, slots = self.configs[call.config_json], self.options.stage_slots(call.stage)
        audits = audit_batch(self.loaded, inputs, config, run_id=call.run_id, slots=slots, stage=call.stage)
        for inp in inputs:
            call.journal.unmark(_key(inp))
        return [a.row for a in audits]


def _key(record) -> Key:
    """An image's identity for resume and the crash journal: its id and the hash of its bytes."""
    data = record["data"] if isinstance(record, dict) else record.data
    image_id = record["image_id"] if isinstance(record, dict) else record.image_id
    return image_id, None if data is None else sha256_hex(data)


def _unit_row(unit: Unit) -> dict:
    """A unit of reading work as a Ray Data row."""
    return {**dataclasses.asdict(unit), "allowed": list(unit.allowed)}


def _read_records(unit_row: dict, *, skip: frozenset, ledger: RunLedger) -> Iterator[dict]:
    """The records of one unit, minus images that resume skips (their bytes never leave the task) and
    images the unit lists again (the same id and bytes twice in a manifest: one image, one row)."""
    keys, skipped = {}, {}
    for record in read_unit(Unit(**{**unit_row, "allowed": tuple(unit_row["allowed"])})):
        key = _key(record)
        if key in skip:
            skipped[key] = None
        elif key not in keys:
            keys[key] = None
            yield record
    ledger.record(unit_row["uri"], list(keys), list(skipped))


@contextlib.contextmanager
def _sigterm_stops_like_ctrl_c():
    """While the run is on, SIGTERM (`kill`, `ray job stop`, a pod evicted) raises Terminated, which stops
    it as Ctrl-C does: the rows received are written, Ray (and so the actors) shut down, the lease and
    the run's bookkeeping released. Ray's own handler would abort the driver and leave all of that."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return

    received = []

    def stop(signum, frame):
        received.append(signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt as interrupt:
        # Ray's waits (ray.wait, ray.get) turn whatever a signal handler raises into a KeyboardInterrupt.
        if received and not isinstance(interrupt, Terminated):
            raise Terminated() from interrupt
        raise
    finally:
        # Ray's handler was installed from C (getsignal gives None): the default takes its place.
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class ProgressLog:
    """Images done / total, errors, rate and ETA: a bar redrawn in place on a terminal, a plain line
    every `every_seconds` elsewhere (the log of a `ray job submit` job)."""

    def __init__(self, total: int | None, every_seconds: float = 10.0, stream=None, verb: str = "audited"):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.total, self.every = total, 1.0 if self.tty else every_seconds
        self.verb = verb
        self.done = self.errors = 0
        self.shown = -1  # images done when the last line was printed
        self.started = self.last = time.monotonic()

    def update(self, rows: pa.Table) -> None:
        """Count finished rows (a table of the catalog schema); print a line at most every `every_seconds`."""
        self.done += rows.num_rows
        self.errors += rows.num_rows - (pc.sum(pc.equal(rows.column("status"), "ok")).as_py() or 0)
        if time.monotonic() - self.last >= self.every:
            self.print()

    def print(self, *, final: bool = False) -> None:
        """Print the current line (`final`: the last one, which a terminal keeps)."""
        if final and not self.tty and self.shown == self.done:
            return  # a log has this line already
        self.last, self.shown = time.monotonic(), self.done
        elapsed = self.last - self.started
        rate = self.done / elapsed * 3600 if elapsed > 0 else 0.0
        if self.total:
            eta = (self.total - self.done) / (rate / 3600) if rate else float("inf")
            line = (
                f"{self.verb} {self.done}/{self.total} images ({self.errors} errors), {rate:.0f} images/h, "
                f"ETA {eta:.0f} s"
            )
        else:
            line = f"{self.verb} {self.done} images ({self.errors} errors), {rate:.0f} images/h"
        if not self.tty:
            print(line, file=self.stream, flush=True)
            return
        filled = int(24 * self.done / self.total) if self.total else 0
        bar = f"[{'#' * filled}{'.' * (24 - filled)}] " if self.total else ""
        self.stream.write(f"\r{bar}{line}\033[K" + ("\n" if final else ""))
        self.stream.flush()


@dataclass
class AuditSummary:
    """What a run did: rows written, skipped by resume, images left unfinished, files, seconds."""

    run_id: str
    model: str  # the model's slug: the catalog partition its rows went to
    rows: int
    errors: int
    skipped: int
    unfinished: list[str]  # read but without a row, or units never read: a rerun picks them up
    files: list[str]
    seconds: float


def preflight(model_ref: str, catalog_url: str, config: AuditConfig, options: PipelineOptions) -> tuple[str, str]:
    """Every fault that can be found before Ray work starts: (checkpoint path, model fingerprint).

    The configuration is already validated (AuditConfig); here the checkpoint's weights must be
    whole safetensors (or allowed pickles), the model family must run the configured measures, and
    the catalog must take a real atomic write and delete.
    """
    from memray.models import adapter_class
    from memray.models.loading import model_fingerprint, require_safe_weights, resolve_checkpoint

    path = resolve_checkpoint(model_ref)
    require_safe_weights(path, allow_pickle=options.allow_pickle)
    check_compatible(config, adapter_class(path))
    check_writable(catalog_url)
    return str(path), model_fingerprint(path)


def _check_resources(ray, options: PipelineOptions, gpus: float) -> None:
    """An actor that asks more of one node than any node has would wait forever: refuse it now."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    most_cpus = max((node.get("CPU", 0) for node in nodes), default=0)
    most_gpus = max((node.get("GPU", 0) for node in nodes), default=0)
    if options.cpus_per_actor > most_cpus:
        raise PipelineError(
            f"--cpus-per-actor {options.cpus_per_actor}: no node of the cluster has more than {most_cpus:g} CPUs"
        )
    if gpus > most_gpus:
        raise PipelineError(f"{gpus:g} GPUs per actor: no node of the cluster has more than {most_gpus:g} GPUs")


def run_audit(
    sources: list[str],
    model_ref: str,
    catalog_url: str,
    config: AuditConfig,
    options: PipelineOptions = PipelineOptions(),
) -> AuditSummary:
    """Audit every image of `sources` with `model_ref`, appending rows to the catalog at `catalog_url`."""
    _, fingerprint = preflight(model_ref, catalog_url, config, options)
    units = _list_sources(sources, options)
    with _ray_session(options) as auditors:
        summary, _ = _run_stage(units, model_ref, fingerprint, catalog_url, config, options, auditors)
    return summary


@dataclass
class CascadeRun:
    """What a cascade run did: its two stages, its selection table, and the screen's recall."""

    screen: AuditSummary
    confirm: AuditSummary | None  # None when stage 2 was left for later (memray confirm)
    selection: str  # the selection table's path
    summary: CascadeSummary

    @property
    def unfinished(self) -> list[str]:
        """Images of either stage without a row: a rerun picks them up."""
        return self.screen.unfinished + (self.confirm.unfinished if self.confirm else [])


CASCADE_FROM_IMAGES = 1000


def wants_cascade(sources: list[str], options: PipelineOptions) -> bool:
    """The default for `--cascade auto`: a cascade for large inputs, CASCADE_FROM_IMAGES images or
    more, or shards whose count only a full read could tell (LAION-sized by nature)."""
    counts = [count_images(unit) for unit in _list_sources(sources, options)]
    return None in counts or sum(counts) >= CASCADE_FROM_IMAGES


def run_cascade(
    sources: list[str],
    model_ref: str,
    catalog_url: str,
    config: AuditConfig,
    options: PipelineOptions = PipelineOptions(),
    cascade: CascadeOptions | None = None,
    *,
    confirm: bool = True,
) -> CascadeRun:
    """Screen every image of `sources`, select, and confirm the selection with the full chain (module docstring)."""
    from memray.models.loading import model_slug

    cascade = cascade or CascadeOptions()
    screen_config = config.screen_config()
    _, fingerprint = preflight(model_ref, catalog_url, config, options)
    check_compatible(screen_config, _adapter_class(model_ref))
    units = _list_sources(sources, options)
    allowed = _located_prefixes(units, options)
    slug = model_slug(model_ref, fingerprint)
    with _ray_session(options) as auditors:
        screened, population = _run_stage(
            units, model_ref, fingerprint, catalog_url, screen_config, options, auditors, stage="screen"
        )
        rows = screened_rows(Catalog(catalog_url), fingerprint, screen_config.hash(), population)
        selection = select([_screened(row) for row in rows], cascade, config.seed)
        path = write_selection(
            catalog_url,
            selection,
            run_id=screened.run_id,
            model=slug,
            model_fingerprint=fingerprint,
            screen_config_hash=screen_config.hash(),
            confirm_config_hash=config.hash(),
            allowed=list(allowed),
            options=dataclasses.asdict(cascade),
        )
        confirmed = None
        if confirm:
            by_key = {(row["image_id"], row["image_sha256"]): row for row in rows}
            chosen = [
                {**by_key[(s.image_id, s.image_sha256)], "selected_by": s.selected_by}
                for s in selection
                if s.selected_by is not None
            ]
            confirmed = confirm_located(chosen, model_ref, fingerprint, catalog_url, config, options, allowed, auditors)
    summary = cascade_summary(Catalog(catalog_url), model=slug, run_id=screened.run_id, confidence=cascade.confidence)
    return CascadeRun(screened, confirmed, path, summary)


def confirm_located(
    located: list[dict],
    model_ref: str,
    fingerprint: str,
    catalog_url: str,
    config: AuditConfig,
    options: PipelineOptions,
    allowed: tuple[str, ...],
    auditors: AuditorPools,
    *,
    chunk: int = 64,
) -> AuditSummary:
    """Stage 2: the full chain on images located by their screen rows (read again in one ranged read
    each, inside `allowed`), in the order given, by the session's auditors (_ray_session)."""
    units = Located().units(located, allowed, chunk=chunk)
    summary, _ = _run_stage(units, model_ref, fingerprint, catalog_url, config, options, auditors, stage="confirm")
    return summary


def run_confirm(
    catalog_url: str,
    model_ref: str,
    config: AuditConfig,
    options: PipelineOptions = PipelineOptions(),
    *,
    top: int | None = None,
    threshold: float | None = None,
    run_id: str | None = None,
    confidence: float = 0.95,
) -> tuple[AuditSummary, CascadeSummary]:
    """Stage 2 later, from the catalog alone: the selection of a cascade run (the newest of the model
    unless `run_id`) not confirmed yet, or on request the `top` cleared images closest to their bar
    and those at `threshold` progress or above; each read again from where it was screened.
    Returns stage 2's summary and the run's cascade summary with the new verdicts."""
    from memray.catalog.cascade import selection_run
    from memray.models.loading import model_slug

    _, fingerprint = preflight(model_ref, catalog_url, config, options)
    slug = model_slug(model_ref, fingerprint)
    catalog = Catalog(catalog_url, must_exist=True)
    try:
        run_id, rows, allowed = selection_run(catalog, slug, run_id)
    except LookupError as error:
        raise PipelineError(f"{error}: run `memray audit --cascade` first") from error
    if top is None and threshold is None:
        chosen = [row for row in rows if row["selected_by"] and not row["confirmed"]]
    else:

        def progress(row: dict) -> float:
            return row["screen_progress"] if row["screen_progress"] is not None else float("-inf")

        cleared = sorted(
            (row for row in rows if not (row["flagged"] or row["selected_by"] or row["confirmed"])),
            key=progress,
            reverse=True,
        )
        chosen = [
            {**row, "selected_by": "request"}
            for k, row in enumerate(cleared)
            if (top is not None and k < top) or (threshold is not None and progress(row) >= threshold)
        ]
    allowed = tuple(allowed) + tuple(options.allow_uri_prefixes)
    with _ray_session(options) as auditors:
        confirmed = confirm_located(chosen, model_ref, fingerprint, catalog_url, config, options, allowed, auditors)
    return confirmed, cascade_summary(Catalog(catalog_url), model=slug, run_id=run_id, confidence=confidence)


def _screened(row: dict) -> Screened:
    return Screened(
        row["image_id"], row["image_sha256"], bool(row["screen_flagged"]), row["screen_progress"], row["phash"]
    )


def _adapter_class(model_ref: str):
    from memray.models import adapter_class
    from memray.models.loading import resolve_checkpoint

    return adapter_class(resolve_checkpoint(model_ref))


def _list_sources(sources: list[str], options: PipelineOptions) -> list[Unit]:
    return [u for source in sources for u in list_units(source, allow_uri_prefixes=options.allow_uri_prefixes)]


def _located_prefixes(units: list[Unit], options: PipelineOptions) -> tuple[str, ...]:
    """Where stage 2 may read images again: the run's sources (a folder's root, a shard or file itself,
    and what a manifest may point into)."""
    allowed = set(options.allow_uri_prefixes)
    for unit in units:
        allowed.update(reader_of(unit).prefixes(unit))
    return tuple(sorted(allowed))


@contextlib.contextmanager
def _ray_session(options: PipelineOptions):
    """Ray for the audit: the job's cluster under `ray job submit`, the one already initialised, or a
    private local one started (and stopped) here; Ray's own output quiet unless `verbose`."""
    import ray

    started = not ray.is_initialized()
    if started:
        # Under `ray job submit` RAY_ADDRESS names the job's cluster; elsewhere start a private
        # local Ray rather than joining whatever cluster last ran on this machine.
        ray.init(
            address=os.environ.get("RAY_ADDRESS") or "local",
            log_to_driver=options.verbose,
            logging_level=logging.INFO if options.verbose else logging.ERROR,
        )
    if not options.verbose:  # Ray's own progress bars and plans: memray prints its own progress
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = context.print_on_execution_start = False
        for name in ("ray", "ray.data"):  # ray.data's logger does not propagate to ray's
            logging.getLogger(name).setLevel(logging.ERROR)
    auditors = AuditorPools(options)
    try:
        with _sigterm_stops_like_ctrl_c():  # after ray.init, which installs its own handler
            yield auditors
    finally:
        if started:
            ray.shutdown()  # the private Ray and its actors, in-flight calls and all
        else:
            auditors.close()  # on a cluster that outlives the session too, nothing keeps auditing


class AuditorPools:
    """A session's Auditor actors, one pool per (model, precision, GPUs per actor): a cascade's stages share
    it. Like Ray Data's pools, an actor that dies is restarted and its calls retried; SPREAD puts the
    actors on distinct nodes. memray's own pool rather than Ray Data's (map_batches with an
    ActorPoolStrategy), which passes its actors' constructor arguments through the object store, where a
    restart cannot count on them (ray-project/ray#53727, warned of on every run): these are passed inline."""

    def __init__(self, options: PipelineOptions):
        self.options = options
        self.pools: dict[tuple, list] = {}

    def actors(self, model_ref: str, precision: str, gpus: float) -> list:
        """The pool's actors, started on first use."""
        import ray

        key = (model_ref, precision, gpus)
        if key not in self.pools:
            auditor = ray.remote(Auditor).options(
                num_cpus=self.options.cpus_per_actor,
                num_gpus=gpus,
                max_restarts=-1,
                max_task_retries=-1,
                scheduling_strategy="SPREAD",
            )
            self.pools[key] = [auditor.remote(model_ref, precision, self.options) for _ in range(self.options.actors)]
        return self.pools[key]

    def close(self) -> None:
        """End every actor of the session."""
        import ray

        for actors in self.pools.values():
            for actor in actors:
                ray.kill(actor)
        self.pools.clear()


_VERBS = {"full": "audited", "screen": "screened", "confirm": "confirmed"}


def _run_stage(
    units: list[Unit],
    model_ref: str,
    fingerprint: str,
    catalog_url: str,
    config: AuditConfig,
    options: PipelineOptions,
    auditors: AuditorPools,
    *,
    stage: str = "full",
) -> tuple[AuditSummary, set[Key]]:
    """One pass over `units` into the catalog; (its summary, every image key it held)."""
    from memray.models.loading import model_slug

    started = time.monotonic()
    run_id = uuid.uuid4().hex[:12]
    sink = CatalogSink(
        catalog_url,
        fingerprint,
        config.hash(),
        run_id,
        rows_per_file=options.rows_per_file,
        flush_seconds=options.flush_seconds,
        retry_errors=options.retry_errors,
    )
    done = sink.start()  # a second audit of the same model and config into this catalog refuses here
    try:
        counts = [count_images(unit) for unit in units]
        # Which images of the input resume skips is known only once they are read (the key holds the
        # bytes' hash): with anything audited already, the total to audit is not known beforehand.
        total = None if None in counts or done else sum(counts)
        log.info("run %s: %d units, %s images to audit, %d audited before", run_id, len(units), total, len(done))
        progress = ProgressLog(total, verb=_VERBS[stage])
        # closing: a stop here (Ctrl-C, SIGTERM, a failed write) kills the auditors at once, not when
        # the traceback that holds the generator is freed.
        with contextlib.closing(
            _audited_rows(units, done, sink, model_ref, config, options, auditors, run_id, stage)
        ) as rows:
            for table in rows:
                progress.update(sink.write(table))
    except BaseException:
        sink.failed()  # the rows received are written; the lease and the ledger go
        raise
    outcome = sink.complete([unit.uri for unit in units])
    progress.print(final=True)
    if outcome.unfinished:
        log.warning("%d images have no row yet (their batch failed); rerun to audit them", len(outcome.unfinished))
    summary = AuditSummary(
        run_id=run_id,
        model=model_slug(model_ref, fingerprint),
        rows=progress.done,
        errors=progress.errors,
        skipped=outcome.skipped,
        unfinished=outcome.unfinished,
        files=outcome.files,
        seconds=time.monotonic() - started,
    )
    return summary, outcome.population


def _audited_rows(
    units: list[Unit],
    done: frozenset[Key],
    sink: CatalogSink,
    model_ref: str,
    config: AuditConfig,
    options: PipelineOptions,
    auditors: AuditorPools,
    run_id: str,
    stage: str,
) -> Iterator[pa.Table]:
    """A stage's catalog rows, as they are audited: Ray Data read tasks (one per unit, recording to the sink's
    ledger) cut the records into blocks of slots x queue images, and a pool of Auditor actors audits them."""
    import ray

    gpus = options.gpus_per_actor
    if gpus is None:
        gpus = 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    _check_resources(ray, options, gpus)
    # A read task that fails past its retries loses only its unit (the ledger reports it unfinished).
    ray.data.DataContext.get_current().max_errored_blocks = options.max_failed_batches
    dataset = ray.data.from_items([_unit_row(unit) for unit in units])
    dataset = dataset.flat_map(functools.partial(_read_records, skip=done, ledger=sink.ledger))
    # Calls of slots x queue images: rows stream out as each call finishes (not when a whole shard has),
    # and a call that fails past its retries loses only itself.
    call_size = options.stage_slots(stage) * options.queue
    dataset = dataset.repartition(target_num_rows_per_block=call_size)
    actors = auditors.actors(model_ref, config.precision, gpus)
    call = StageCall(config.to_json(), run_id, stage, sink.journal)
    calls = _calls(dataset, call_size)
    try:
        yield from _audit_calls(ray, actors, call, calls, options.max_failed_batches)
    finally:
        calls.close()  # Ray Data's executor shuts down with its iterator


def _calls(dataset, call_size: int) -> Iterator[tuple[list, list]]:
    """The dataset's blocks as they are read, gathered into calls of at least `call_size` images (repartition
    leaves each unit's last block short, and a folder of images is a unit per file): (the slice of each
    block that is the call's, the blocks' object refs)."""
    parts, refs, images = [], [], 0
    for bundle in dataset.iter_internal_ref_bundles():
        for entry, part in zip(bundle.blocks, bundle.slices):
            parts.append(part)
            refs.append(entry.ref)
            images += entry.metadata.num_rows if part is None else part.num_rows
            if images >= call_size:
                yield parts, refs
                parts, refs, images = [], [], 0
    if refs:
        yield parts, refs


CALLS_PER_ACTOR = 2  # one running, one waiting: an actor never idles between calls, and no block waits long


def _audit_calls(
    ray, actors: list, call: StageCall, calls: Iterator[tuple[list, list]], max_failed: int
) -> Iterator[pa.Table]:
    """Each call audited by the least loaded live actor, at most CALLS_PER_ACTOR calls on each; the rows in
    the order the calls finish. A call that fails for good loses its images only (they stay without rows:
    reported as unfinished, a rerun audits them) until more than `max_failed` calls have."""
    running: dict = {}  # a call's result ref -> its actor's index
    load = [0] * len(actors)
    live = set(range(len(actors)))
    failed, exhausted = 0, False
    try:
        while True:
            # Pulling a call waits for the read tasks: only when an actor has room for it (backpressure).
            while not exhausted and live and min(load[i] for i in live) < CALLS_PER_ACTOR:
                images = next(calls, None)
                if images is None:
                    exhausted = True
                    break
                parts, refs = images
                actor = min(live, key=load.__getitem__)
                running[actors[actor].audit_blocks.remote(call, parts, *refs)] = actor  # refs: resolved there
                load[actor] += 1
            if not running:
                return
            [ref], _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ref)
            load[actor] -= 1
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayError as error:  # the Auditor raised, a block was lost, the actor is gone
                failed += 1
                if isinstance(error, ray.exceptions.ActorDiedError):
                    live.discard(actor)  # dead for good (its constructor raised): no more calls for it
                log.warning("a call of images failed (%d so far, at most %d): %s", failed, max_failed, error)
                if failed > max_failed:
                    raise RuntimeError(f"{failed} calls of images failed, more than {max_failed}") from error
                if not live:
                    raise RuntimeError("every auditor actor died") from error
                continue
            yield rows
    finally:
        # A stage that stops early (Ctrl-C, SIGTERM, too many failures) cancels its calls, so no actor
        # keeps auditing, and no call is retried or reported as lost when Ray shuts down.
        for ref in running:
            ray.cancel(ref)
        if running:
            ray.wait(list(running), num_returns=len(running), timeout=10)
