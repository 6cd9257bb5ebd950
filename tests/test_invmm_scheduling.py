"""How InvMM schedules its work: continuous batching over slots, the early stop and the check gate.

An image's result is its own whatever slot it ran in and whenever it joined; an image the early
stop ends is censored with its reason; a gate that rejects saves the full check, and nothing else.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_invariants import TINY_INVMM, MarkedSimilarity, _check_cost, assert_invmm_rows_equal, image_z0, run_invmm

from memray.measures.invmm import TRACE_COLUMNS, out_of_reach
from memray.measures.similarity import LatentL2Similarity

LATE_CHECKS = dataclasses.replace(TINY_INVMM, check_at_start=False)
NEVER = LatentL2Similarity(threshold=2.0)  # latent L2 similarity is at most 1: never replicates


@pytest.mark.parametrize("fixture", ["tiny_sd", "tiny_ddpm"])
def test_an_image_that_joins_a_freed_slot_mid_run_gets_its_stand_alone_result(request, fixture):
    model = request.getfixturevalue(fixture).adapter
    z0 = image_z0(model, [91, 92, 93])
    ids = ["leaves", "stays", "joins"]
    # "leaves" replicates at its first check (step 2) and frees its slot for "joins", while "stays" is at step 2
    similarity = MarkedSimilarity(z0[:1].clone())
    two_slots = run_invmm(model, z0, ids, similarity, config=LATE_CHECKS, slots=2)
    costs = model.counter.forwards.copy(), model.counter.backwards.copy()
    assert two_slots.replicated.tolist() == [True, False, False]
    assert two_slots.stop_reason == ["replicated", "budget", "budget"]
    np.testing.assert_array_equal(two_slots.steps, [LATE_CHECKS.check_every, LATE_CHECKS.steps, LATE_CHECKS.steps])

    for k, image in ((1, "stays"), (2, "joins")):
        alone = run_invmm(model, z0[k : k + 1], [image], similarity, config=LATE_CHECKS)
        assert_invmm_rows_equal(two_slots, [k], alone, [0])
        assert costs[0][k] == model.counter.forwards[0] and costs[1][k] == model.counter.backwards[0]
        np.testing.assert_allclose(two_slots.trace[k], alone.trace[0], rtol=1e-4, atol=1e-5)


def test_one_slot_and_all_slots_give_the_same_results(tiny_ddpm):
    model = tiny_ddpm.adapter
    z0 = image_z0(model, [94, 95, 96])
    ids = ["a", "b", "c"]
    similarity = MarkedSimilarity(z0[1:2].clone())  # b replicates at the start check
    together = run_invmm(model, z0, ids, similarity)
    costs = model.counter.forwards.copy()
    one_by_one = run_invmm(model, z0, ids, similarity, slots=1)
    assert together.replicated.tolist() == [False, True, False]
    # a convolution over 1 image and over 3 round differently in float32; Adam carries that along
    assert_invmm_rows_equal(together, [0, 1, 2], one_by_one, [0, 1, 2], atol=5e-5)
    np.testing.assert_array_equal(costs, model.counter.forwards)


def test_the_early_stop_censors_an_image_out_of_reach_and_charges_only_what_ran(tiny_sd):
    model = tiny_sd.adapter
    cfg = dataclasses.replace(TINY_INVMM, steps=8, early_stop=True, stop_after=4, stop_progress=0.0)
    z0 = image_z0(model, [97, 98])
    result = run_invmm(model, z0, ["s0", "s1"], NEVER, config=cfg)
    s = cfg.samples_per_step
    assert result.stop_reason == ["early_stop", "early_stop"]
    assert not result.replicated.any() and np.isnan(result.kl_nats).all()
    np.testing.assert_array_equal(result.steps, [cfg.stop_after] * 2)  # the first check from step 4 on
    checks = cfg.stop_after // cfg.check_every + 1  # and the one at the start
    forwards = cfg.stop_after * s + checks * _check_cost(cfg, cfg.guidance_scales, 1)
    np.testing.assert_array_equal(model.counter.forwards, [forwards] * 2)
    np.testing.assert_array_equal(model.counter.backwards, [cfg.stop_after * s] * 2)
    assert result.trace[0].shape == (checks, len(TRACE_COLUMNS))
    np.testing.assert_array_equal(result.trace[0][:, 0], [0, 2, 4])

    at_the_end = run_invmm(model, z0[:1], ["s0"], NEVER, config=dataclasses.replace(cfg, steps=cfg.stop_after))
    assert at_the_end.stop_reason == ["budget"]  # its last step: the budget ended it, not the early stop
    off = run_invmm(model, z0[:1], ["s0"], NEVER, config=dataclasses.replace(cfg, early_stop=False))
    assert off.stop_reason == ["budget"] and off.steps[0] == cfg.steps
    np.testing.assert_allclose(
        off.trace[0][:checks], result.trace[0], rtol=1e-5
    )  # same run until the stop (1 vs 2 images)


def test_out_of_reach_needs_the_steps_and_too_little_progress_from_the_null_to_the_bar():
    cfg = dataclasses.replace(TINY_INVMM, stop_after=50, stop_progress=0.25)
    trace = np.array([[0, 0.0, 0.5, np.nan], [25, 3.0, 0.6, np.nan], [50, 9.0, 0.55, np.nan]])
    assert out_of_reach(trace, bar=1.0, null=0.5, config=cfg)  # best 0.6: 20% of the way from 0.5 to 1.0
    assert not out_of_reach(trace, bar=0.8, null=0.5, config=cfg)  # a third of the way to 0.8: kept
    assert not out_of_reach(trace[:2], bar=1.0, null=0.5, config=cfg)  # only 25 steps run
    assert not out_of_reach(trace, bar=0.5, null=0.6, config=cfg)  # a bar under its null: no way to measure
    unchecked = trace.copy()
    unchecked[:, 2] = np.nan  # every full check skipped by the gate: nothing says it is close
    assert out_of_reach(unchecked, bar=1.0, null=0.5, config=cfg)


@pytest.mark.parametrize("margin, full_checks", [(0.0, False), (1e9, True)])
def test_the_gate_skips_the_full_check_only_where_it_rejects(tiny_sd, margin, full_checks):
    model = tiny_sd.adapter
    cfg = dataclasses.replace(TINY_INVMM, gate_steps=1, gate_margin=margin)
    z0 = image_z0(model, [99])
    result = run_invmm(model, z0, ["g"], NEVER, config=cfg)
    checks = cfg.steps // cfg.check_every + 1
    gate = dataclasses.replace(cfg, sampling_steps=cfg.gate_steps)
    per_check = _check_cost(gate, cfg.guidance_scales, 1) + full_checks * _check_cost(cfg, cfg.guidance_scales, 1)
    assert model.counter.forwards[0] == cfg.steps * cfg.samples_per_step + checks * per_check
    trace = result.trace[0]
    assert np.isfinite(trace[:, 3]).all()  # the gate's similarity, at every check
    assert np.isfinite(trace[:, 2]).all() == full_checks
    assert result.stop_reason == ["budget"] and not result.replicated[0]
