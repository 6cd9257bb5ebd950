"""A run's bookkeeping beside the catalog: which images are in flight (the crash journal), which run
may write (the lease), and what each read task read (the ledger). They exist for Ray's worker
deaths, retries and reruns, and to make a run green only when every image it read has a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time

import fsspec

from memray.catalog.files import open_fs, put_atomic, write_bytes
from memray.errors import CatalogLeaseError

log = logging.getLogger(__name__)


class CrashJournal:
    """Which images were being audited when their worker died, kept on the catalog's filesystem.

    An auditor marks an image before auditing it and unmarks it afterwards. A marker that is still
    there when the image comes round again *in the same run* (Ray retries the task on a restarted
    actor) counts one death of the worker that held it. A marker left by another run is no death:
    that run was interrupted (Ctrl-C, a killed driver, a lost cluster), which says nothing about the
    image. Markers are per image (id and content hash), model fingerprint and config hash, so they
    never depend on which batch the image was in.
    """

    def __init__(self, catalog_url, model_fingerprint: str, config_hash: str, run_id: str):
        self.fs, root = open_fs(catalog_url)
        self.folder = f"{root}/_inflight/{model_fingerprint[:16]}-{config_hash}"
        self.run_id = run_id

    def _path(self, key: tuple[str, str | None]) -> str:
        return f"{self.folder}/{hashlib.sha256(json.dumps(list(key)).encode()).hexdigest()[:32]}.json"

    def deaths(self, key: tuple[str, str | None]) -> int:
        """How often a worker of this run died while auditing the image (image_id, image_sha256)."""
        try:
            marker = json.loads(self.fs.cat_file(self._path(key)))
        except FileNotFoundError:
            return 0
        return int(marker["deaths"]) if marker.get("run_id") == self.run_id else 0

    def mark(self, key: tuple[str, str | None], deaths: int) -> None:
        """Record that the image is being audited, after `deaths` earlier deaths of its worker in this run."""
        marker = {"image_id": key[0], "image_sha256": key[1], "run_id": self.run_id, "deaths": deaths + 1}
        put_atomic(self.fs, self._path(key), json.dumps(marker).encode())

    def unmark(self, key: tuple[str, str | None]) -> None:
        """The image's audit finished (with a row, ok or error): forget it."""
        try:
            self.fs.rm_file(self._path(key))
        except FileNotFoundError:
            pass


class RunLease:
    """One audit at a time per catalog, model fingerprint and config: a heartbeat file under `_runs/`.

    A second run refuses to start while the lease's heartbeat is fresh, with a message naming the
    holder; a lease whose holder stopped beating for `stale_seconds`, or whose holder process on
    this very host is gone (a killed driver), is taken over.
    """

    def __init__(self, catalog_url, model_fingerprint: str, config_hash: str, run_id: str, *, stale_seconds=120.0):
        self.fs, root = open_fs(catalog_url)
        self.path = f"{root}/_runs/lease-{model_fingerprint[:16]}-{config_hash}.json"
        self.run_id, self.stale_seconds = run_id, stale_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def _beat(self) -> None:
        payload = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        put_atomic(self.fs, self.path, json.dumps(payload).encode())

    def _alive(self, holder: dict) -> bool:
        if time.time() - holder["beat"] >= self.stale_seconds:
            return False
        if holder["host"] == socket.gethostname():
            try:
                os.kill(holder["pid"], 0)
            except ProcessLookupError:
                return False
            except PermissionError:  # another user's live process
                return True
        return True

    def acquire(self) -> None:
        """Take the lease or raise CatalogLeaseError; then keep it beating until release()."""
        holder = self._holder()
        if holder and holder["run_id"] != self.run_id and self._alive(holder):
            raise CatalogLeaseError(
                f"another audit of this model and config is writing to this catalog (run {holder['run_id']} on "
                f"{holder['host']}, pid {holder['pid']}, last seen {time.time() - holder['beat']:.0f} s ago); "
                f"wait for it, or for {self.stale_seconds:.0f} s after it died"
            )
        self._beat()
        time.sleep(0.2)  # two runs that started together: the last writer holds it, the other sees that
        holder = self._holder()
        if holder is None or holder["run_id"] != self.run_id:
            raise CatalogLeaseError(
                f"another audit took this catalog's lease at the same moment (run {holder and holder['run_id']})"
            )
        self._thread = threading.Thread(target=self._keep, daemon=True, name="memray-lease")
        self._thread.start()

    def _keep(self) -> None:
        while not self._stop.wait(self.stale_seconds / 4):
            try:
                self._beat()
            except Exception:  # noqa: BLE001 - a missed beat is retried; a long outage lets the lease go stale
                log.warning("could not renew the catalog lease %s", self.path, exc_info=True)

    def release(self) -> None:
        """Stop beating and remove the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        holder = self._holder()
        if holder and holder["run_id"] == self.run_id:
            self.fs.rm_file(self.path)


class RunLedger:
    """What each read task read, kept beside the catalog until the run ends (`_runs/<run_id>/`).

    A read task writes the keys of its unit when it has yielded them all (a retried task writes the
    same file again). At the end the driver holds every unit's keys against the rows it received:
    an image read but without a row, or a unit never read to its end, leaves the run unfinished
    (exit 1) instead of green. Nothing read is ever dropped silently.
    """

    def __init__(self, catalog_url: str, run_id: str):
        self.folder = f"{catalog_url.rstrip('/')}/_runs/{run_id}"

    def _path(self, unit_uri: str) -> str:
        return f"{self.folder}/{hashlib.sha256(unit_uri.encode()).hexdigest()[:32]}.json"

    def record(self, unit_uri: str, keys: list[tuple[str, str | None]]) -> None:
        """The unit was read to its end, yielding `keys`."""
        write_bytes(self._path(unit_uri), json.dumps({"unit": unit_uri, "keys": keys}).encode())

    def _keys(self, unit_uri: str) -> set[tuple[str, str | None]] | None:
        try:
            with fsspec.open(self._path(unit_uri), "rb") as handle:
                return {tuple(key) for key in json.loads(handle.read())["keys"]}
        except FileNotFoundError:
            return None

    def keys(self, unit_uris: list[str]) -> set[tuple[str, str | None]]:
        """Every image the units held, audited in this run or skipped by resume (units read to their end)."""
        return set().union(*(self._keys(uri) or set() for uri in unit_uris))

    def unfinished(self, unit_uris: list[str], finished: set[tuple[str, str | None]]) -> list[str]:
        """Images read but without a row (written now or before), and units never read to their end
        (as `unit: <uri>`)."""
        missing = []
        for uri in unit_uris:
            keys = self._keys(uri)
            if keys is None:
                missing.append(f"unit: {uri}")
                continue
            missing += sorted(image_id for image_id, sha in keys - finished)
        return missing

    def remove(self) -> None:
        """Forget the run's bookkeeping (after its outcome has been judged)."""
        fs, folder = open_fs(self.folder)
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
