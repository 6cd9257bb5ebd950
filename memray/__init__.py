"""memray: audit text-to-image diffusion checkpoints for memorized training images.

The public names are imported on first use (PEP 562), so `import memray.catalog...` and the
command line do not pay for torch until they audit something.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
_PUBLIC = {
    "AuditConfig": "memray.config",
    "load_config": "memray.config",
    "ImageInput": "memray.data.records",
    "audit": "memray.auditing.runner",
    "audit_batch": "memray.auditing.runner",
    "load_model": "memray.models",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'memray' has no attribute {name!r}")
