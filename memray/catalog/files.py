"""The catalog's files on a local disk or any fsspec filesystem, each written in one atomic step.

A rename on a local disk (after an fsync), a single PUT on an object store: a reader sees all of
a file or nothing of it, and a crash never leaves half a file where a reader looks.
"""

from __future__ import annotations

import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

# Object stores make a single PUT visible all at once (or not at all); the in-memory filesystem
# of tests commits a file when it is closed. Everything else gets a temporary name and a rename.
_ATOMIC_PUT_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "r2", "memory"})
TMP_SUFFIX = ".tmp"


def open_fs(url) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path without protocol) for a local path or an fsspec URL.

    For s3:// the endpoint comes from `AWS_ENDPOINT_URL_S3` or `AWS_ENDPOINT_URL` when set
    (passed to s3fs explicitly, so any S3-compatible server on any address works).
    """
    url = os.fspath(url)
    protocol = fsspec.core.split_protocol(url)[0] or "file"
    kwargs: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            kwargs["client_kwargs"] = {"endpoint_url": endpoint}
    fs, root = fsspec.core.url_to_fs(url, **kwargs)
    return fs, root.rstrip("/") or root


def protocols(fs) -> tuple[str, ...]:
    """The protocol names of an fsspec filesystem."""
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def is_local(fs) -> bool:
    """Whether the filesystem is the local disk."""
    return isinstance(fs, LocalFileSystem)


def put_atomic(fs, path: str, data: bytes) -> None:
    """Make `path` appear with content `data` in one step: readers see all of it or nothing."""
    if is_local(fs):
        directory = os.path.dirname(path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{path}{TMP_SUFFIX}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        try:  # make the rename itself durable
            fd = os.open(directory, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
    elif set(protocols(fs)) & _ATOMIC_PUT_PROTOCOLS:
        fs.pipe_file(path, data)
    else:  # e.g. sftp, hdfs: a temporary name in the same folder, then a rename
        tmp = f"{path}{TMP_SUFFIX}"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, path)


def parquet_bytes(table: pa.Table) -> bytes:
    """A table as Parquet bytes (zstd), ready for put_atomic."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue().to_pybytes()


def write_bytes(url, data: bytes) -> str:
    """Write one file (local path or fsspec URL) in one step: readers see all of it or nothing."""
    fs, target = open_fs(url)
    put_atomic(fs, target, data)
    return target


def write_parquet(table: pa.Table, path) -> str:
    """Write a query result as one Parquet file (local path or fsspec URL), atomically."""
    return write_bytes(path, parquet_bytes(table))
