"""A run's bookkeeping beside the catalog: which images are in flight (the crash journal), which run
may write (the lease), and what each read task read (the ledger). They exist for Ray's worker
deaths, retries and reruns, and to make a run green only when every image it read has a row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import socket
import threading
import time

import fsspec

from memray.catalog.files import is_local, open_fs, put_atomic, write_bytes
from memray.errors import CatalogLeaseError

log = logging.getLogger(__name__)

# A lease whose holder has not beaten for this long is stale. Clocks of different hosts differ, so a
# beat this far in the future (the holder's clock ahead of this one by more) is taken as stale too.
STALE_SECONDS = 120.0


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
        self.folder = f"{root}/_inflight/{model_fingerprint[:16]}-{config_hash}"  # named as its lease is
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

    def clear(self) -> None:
        """Forget the markers of earlier runs (they count no death): only the holder of the lease may."""
        _remove_folder(self.fs, self.folder)


def _remove_folder(fs, folder: str) -> bool:
    """Remove a folder and everything in it; False when there was none."""
    try:
        fs.rm(folder, recursive=True)
    except FileNotFoundError:
        return False
    return True


def _parse_lease(raw: bytes) -> dict | None:
    """The lease a holder wrote, or None for a torn or forged one (not JSON, a field missing or of the
    wrong type): such a lease names no holder."""
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    fields = {"run_id": str, "host": str, "pid": int, "beat": (int, float)}
    if not isinstance(holder, dict) or not all(
        isinstance(holder.get(name), kind) and not isinstance(holder.get(name), bool) for name, kind in fields.items()
    ):
        return None
    return holder if math.isfinite(holder["beat"]) else None


def _holder_alive(holder: dict, stale_seconds: float) -> bool:
    """Whether the holder of a lease may still be running: it beat within `stale_seconds` (and not more
    than that in the future), and, on this host, its process exists."""
    if not -stale_seconds < time.time() - holder["beat"] < stale_seconds:
        return False
    if holder["host"] == socket.gethostname():
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


class RunLease:
    """One audit at a time per catalog, model fingerprint and config: a heartbeat file under `_runs/`.

    A second run refuses to start while the lease's heartbeat is fresh, with a message naming the
    holder; a lease whose holder stopped beating for `stale_seconds` (or whose beat lies more than
    that in the future: clock skew is bounded), whose holder process on this very host is gone (a
    killed driver), or that is torn (not a lease at all), is taken over with a warning.
    """

    def __init__(
        self, catalog_url, model_fingerprint: str, config_hash: str, run_id: str, *, stale_seconds=STALE_SECONDS
    ):
        self.fs, root = open_fs(catalog_url)
        self.path = f"{root}/_runs/lease-{model_fingerprint[:16]}-{config_hash}.json"
        self.run_id, self.stale_seconds = run_id, stale_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _holder(self) -> dict | None:
        try:
            raw = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        holder = _parse_lease(raw)
        if holder is None:
            log.warning("the catalog lease %s is torn or not a lease (%r): taking it over", self.path, raw[:80])
        return holder

    def _beat(self) -> None:
        payload = {"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(), "beat": time.time()}
        put_atomic(self.fs, self.path, json.dumps(payload).encode())

    def acquire(self) -> None:
        """Take the lease or raise CatalogLeaseError; then keep it beating until release()."""
        holder = self._holder()
        if holder and holder["run_id"] != self.run_id and _holder_alive(holder, self.stale_seconds):
            raise CatalogLeaseError(
                f"another audit of this model and config is writing to this catalog (run {holder['run_id']} on "
                f"{holder['host']}, pid {holder['pid']}, last seen {time.time() - holder['beat']:.0f} s ago); "
                f"wait for it, or for {self.stale_seconds:.0f} s after it died"
            )
        if holder and time.time() - holder["beat"] <= -self.stale_seconds:
            log.warning(
                "the catalog lease %s beats %.0f s in the future (run %s on %s): clocks differ by more than %.0f s; "
                "taking it over as stale",
                self.path,
                holder["beat"] - time.time(),
                holder["run_id"],
                holder["host"],
                self.stale_seconds,
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

    def record(self, unit_uri: str, keys: list[tuple[str, str | None]], skipped: list[tuple[str, str | None]]) -> None:
        """The unit was read to its end, yielding `keys`; resume skipped the images `skipped`."""
        write_bytes(self._path(unit_uri), json.dumps({"unit": unit_uri, "keys": keys, "skipped": skipped}).encode())

    def _read(self, unit_uri: str) -> dict | None:
        try:
            with fsspec.open(self._path(unit_uri), "rb") as handle:
                return json.loads(handle.read())
        except FileNotFoundError:
            return None

    def outcome(self, unit_uris: list[str], written: set[tuple[str, str | None]]) -> tuple[list[str], int]:
        """(images read but without a row, and units never read to their end as `unit: <uri>`; how many
        images of these units resume skipped)."""
        missing, skipped = [], set()
        for uri in unit_uris:
            read = self._read(uri)
            if read is None:
                missing.append(f"unit: {uri}")
                continue
            missing += sorted(image_id for image_id, sha in {tuple(key) for key in read["keys"]} - written)
            skipped.update(tuple(key) for key in read["skipped"])
        return missing, len(skipped)

    def population(self, unit_uris: list[str]) -> set[tuple[str, str | None]]:
        """Every image the units held, audited in this run or skipped by resume (units read to their end)."""
        found = set()
        for uri in unit_uris:
            read = self._read(uri) or {"keys": [], "skipped": []}
            found.update(tuple(key) for key in read["keys"] + read["skipped"])
        return found

    def remove(self) -> None:
        """Forget the run's bookkeeping (after its outcome has been judged, or once it was interrupted)."""
        fs, folder = open_fs(self.folder)
        _remove_folder(fs, folder)


def sweep_finished_runs(catalog_url, *, journals: bool = True, stale_seconds: float = STALE_SECONDS) -> list[str]:
    """Remove the bookkeeping of runs that are over, which a killed driver (SIGKILL, a lost machine)
    leaves behind: `_runs/<run_id>/` ledgers that no live lease holds, and with `journals` the crash
    journals (`_inflight/<model>-<config>/`) whose lease is not held by a live run. Returns what it removed.

    Folders are listed before leases are read: a run that starts meanwhile takes its lease before it
    writes a ledger, so its ledger is never among those listed. A journal is shared by the runs of one
    model and config: one taking the lease in the instant between the reading and the removal loses
    its first markers (at most one death goes uncounted), so an audit sweeps only ledgers.
    """
    fs, root = open_fs(catalog_url)
    if not is_local(fs):
        fs.invalidate_cache(root)
    ledgers = _folders(fs, f"{root}/_runs")
    inflight = _folders(fs, f"{root}/_inflight") if journals else []
    live_runs, live_journals = set(), set()
    for path in fs.glob(f"{root}/_runs/lease-*.json"):
        try:
            holder = _parse_lease(fs.cat_file(path))
        except FileNotFoundError:  # released meanwhile
            continue
        if holder is not None and _holder_alive(holder, stale_seconds):
            live_runs.add(holder["run_id"])  # lease-<model>-<config>.json holds _inflight/<model>-<config>/
            live_journals.add(posixpath.basename(path).removeprefix("lease-").removesuffix(".json"))
    stale = [f for f in ledgers if posixpath.basename(f) not in live_runs]
    stale += [f for f in inflight if posixpath.basename(f) not in live_journals]
    return [folder for folder in stale if _remove_folder(fs, folder)]


def _folders(fs, parent: str) -> list[str]:
    try:
        return sorted(entry["name"].rstrip("/") for entry in fs.ls(parent, detail=True) if entry["type"] == "directory")
    except FileNotFoundError:
        return []
