"""Per-image artifacts in the catalog rows: the replicas strip and the M4 error quantiles."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import png_bytes, tiny_budgets
from PIL import Image

from memray.auditing import runner
from memray.auditing.runner import audit_batch, replica_samples
from memray.catalog.reader import Catalog
from memray.catalog.schema import ARROW_SCHEMA
from memray.catalog.writer import CatalogWriter
from memray.data.images import image_row_png, strip_height
from memray.data.records import ImageInput

# latent L2 is unbounded below: -1e9 replicates at InvMM's first check, 1e9 never does
REPLICATING = tiny_budgets().replace(similarity={"kind": "latent_l2", "threshold": -1e9, "nulls": False})
NEVER = REPLICATING.replace(similarity={"threshold": 1.0})  # only an exact copy
# guidance 2 only: every replica step evaluates the conditional and the unconditional branch
SD = REPLICATING.replace(measures=["invmm", "prompt_inversion", "wasserstein"], invmm={"guidance_scales": [2.0]})
COUNT = 3


def inputs(n: int = 2) -> list[ImageInput]:
    return [ImageInput(f"a{i}", data=png_bytes(50 + i)) for i in range(n)]


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def target(loaded, audit) -> torch.Tensor:
    """The target as the model sees it: the decoded z0."""
    return loaded.adapter.decode_latents(audit.z0.unsqueeze(0))[0]


@pytest.fixture(scope="module")
def sd_audits(tiny_sd):
    """The same images audited without and with replicas."""
    return audit_batch(tiny_sd, inputs(), SD, replicas=0), audit_batch(tiny_sd, inputs(), SD, replicas=COUNT)


def test_error_quantiles_are_the_exact_quantiles_of_the_kept_samples(sd_audits):
    for audit in sd_audits[1]:
        row = audit.row
        for quantiles, samples in [
            (row.err_uncond_quantiles, audit.err_uncond),
            (row.err_cond_quantiles, audit.err_cond),
        ]:
            assert len(quantiles) == 101 and all(isinstance(q, float) for q in quantiles)
            assert np.all(np.diff(quantiles) >= 0)
            assert quantiles == np.quantile(samples, np.linspace(0, 1, 101)).tolist()
            assert (quantiles[0], quantiles[-1]) == (samples.min(), samples.max())


def test_replicas_strip_is_the_target_then_the_replicas(tiny_sd, sd_audits):
    resolution = tiny_sd.adapter.resolution
    height = strip_height(resolution)
    assert 64 <= height <= 128 and height % resolution == 0  # a tiny model's pixels grow by a whole factor
    for audit in sd_audits[1]:
        strip = decode(audit.row.replicas_png)
        assert strip.shape == (height, (COUNT + 1) * height + COUNT * 2, 3)
        first = decode(image_row_png([target(tiny_sd, audit)], height=height))
        np.testing.assert_array_equal(strip[:, :height], first)
        samples, _ = replica_samples(tiny_sd, audit, SD, COUNT)  # seeded by the image: the same replicas
        expected = decode(image_row_png([target(tiny_sd, audit), *samples], height=height))
        np.testing.assert_array_equal(strip, expected)


def test_replica_forwards_join_the_rows_cost(sd_audits):
    steps = SD.invmm.sampling_steps
    for plain, with_replicas in zip(*sd_audits):
        assert plain.row.replicas_png is None and with_replicas.row.invmm_guidance == 2.0
        # conditional, guidance != 1: one conditional and one unconditional evaluation per step
        added = with_replicas.row.unet_forwards - plain.row.unet_forwards
        assert added == COUNT * steps * 2
        assert with_replicas.row.unet_backwards == plain.row.unet_backwards
        assert with_replicas.row.seconds > 0


def test_unconditional_replicas_cost_one_forward_per_step(tiny_ddpm):
    config = REPLICATING.replace(measures=["invmm"])
    (plain,) = audit_batch(tiny_ddpm, inputs(1), config, replicas=0)
    (audit,) = audit_batch(tiny_ddpm, inputs(1), config, replicas=COUNT)
    assert audit.row.unet_forwards - plain.row.unet_forwards == COUNT * config.invmm.sampling_steps
    height = strip_height(tiny_ddpm.adapter.resolution)
    assert decode(audit.row.replicas_png).shape == (height, (COUNT + 1) * height + COUNT * 2, 3)


def test_no_replicas_for_images_invmm_did_not_replicate(tiny_sd):
    config = NEVER.replace(measures=["invmm"])
    plain, audit = (audit_batch(tiny_sd, inputs(1), config, replicas=n)[0] for n in (0, COUNT))
    assert audit.row.invmm_replicated is False and audit.row.replicas_png is None
    assert audit.row.unet_forwards == plain.row.unet_forwards


def test_a_replica_failure_keeps_the_measured_row(tiny_sd, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory while rendering")

    monkeypatch.setattr(runner, "replica_samples", broken)
    config = REPLICATING.replace(measures=["invmm"])
    (audit,) = audit_batch(tiny_sd, inputs(1), config)
    assert audit.row.status == "ok" and audit.row.invmm_replicated and audit.row.invmm_kl is not None
    assert audit.row.replicas_png is None
    assert "could not render the replicas of a0" in caplog.text


def test_artifacts_survive_a_parquet_round_trip(tmp_path, sd_audits):
    rows = [audit.row for audit in sd_audits[1]]
    with CatalogWriter(tmp_path) as writer:
        writer.add(rows)
    sql = "SELECT image_id, replicas_png, err_uncond_quantiles, err_cond_quantiles FROM audits ORDER BY image_id"
    back = Catalog(tmp_path).query(sql).to_pylist()
    assert back == [
        {
            "image_id": row.image_id,
            "replicas_png": row.replicas_png,
            "err_uncond_quantiles": row.err_uncond_quantiles,
            "err_cond_quantiles": row.err_cond_quantiles,
        }
        for row in rows
    ]
    assert ARROW_SCHEMA.field("replicas_png").type == pa.binary()
    assert ARROW_SCHEMA.field("err_cond_quantiles").type == pa.list_(pa.float64())


def test_catalog_files_without_the_artifact_columns_read_with_nulls(tmp_path, sd_audits):
    with CatalogWriter(tmp_path) as writer:
        writer.add([sd_audits[1][0].row])
    (tmp_path / "model=old").mkdir()
    old = pa.table({"image_id": ["old"], "model": ["old"], "status": ["ok"]})  # a file of an earlier schema
    pq.write_table(
        old.replace_schema_metadata({"memray_schema_version": "1"}), tmp_path / "model=old" / "part-old.parquet"
    )
    sql = "SELECT image_id, replicas_png IS NULL, err_uncond_quantiles IS NULL FROM audits ORDER BY image_id"
    back = [tuple(r.values()) for r in Catalog(tmp_path).query(sql).to_pylist()]
    assert back == [("a0", False, False), ("old", True, True)]
