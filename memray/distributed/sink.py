"""Where a stage's rows go: the catalog, behind one sink with Ray Data's Datasink steps (start, write,
complete, failed), on the driver: rows stream into the catalog as the actors return them.

The sink holds what makes a run safe to write and to judge: the lease (one run per catalog, model and
config), the crash journal (cleared by the lease's holder, marked by the actors), the ledger (written
by the read tasks, judged at the end), the deduplication of images read from two units, and the
catalog writer (a Parquet file every `rows_per_file` rows or `flush_seconds`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from memray.catalog.reader import Catalog
from memray.catalog.writer import CatalogWriter
from memray.distributed.bookkeeping import CrashJournal, RunLease, RunLedger, sweep_finished_runs

log = logging.getLogger(__name__)

Key = tuple[str, str | None]  # an image's identity: its id and the sha256 of its bytes (None: no bytes read)


@dataclass
class SinkOutcome:
    """What a completed stage wrote, and what its ledger says of it."""

    files: list[str]  # the catalog files written
    unfinished: list[str]  # images read but without a row, and units never read to their end (`unit: <uri>`)
    skipped: int  # images of this stage's input that resume skipped
    population: set[Key]  # every image the units held, audited now or skipped by resume


class CatalogSink:
    """The catalog as the sink of one stage: `start`, then `write` each table of rows, then `complete`
    (or `failed`, when the stage stops early). `journal` goes to the actors, `ledger` to the read tasks."""

    def __init__(
        self,
        catalog_url: str,
        model_fingerprint: str,
        config_hash: str,
        run_id: str,
        *,
        rows_per_file: int,
        flush_seconds: float,
        retry_errors: bool,
    ):
        self.catalog_url, self.model_fingerprint, self.config_hash = catalog_url, model_fingerprint, config_hash
        self.retry_errors = retry_errors
        self.lease = RunLease(catalog_url, model_fingerprint, config_hash, run_id)
        self.journal = CrashJournal(catalog_url, model_fingerprint, config_hash, run_id)
        self.ledger = RunLedger(catalog_url, run_id)
        self.writer = CatalogWriter(catalog_url, target_rows=rows_per_file, max_seconds=flush_seconds)
        self.written: set[Key] = set()

    def start(self) -> frozenset[Key]:
        """Take the lease (a second audit of the same model and config into this catalog refuses here),
        forget earlier runs' crash markers and killed runs' ledgers; return the keys resume skips."""
        self.lease.acquire()
        try:
            self.journal.clear()  # the lease is ours: earlier runs' markers go (they count no death anyway)
            swept = sweep_finished_runs(self.catalog_url, journals=False)
            if swept:
                log.info("removed the bookkeeping of %d runs that were killed: %s", len(swept), ", ".join(swept))
            catalog = Catalog(self.catalog_url)
            done = catalog.completed_keys(
                self.model_fingerprint, self.config_hash, include_errors=not self.retry_errors
            )
        except BaseException:
            self._release()
            raise
        return frozenset(done)

    def write(self, table: pa.Table) -> pa.Table:
        """Append rows (a table of the catalog schema), less those of images that have a row from this stage
        already (an image read from two units is audited twice but written once); returns the rows kept."""
        keep = []
        for key in zip(table.column("image_id").to_pylist(), table.column("image_sha256").to_pylist()):
            keep.append(key not in self.written)
            self.written.add(key)
        kept = table if all(keep) else table.filter(pa.array(keep))
        self.writer.add_table(kept)  # rows stay Arrow from the actor to the file
        return kept

    def complete(self, unit_uris: list[str]) -> SinkOutcome:
        """Write the rows still buffered and judge the stage by its ledger: every image read must have a
        row, every unit a record. The lease and the ledger are released, whatever happens."""
        try:
            self.writer.close()
            unfinished, skipped = self.ledger.outcome(unit_uris, self.written)
            population = self.ledger.population(unit_uris)
        finally:
            self._release()
        return SinkOutcome(list(self.writer.files), unfinished, skipped, population)

    def failed(self) -> None:
        """The stage stopped early (an error, Ctrl-C, SIGTERM): write the rows received, release the lease
        and the ledger; nothing is judged (a rerun resumes)."""
        try:
            self.writer.close()
        finally:
            self._release()

    def _release(self) -> None:
        self.ledger.remove()  # judged, or interrupted: no later run reads it
        self.lease.release()
