"""What a new checkpoint may do before its comparison with the base fails the gate (memray compare, nightly).

Apart from compare.py, which reads the catalog, so that the command line can show the policy's
defaults in its help without loading DuckDB or Arrow.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class ComparePolicy:
    """What the new model may do before a comparison counts as a regression that fails the gate.

    `max_*`: how many images of each kind are tolerated; `max_missing`: how many images audited
    ok under the base model may lack an ok row under the new one. `kl_drop` (absolute) and
    `kl_drop_rel` (fraction of the base KL): a fall of invmm_kl is a regression when it exceeds
    every threshold that is set. `shift_rise`: a rise of wasserstein_shift_sd (in sd) beyond it
    is a regression. None switches a limit or threshold off.
    """

    max_newly_memorized: int | None = 0
    max_newly_replicated: int | None = 0
    max_kl_regressions: int | None = 0
    max_shift_regressions: int | None = 0
    max_newly_uncond_replicated: int | None = 0
    kl_drop: float | None = None
    kl_drop_rel: float | None = 0.5
    shift_rise: float | None = None
    max_missing: int | None = None

    def __post_init__(self):
        negative = [f.name for f in dataclasses.fields(self) if (getattr(self, f.name) or 0) < 0]
        if negative:
            raise ValueError(f"ComparePolicy: {', '.join(negative)} must not be negative")

    def limits(self) -> dict[str, int | None]:
        """How many images of each regression kind the policy tolerates."""
        return {
            "newly_memorized": self.max_newly_memorized,
            "newly_replicated": self.max_newly_replicated,
            "kl_regression": self.max_kl_regressions,
            "shift_regression": self.max_shift_regressions,
            "newly_uncond_replicated": self.max_newly_uncond_replicated,
        }
