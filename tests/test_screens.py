"""The screens and the verdict that counts: the start check against an unstaged reference (counts,
cost, batch independence), InvMM stopping and confirming on counts, and both through the runner."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import png_bytes, threshold_targets, tiny_budgets
from test_invariants import TINY_INVMM, image_z0, run_invmm

from memray.auditing.runner import audit_batch
from memray.auditing.verdict import decide
from memray.catalog.schema import AuditRow
from memray.config import VerdictConfig
from memray.data.records import ImageInput
from memray.measures import rng
from memray.measures.sampling import ddim_generate
from memray.measures.settings import StartCheckConfig
from memray.measures.similarity import LatentL2Similarity
from memray.measures.start_check import start_check

SCREEN = StartCheckConfig(noises=3, steps=3, guidance_scales=(1.0, 2.5))
IDS = ["s0", "s1", "s2"]


def screen(model, z0, ids, similarity, cond, config=SCREEN, guided=True):
    model.counter.reset(len(ids))
    gens = rng.image_generators(ids, 0, "start_check", model.device)
    targets = threshold_targets(model, similarity, z0)
    return start_check(
        model, z0, cond, gens, torch.arange(len(ids)), config, similarity, targets, guided=guided
    ), targets


@torch.no_grad()
def reference_screen(model, z0, ids, similarity, cond, config=SCREEN):
    """Image by image, from the same per-image draws: pilot sims at every scale, then K at the best."""
    model.counter.reset(1)
    out = []
    for b, image_id in enumerate(ids):
        (gen,) = rng.image_generators([image_id], 0, "start_check", model.device)
        pilot = torch.randn(z0.shape[1:], generator=gen)
        counted = torch.randn((config.noises, *z0.shape[1:]), generator=gen)

        def sims(z_T, scale, b=b):
            n = len(z_T)
            c = None if cond is None else cond[b].expand(n, *cond.shape[1:])
            generated = ddim_generate(
                model, z_T, c, torch.full((n,), scale), torch.zeros(n, dtype=torch.long), config.steps
            )
            return similarity(model, generated, z0[b].expand(n, *z0.shape[1:]))

        pilots = torch.stack([sims(pilot[None], s)[0] for s in config.guidance_scales])
        best = int(pilots.argmax())
        counted_sims = sims(counted, config.guidance_scales[best])
        out.append((pilots, best, counted_sims))
    return out


def test_start_check_counts_fresh_noises_at_the_scale_its_pilot_chose(tiny_sd):
    model = tiny_sd.adapter
    z0 = image_z0(model, [1, 2, 3])
    cond = model.encode_ids(model.token_ids(["a red circle", "a cat", "two blue squares"]))
    similarity = LatentL2Similarity()
    reference = reference_screen(model, z0, IDS, similarity, cond)
    values = np.sort(np.concatenate([torch.cat([p, c]).numpy() for p, _, c in reference]))
    checked = 0
    for threshold in (values[1:] + values[:-1])[::3] / 2:
        similarity.threshold = float(threshold)
        result, targets = screen(model, z0, IDS, similarity, cond)
        for b, (pilots, best, counted) in enumerate(reference):
            assert result.guidance[b] == SCREEN.guidance_scales[best]
            assert int(result.replicas[b]) == int((counted >= threshold).sum())
            assert float(result.similarity[b]) == pytest.approx(float(torch.cat([pilots, counted]).max()), abs=1e-4)
        torch.testing.assert_close(result.progress, targets.progress(result.similarity))
        checked += int(result.replicas.sum())
        # pilot: one noise at each scale; counted: K at the chosen one (a guided scale costs 2 a step)
        cost = [
            SCREEN.steps
            * (sum(1 if s == 1 else 2 for s in SCREEN.guidance_scales) + SCREEN.noises * (1 if g == 1 else 2))
            for g in result.guidance.tolist()
        ]
        np.testing.assert_array_equal(model.counter.forwards, cost)
        np.testing.assert_array_equal(model.counter.backwards, [0, 0, 0])
    assert checked > 0  # some thresholds counted replicas


def test_start_check_of_an_image_does_not_depend_on_its_batch(tiny_sd):
    model = tiny_sd.adapter
    z0 = image_z0(model, [4, 5, 6])
    cond = model.encode_ids(model.token_ids(["a", "b c", "d"]))
    similarity = LatentL2Similarity(threshold=-20.0)
    together, _ = screen(model, z0, IDS, similarity, cond)
    alone, _ = screen(model, z0[1:2], IDS[1:2], similarity, cond[1:2])
    for field in ("similarity", "progress", "replicas", "guidance"):
        torch.testing.assert_close(getattr(together, field)[1:2], getattr(alone, field), rtol=1e-5, atol=1e-5)


def test_an_image_without_a_caption_is_screened_at_guidance_one_only(tiny_sd):
    model = tiny_sd.adapter
    z0 = image_z0(model, [7, 8])
    result, _ = screen(model, z0, IDS[:2], LatentL2Similarity(), model.empty_condition(2), guided=False)
    assert result.guidance.tolist() == [1.0, 1.0]
    np.testing.assert_array_equal(model.counter.forwards, [SCREEN.steps * (1 + SCREEN.noises)] * 2)


class RateSimilarity:
    """Says "replica" (1.0) for a fixed share of generated samples, pseudo-randomly by their bytes:
    a model whose prompt replicates the target from that share of noises, wherever the noise is."""

    kind = "rate"

    def __init__(self, rate: float, threshold: float = 0.5):
        self.rate, self.threshold = rate, threshold

    def features(self, model, z0):
        return z0

    def compare(self, generated, target):
        digests = [hashlib.sha256(g.detach().cpu().numpy().tobytes()).digest() for g in generated]
        return torch.tensor([float(int.from_bytes(d[:4], "little") / 2**32 < self.rate) for d in digests])


def test_a_check_where_three_of_four_replicate_stops_at_n01_and_the_verdict_counts(tiny_sd):
    """The 75% image: the all-K rule needs 4 of 4 (p = 0.32 a check); counting stops at KL 0 and confirms."""
    model = tiny_sd.adapter
    config = TINY_INVMM.__class__(**{**TINY_INVMM.__dict__, "check_noises": 4, "confirm_noises": 16, "steps": 6})
    z0 = image_z0(model, [9, 10, 11, 12])
    ids = ["c0", "c1", "c2", "c3"]
    similarity = RateSimilarity(0.75)
    counted = run_invmm(model, z0, ids, similarity, config=config)
    assert counted.replicated.all() and (counted.steps == 0).all() and (counted.kl_nats == 0).all()
    assert (counted.samples == 16).all() and (counted.replicas >= 8).all() and (counted.replicas < 16).any()
    first_checks = np.array([t[0] for t in counted.trace])  # the start check's (replicas, counted) of K
    assert (first_checks[:, 5] == 4).all() and (first_checks[:, 4] < 4).any()
    rule = VerdictConfig()
    for kl, k, n in zip(counted.kl_nats, counted.replicas, counted.samples):
        row = AuditRow("x", invmm_replicated=True, invmm_kl_nats=float(kl), invmm_replicas=int(k), invmm_samples=int(n))
        assert decide(row, rule)[0] == "memorized"

    reference = run_invmm(model, z0, ids, similarity, config=config, counting=False)
    missed = [i for i, t in enumerate(counted.trace) if t[0][4] < 4]
    assert all(reference.steps[i] > 0 or not reference.replicated[i] for i in missed)  # 3 of 4 is no success
    assert (reference.samples[reference.replicated] == 4).all()


def test_a_rare_replica_does_not_stop_far_from_n01(tiny_sd):
    """At KL > 0, one of four is no proof: the bound at q = 1/4 needs KL below a nat or so."""
    model = tiny_sd.adapter
    config = TINY_INVMM.__class__(
        **{**TINY_INVMM.__dict__, "check_noises": 4, "check_at_start": False, "steps": 2, "check_every": 2}
    )
    z0 = image_z0(model, [13, 14])
    result = run_invmm(model, z0, ["r0", "r1"], RateSimilarity(0.0), config=config)
    assert not result.replicated.any()


def test_the_screen_through_the_runner_flags_clears_and_proves(tiny_sd):
    config = tiny_budgets().replace(
        measures=["uncond_replication", "start_check"],
        start_check={"noises": 2, "steps": 2, "guidance_scales": [2.0]},
    )
    items = [ImageInput(f"i{k}", data=png_bytes(20 + k), caption="a red circle" if k else None) for k in range(3)]
    rows = [a.row for a in audit_batch(tiny_sd, items, config)]
    for row in rows:
        assert row.status == "ok", row.error
        assert row.screen_samples == 2 and row.screen_progress is not None
        assert row.screen_flagged == (
            row.screen_progress >= config.start_check.flag_progress or row.uncond_replication_rate > 0
        )
        assert row.invmm_replicated is None and row.verdict in ("memorized", "inconclusive", "not_memorized")
        assert (
            ("screen" in row.verdict_rule)
            or ("start samples" in row.verdict_rule)
            or ("empty prompt" in row.verdict_rule)
        )
    assert rows[0].screen_guidance == 1.0 and rows[1].screen_guidance == 2.0  # no caption: guidance 1 only
    # an always-passing bar: every start sample replicates, so the screen alone proves memorization
    proved = audit_batch(
        tiny_sd, items[1:2], config.replace(similarity={"kind": "latent_l2", "threshold": -1e9, "nulls": False})
    )
    assert proved[0].row.screen_replicas == 2 and proved[0].row.verdict == "memorized"
