"""memray: audit text-to-image diffusion checkpoints for memorized training images."""

from memray.audit.runner import ImageInput, audit, audit_batch
from memray.config import AuditConfig, load_config
from memray.models import load_model

__all__ = ["AuditConfig", "ImageInput", "audit", "audit_batch", "load_config", "load_model"]
__version__ = "0.1.0"
