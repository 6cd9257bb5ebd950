"""The cascade's stage selection: flagged images always, a calibration sample of the cleared ones
that is the same on every rerun and a uniform Poisson sample, groups ordering the work, and one
representative per group of flagged near-duplicates."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from memray.cascade.selection import CascadeOptions, Screened, calibration_draw, select


def screened(n: int, flagged=(), phashes=None, progress=None) -> list[Screened]:
    return [
        Screened(
            f"img-{i:05d}",
            f"sha-{i}",
            i in flagged,
            (progress or {}).get(i, 0.1),
            (phashes or {}).get(i, f"{(i * 0x9E3779B97F4A7C15) % 2**64:016x}"),
        )
        for i in range(n)
    ]


def test_flagged_images_are_always_selected_and_cleared_ones_at_the_calibration_rate():
    rows = select(
        screened(5000, flagged={3, 17, 4000}), CascadeOptions(calibration_rate=0.02, calibration_min=0), seed=0
    )
    by_id = {r.image_id: r for r in rows}
    assert {i for i, r in by_id.items() if r.selected_by == "screen"} == {"img-00003", "img-00017", "img-04000"}
    calibration = [r for r in rows if r.selected_by == "calibration"]
    assert len(calibration) == 100 == np.ceil(0.02 * 4997) and all(not r.flagged for r in calibration)
    # the cleared images with the smallest draws: a simple random sample of them
    cut = max(r.calibration_draw for r in calibration)
    assert all((r.calibration_draw <= cut) == (r.selected_by == "calibration") for r in rows if not r.flagged)
    assert all(r.calibration_rate == pytest.approx(100 / 4997) for r in rows)
    # the selected come first, in the order stage 2 confirms them
    first = [r.selected_by is not None for r in rows]
    assert first == sorted(first, reverse=True)


def test_calibration_draws_are_uniform_and_fixed_by_image_and_seed():
    draws = [calibration_draw(0, f"img-{i}", f"sha-{i}") for i in range(20000)]
    assert stats.kstest(draws, "uniform").pvalue > 0.01
    assert calibration_draw(0, "a", "x") == calibration_draw(0, "a", "x") != calibration_draw(1, "a", "x")
    assert calibration_draw(0, "a", "x") != calibration_draw(0, "a", "y")  # other bytes, another image
    # the same images in another order and another batch: the same selection
    images = screened(800, flagged={5})
    forward = {r.image_id: r.selected_by for r in select(images, CascadeOptions(calibration_rate=0.05), seed=3)}
    backward = {r.image_id: r.selected_by for r in select(images[::-1], CascadeOptions(calibration_rate=0.05), seed=3)}
    assert forward == backward


@pytest.mark.parametrize(
    ("cleared", "minimum", "expected"), [(40, 20, 20), (10, 20, 10), (100000, 20, 1000), (0, 20, 0)]
)
def test_a_small_run_takes_at_least_the_minimum(cleared, minimum, expected):
    assert CascadeOptions(calibration_rate=0.01, calibration_min=minimum).sample_size(cleared) == expected


def test_groups_order_the_work_and_per_group_confirms_one_representative():
    near = {0: "0000000000000000", 1: "0000000000000001", 2: "0000000000000003", 7: "00000000000000ff"}
    progress = {0: 0.9, 1: 1.4, 2: 0.6, 7: 0.7}
    images = screened(10, flagged={0, 1, 2, 7}, phashes=near, progress=progress)
    options = CascadeOptions(calibration_rate=0.0, calibration_min=0, duplicate_distance=2)
    plain = select(images, options, seed=0)
    assert [r.image_id for r in plain[:4]] == ["img-00001", "img-00000", "img-00002", "img-00007"]  # group of 3 first
    assert {r.dup_count for r in plain[:3]} == {3} and plain[0].dup_group == "img-00000"
    grouped = select(
        images, CascadeOptions(calibration_rate=0.0, calibration_min=0, duplicate_distance=2, per_group=True), seed=0
    )
    by_id = {r.image_id: r for r in grouped}
    assert by_id["img-00001"].selected_by == "screen"  # the member closest to its bar
    assert by_id["img-00000"].selected_by is None and by_id["img-00000"].confirmed_via == "img-00001"
    assert by_id["img-00002"].confirmed_via == "img-00001" and by_id["img-00007"].selected_by == "screen"


def test_calibration_images_are_confirmed_themselves_even_in_a_group():
    near = {0: "0000000000000000", 1: "0000000000000001"}
    images = screened(2, flagged={0}, phashes=near)
    rows = select(images, CascadeOptions(calibration_rate=1.0, per_group=True, duplicate_distance=2), seed=0)
    assert {r.image_id: r.selected_by for r in rows} == {"img-00000": "screen", "img-00001": "calibration"}


@pytest.mark.parametrize(
    "bad", [dict(calibration_rate=1.5), dict(calibration_min=-1), dict(duplicate_distance=40), dict(confidence=1.0)]
)
def test_options_out_of_range_are_refused(bad):
    with pytest.raises(ValueError):
        CascadeOptions(**bad)
