"""The audit runner's contract: one row per input, batch faults recorded, costs accounted."""

from __future__ import annotations

import torch
from conftest import png_bytes, tiny_budgets

import memray
from memray.auditing.runner import audit_batch, replica_samples
from memray.config import preset_config
from memray.data.records import ImageInput

TINY = preset_config("quick").replace(
    measures=["invmm", "z0_error"],
    invmm={"steps": 4, "check_every": 2, "check_noises": 2, "sampling_steps": 3, "guidance_scales": [1.0, 2.0]},
)


def test_a_broken_similarity_model_fails_the_batch_as_error_rows_not_an_exception(tiny_sd, tmp_path):
    wrong_channels = torch.jit.script(torch.nn.Conv2d(4, 8, 3))  # a real TorchScript file that cannot take RGB
    path = tmp_path / "broken_sscd.pt"
    wrong_channels.save(str(path))
    config = TINY.replace(similarity={"kind": "sscd", "sscd_path": str(path)})
    items = [ImageInput(f"img{i}", data=png_bytes(i)) for i in range(2)] + [ImageInput("empty", data=b"")]
    rows = [a.row for a in audit_batch(tiny_sd, items, config)]
    assert [r.status for r in rows] == ["error", "error", "error"]
    assert rows[0].error.startswith("batch failed: RuntimeError") and "empty" in rows[2].error
    # it failed on the model null, the first thing the similarity sees: model work, charged to no image
    assert rows[0].unet_forwards == 0


def test_audit_over_paths_gives_one_row_per_input_in_order(tiny_sd, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(png_bytes(10 + i))
    paths.insert(1, tmp_path / "missing.png")
    rows = memray.audit([str(p) for p in paths], tiny_sd, TINY, batch_size=2)
    assert [r.image_id for r in rows] == ["0.png", "missing.png", "1.png", "2.png"]
    assert [r.status for r in rows] == ["ok", "error", "ok", "ok"]
    assert "missing file" in rows[1].error
    assert len({r.run_id for r in rows}) == 1
    assert all(r.config_hash == TINY.hash() and r.model_fingerprint == tiny_sd.fingerprint for r in rows)
    ok = [r for r in rows if r.status == "ok"]
    assert all(r.width == 48 and r.height == 40 and len(r.image_sha256) == 64 for r in ok)


def test_costs_count_only_unet_work_and_split_wall_time_by_evaluations(tiny_sd):
    items = [ImageInput(f"c{i}", data=png_bytes(20 + i)) for i in range(2)]
    audits = audit_batch(tiny_sd, items, TINY)
    rows = [a.row for a in audits]
    z0_forwards = TINY.z0_error.noises * TINY.z0_error.timesteps
    invmm_forwards = TINY.invmm.steps * TINY.invmm.samples_per_step
    assert all(r.unet_backwards == invmm_forwards for r in rows)  # only InvMM's optimisation backpropagates
    assert all(r.unet_forwards >= z0_forwards + invmm_forwards for r in rows)
    assert all(r.seconds > 0 for r in rows)


def test_replicas_come_from_the_images_inverted_distribution(tiny_sd):
    (result,) = audit_batch(tiny_sd, [ImageInput("r0", data=png_bytes(30))], TINY)
    samples, tally = replica_samples(tiny_sd, result, TINY, count=3)
    assert tally.forwards.tolist() == [
        3 * TINY.invmm.sampling_steps * (1 if (result.row.invmm_guidance or 1.0) == 1 else 2)
    ]
    assert samples.shape == (3, 3, tiny_sd.adapter.resolution, tiny_sd.adapter.resolution)
    assert samples.min() >= -1 and samples.max() <= 1
    again, _ = replica_samples(tiny_sd, result, TINY, count=3)
    torch.testing.assert_close(samples, again)  # seeded by the image id: reproducible
    assert not torch.allclose(samples[0], samples[1])


def test_a_measure_that_fills_a_column_it_does_not_declare_fails_loudly(tiny_sd, monkeypatch):
    """A misspelt column is a fault of memray: the batch's images get an error row naming it, never a
    row with the value silently dropped."""
    from memray.auditing import run_measures

    honest = run_measures.RUNS["z0_error"]

    def misspelt(batch, images):
        filled = honest(batch, images)
        filled.columns["z0_eror"] = filled.columns.pop("z0_error")
        return filled

    monkeypatch.setitem(run_measures.RUNS, "z0_error", misspelt)
    config = tiny_budgets().replace(measures=["z0_error"])
    (audit,) = audit_batch(tiny_sd, [ImageInput("m", data=png_bytes(7))], config)
    assert audit.row.status == "error" and "z0_eror" in audit.row.error and "does not declare" in audit.row.error


def test_every_declared_column_is_a_catalog_column():
    from memray.auditing.registry import REGISTRY
    from memray.catalog.schema import COLUMNS

    assert {c for m in REGISTRY.values() for c in m.columns} <= set(COLUMNS)
