"""Which screened images go to stage 2 (InvMM and the rest of the chain), and why.

- every image the screen flagged (`screen_flagged`: its start check came within `flag_progress`
  of its bar, or an empty-prompt sample of the model replicated it): `selected_by = "screen"`;
- a calibration sample of the cleared ones: a simple random sample of n = max(ceil(rate x N),
  `calibration_min`) of the N cleared images (all of them where N is smaller), the n with the
  smallest draws of a hash of (seed, image id, image sha256), which are uniform and independent:
  a rerun after a crash selects the same images, and the sample never depends on order or
  batches: `selected_by = "calibration"`. The sample is what makes the run's recall statable
  (recall.py): a memorized image found only there is a miss of the screen.

Near-duplicate groups (groups.py) order the work, largest groups first, and with `per_group` one
representative per group of flagged images is confirmed (the flagged member closest to its bar);
the others keep their screen row and point at it (`confirmed_via`), never inheriting its verdict.
Calibration images are always confirmed themselves: the recall estimate needs their own verdicts.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

from memray.cascade.groups import near_duplicate_groups


@dataclass(frozen=True)
class CascadeOptions:
    """How a cascade run selects stage 2; none of it changes a row's result, only which rows exist."""

    calibration_rate: float = 0.01
    calibration_min: int = 20  # cleared images confirmed at random, however small the run
    per_group: bool = False  # confirm one representative per near-duplicate group of flagged images
    duplicate_distance: int = 6  # pHash bits (of 64) within which two images are near-duplicates
    confidence: float = 0.95  # of the recall interval

    def __post_init__(self):
        problems = []
        if not 0 <= self.calibration_rate <= 1:
            problems.append(f"calibration rate must be in [0, 1], got {self.calibration_rate}")
        if self.calibration_min < 0:
            problems.append(f"calibration minimum must be >= 0, got {self.calibration_min}")
        if not 0 <= self.duplicate_distance <= 16:
            problems.append(f"duplicate distance must be in [0, 16] bits, got {self.duplicate_distance}")
        if not 0 < self.confidence < 1:
            problems.append(f"confidence must be in (0, 1), got {self.confidence}")
        if problems:
            raise ValueError("; ".join(problems))

    def sample_size(self, cleared: int) -> int:
        """How many of `cleared` images the calibration sample takes: the rate's share, at least the minimum."""
        return min(cleared, max(math.ceil(self.calibration_rate * cleared), self.calibration_min))


@dataclass
class Screened:
    """What the selection needs of one screened image (its screen row)."""

    image_id: str
    image_sha256: str | None
    flagged: bool
    progress: float | None
    phash: str | None


@dataclass
class Selection:
    """One screened image's place in the cascade: the selection table's row."""

    image_id: str
    image_sha256: str | None
    flagged: bool
    screen_progress: float | None
    calibration_draw: float  # uniform in [0, 1): the sample takes the cleared images with the smallest draws
    calibration_rate: float  # every cleared image's chance to be in the sample: its size over the cleared
    selected_by: str | None  # "screen", "calibration" or None (cleared, not sampled; or confirmed via another)
    dup_group: str | None
    dup_count: int
    confirmed_via: str | None  # per_group: the representative confirmed in this image's place


def calibration_draw(seed: int, image_id: str, image_sha256: str | None) -> float:
    """A uniform [0, 1) draw fixed by the image and the seed (Poisson sampling without state)."""
    digest = hashlib.sha256(f"memray-calibration\x00{seed}\x00{image_id}\x00{image_sha256}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def select(screened: list[Screened], options: CascadeOptions, seed: int) -> list[Selection]:
    """The selection of every screened image, in the order stage 2 should confirm them:
    selected first, largest groups first, then closest to the bar."""
    groups, counts = near_duplicate_groups(
        [s.phash for s in screened], [s.image_id for s in screened], options.duplicate_distance
    )
    draws = [calibration_draw(seed, s.image_id, s.image_sha256) for s in screened]
    cleared = sorted((draw, k) for k, (s, draw) in enumerate(zip(screened, draws)) if not s.flagged)
    size = options.sample_size(len(cleared))
    sampled = {k for _, k in cleared[:size]}
    rate = size / len(cleared) if cleared else 0.0
    table = []
    for k, (s, group, count) in enumerate(zip(screened, groups, counts)):
        selected_by = "screen" if s.flagged else ("calibration" if k in sampled else None)
        table.append(
            Selection(
                s.image_id, s.image_sha256, s.flagged, s.progress, draws[k], rate, selected_by, group, count, None
            )
        )
    if options.per_group:
        _confirm_one_per_group(table)

    return sorted(table, key=lambda row: (row.selected_by is None, -row.dup_count, -_closeness(row), row.image_id))


def _closeness(row: Selection) -> float:
    return row.screen_progress if row.screen_progress is not None else float("-inf")


def _confirm_one_per_group(table: list[Selection]) -> None:
    """Flagged images of a group beyond its representative are confirmed via it (module docstring)."""
    flagged: dict[str, list[Selection]] = {}
    for row in table:
        if row.selected_by == "screen" and row.dup_group is not None:
            flagged.setdefault(row.dup_group, []).append(row)
    for members in flagged.values():
        representative = min(members, key=lambda row: (-_closeness(row), row.image_id))
        for row in members:
            if row is not representative:
                row.selected_by, row.confirmed_via = None, representative.image_id
