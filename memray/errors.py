"""The faults a user can cause, each reported by the command line in one line with exit code 2.

Kept free of heavy imports, so `memray --help` and `memray query` start without torch.
"""

from __future__ import annotations

import contextlib


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type, value out of range, unusable options."""


class CatalogQueryError(ValueError):
    """A query the catalog refuses (not a single read-only SELECT), cannot run, or a catalog that is not there."""


class CatalogWriteError(ValueError):
    """The catalog cannot be written to (a file in the way, a read-only mount, no permission)."""


class CatalogLeaseError(ValueError):
    """Another audit of the same model and config is writing to the catalog right now."""


class SourceError(ValueError):
    """A source string that names nothing readable, or something memray cannot read."""


class CheckpointError(ValueError):
    """A checkpoint cannot be found, is not a diffusers pipeline, or is unsafe to load."""


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped the run: handled as Ctrl-C is (memray.distributed.pipeline)."""


USAGE_ERRORS = (ConfigError, CatalogQueryError, CatalogWriteError, CatalogLeaseError, SourceError, CheckpointError)


def is_storage_access_error(error: BaseException) -> bool:
    """Whether `error` says object storage cannot be accessed with this environment's credentials (none
    found, incomplete, failing to load): the user's to fix, reported in one line like USAGE_ERRORS.
    botocore is imported only here, once such an error is being reported."""
    kinds: tuple[type, ...] = ()
    with contextlib.suppress(ImportError):
        from botocore.exceptions import CredentialRetrievalError, NoCredentialsError, PartialCredentialsError

        kinds = (NoCredentialsError, PartialCredentialsError, CredentialRetrievalError)
    return isinstance(error, kinds)
