"""Regression tests of the hostile-input and fault probe: one per finding, each failing before the fix.

Real parts throughout: the tiny checkpoint, real files and catalogs, a real local Ray where the
finding is about the pipeline, the real CLI. Tests that need Ray are marked slow.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes, tiny_flags
from test_distributed import CONFIG, write_shard

from memray.catalog.reader import Catalog
from memray.catalog.schema import AuditRow
from memray.catalog.writer import CatalogWriter, check_writable
from memray.cli import add_pipeline_args, main
from memray.config import ConfigError, load_config
from memray.data.images import ImageDecodeError, read_bytes
from memray.data.sources import list_units, read_unit
from memray.distributed.bookkeeping import CrashJournal, RunLease, RunLedger
from memray.distributed.pipeline import PipelineError, PipelineOptions, run_audit
from memray.errors import CatalogLeaseError, CatalogQueryError, CatalogWriteError
from memray.models.loading import CheckpointError, model_slug, require_safe_weights

TINY = tiny_flags(measures=["z0_error"])


# -- 1. an unwritable catalog, and a green run without rows -----------------------------------------


def test_a_catalog_that_cannot_be_written_stops_the_audit_before_any_work(tiny_sd_dir, tmp_path, capsys):
    (tmp_path / "a-file").write_text("in the way")
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(1))
    with pytest.raises(CatalogWriteError, match="cannot write to the catalog"):
        check_writable(str(tmp_path / "a-file" / "catalog"))
    code = main(["audit", str(images), "--model", str(tiny_sd_dir), "--catalog", str(tmp_path / "a-file" / "c"), *TINY])
    assert code == 2  # one line, exit 2, and no Ray was started for it
    assert "memray: cannot write to the catalog" in capsys.readouterr().err


def test_a_run_with_an_image_read_but_never_written_is_not_green(tmp_path):
    ledger = RunLedger(str(tmp_path), "run-1")
    ledger.record("shard-a", [("a/1", "h1"), ("a/2", "h2")], [("a/0", "h0")])
    unfinished, skipped = ledger.outcome(["shard-a", "shard-b"], written={("a/1", "h1")})
    assert unfinished == ["a/2", "unit: shard-b"]  # an image without a row, a unit never read to its end
    assert ledger.outcome(["shard-a"], written={("a/1", "h1"), ("a/2", "h2")}) == ([], 1)
    # the run's population: what it audited and what resume skipped (a cascade selects from all of it)
    assert ledger.population(["shard-a", "shard-b"]) == {("a/0", "h0"), ("a/1", "h1"), ("a/2", "h2")}
    ledger.remove()
    assert not (tmp_path / "_runs" / "run-1").exists()


# -- 2. different images that share an id ---------------------------------------------------------


@pytest.mark.slow
def test_the_same_key_in_three_shards_and_one_id_twice_in_a_manifest_are_all_audited(local_ray, tiny_sd_dir, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for shard in range(3):
        write_shard(shards / f"{shard:05d}.tar", {"k0": png_bytes(10 + shard)}, {})
    (tmp_path / "m").mkdir()
    for i in range(2):
        (tmp_path / "m" / f"{i}.png").write_bytes(png_bytes(20 + i))
    manifest = tmp_path / "m" / "list.jsonl"
    manifest.write_text("".join(json.dumps({"id": "same", "uri": f"{i}.png"}) + "\n" for i in range(2)))
    catalog = str(tmp_path / "catalog")
    options = PipelineOptions(slots=2, cpus_per_actor=0.5)
    config = CONFIG.replace(measures=["z0_error"])
    first = run_audit([str(shards), str(manifest)], str(tiny_sd_dir), catalog, config, options)
    assert first.rows == 5 and not first.unfinished
    latest = Catalog(catalog).query("SELECT image_id, image_sha256 FROM latest ORDER BY image_id").to_pylist()
    assert [r["image_id"] for r in latest] == ["00000.tar/k0", "00001.tar/k0", "00002.tar/k0", "same", "same"]
    assert len({r["image_sha256"] for r in latest}) == 5  # the two "same" are two images
    again = run_audit([str(shards), str(manifest)], str(tiny_sd_dir), catalog, config, options)
    assert (again.rows, again.skipped) == (0, 5)  # resume knows both


# -- 3. NaN and nonsense settings ------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ["--set", "invmm.guidance_scales=[nan]"],
        ["--set", "verdict.invmm_rate_min=nan"],
        ["--set", "similarity.threshold=nan"],
        ["--set", "verdict.shift_sd_memorized=-inf"],
        ["--set", "seed=-1"],
        ["--set", "measures=[]"],
        ["--slots", "0"],
        ["--screen-slots", "0"],
        ["--actors", "0"],
        ["--rows-per-file", "0"],
        ["--cpus-per-actor", "0"],
    ],
)
def test_nonsense_settings_stop_at_start_up_in_one_line(tiny_sd_dir, tmp_path, capsys, flags):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes(1))
    code = main(["audit", str(images), "--model", str(tiny_sd_dir), "--catalog", str(tmp_path / "c"), *TINY, *flags])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("memray: ") and "Traceback" not in err
    assert not (tmp_path / "c").exists()  # nothing was written


def test_the_former_names_of_the_slots_flags_still_work_and_say_what_they_are_now(capsys):
    parser = argparse.ArgumentParser(prog="memray audit")
    add_pipeline_args(parser)
    assert (parser.parse_args([]).slots, parser.parse_args([]).screen_slots) == (4, 64)
    assert not capsys.readouterr().err and "--batch-size" not in parser.format_help()  # the new names only
    args = parser.parse_args(["--batch-size", "8", "--screen-batch-size", "32"])  # a nightly script of before
    assert (args.slots, args.screen_slots) == (8, 32)
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "memray audit: --batch-size is deprecated, use --slots (the same setting)",
        "memray audit: --screen-batch-size is deprecated, use --screen-slots (the same setting)",
    ]


@pytest.mark.slow
def test_an_actor_no_node_can_host_is_refused_instead_of_waiting_forever(local_ray, tiny_sd_dir, tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    options = PipelineOptions(cpus_per_actor=100)
    with pytest.raises(PipelineError, match="no node of the cluster has more than 2 CPUs"):
        run_audit([str(tmp_path / "a.png")], str(tiny_sd_dir), str(tmp_path / "c"), CONFIG, options)


# -- 4. interruptions and concurrent runs ---------------------------------------------------------


def test_a_marker_left_by_an_interrupted_run_is_no_death(tmp_path):
    key = ("img", "hash")
    interrupted = CrashJournal(str(tmp_path), "fp", "cfg", "run-1")
    interrupted.mark(key, 0)
    interrupted_again = CrashJournal(str(tmp_path), "fp", "cfg", "run-2")
    assert interrupted_again.deaths(key) == 0  # Ctrl-C twice: no death counted, ever
    interrupted_again.mark(key, 0)
    same_run = CrashJournal(str(tmp_path), "fp", "cfg", "run-2")  # Ray retries the batch in run-2
    assert same_run.deaths(key) == 1


def test_a_second_audit_of_the_same_model_and_config_refuses_while_the_first_runs(tmp_path):
    first = RunLease(str(tmp_path), "fp", "cfg", "run-1")
    first.acquire()
    try:
        with pytest.raises(CatalogLeaseError, match="run run-1"):
            RunLease(str(tmp_path), "fp", "cfg", "run-2").acquire()
        other_config = RunLease(str(tmp_path), "fp", "cfg-2", "run-3")
        other_config.acquire()  # another config writes other rows: no conflict
        other_config.release()
    finally:
        first.release()
    again = RunLease(str(tmp_path), "fp", "cfg", "run-4")
    again.acquire()
    again.release()


def test_a_lease_whose_holder_stopped_beating_is_taken_over(tmp_path):
    dead = RunLease(str(tmp_path), "fp", "cfg", "run-dead", stale_seconds=0.5)
    dead._beat()  # acquired, then the driver was killed: no more beats
    time.sleep(0.6)
    alive = RunLease(str(tmp_path), "fp", "cfg", "run-alive", stale_seconds=0.5)
    alive.acquire()
    alive.release()


# -- 5. bad files in the catalog ------------------------------------------------------------------


def _one_row_catalog(path) -> None:
    with CatalogWriter(path) as writer:
        writer.add([AuditRow(image_id="good", model="m", status="ok", audited_at="2026-11-01")])


@pytest.mark.parametrize("bad", ["zero-byte", "truncated", "foreign"])
def test_a_bad_file_in_the_catalog_is_left_out_with_a_warning_naming_it(tmp_path, bad, caplog):
    _one_row_catalog(tmp_path)
    good = next(tmp_path.rglob("*.parquet"))
    target = tmp_path / "model=m" / "part-bad.parquet"
    if bad == "zero-byte":
        target.write_bytes(b"")
    elif bad == "truncated":
        target.write_bytes(good.read_bytes()[:100])
    else:  # a query exported into the catalog folder: Parquet without memray's schema metadata
        pq.write_table(pa.table({"image_id": ["x"], "status": ["ok"]}), target)
    catalog = Catalog(tmp_path)
    rows = catalog.query("SELECT image_id FROM audits").to_pylist()
    assert rows == [{"image_id": "good"}]
    assert [entry.split(":")[0] for entry in catalog.ignored] == [str(target)]
    assert str(target) in caplog.text
    assert catalog.completed_keys("fp", "cfg") == set()  # resume reads the catalog too: no traceback


# -- 6. manifests that point anywhere -------------------------------------------------------------


@pytest.mark.parametrize(
    "uri", ["/etc/passwd", "file:///etc/hostname", "/proc/self/environ", "http://127.0.0.1:9/x.png"]
)
def test_a_manifest_cannot_make_a_worker_read_outside_its_root(tmp_path, uri):
    manifest = tmp_path / "list.jsonl"
    manifest.write_text(json.dumps({"id": "x", "uri": uri}) + "\n")
    ((record,),) = [list(read_unit(unit)) for unit in list_units(str(manifest))]
    assert record["data"] is None and "--allow-uri-prefix" in record["error"]


def test_one_size_cap_and_no_devices_for_every_read(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(ImageDecodeError, match="over 1000 bytes"):
        read_bytes(str(big), max_bytes=1000)
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        read_bytes("/dev/zero")


def test_symbolic_links_in_a_folder_are_read_inside_and_refused_outside(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.png").write_bytes(png_bytes(1))
    (folder / "inside.png").symlink_to(folder / "a.png")
    (folder / "outside.png").symlink_to("/etc/hostname")
    records = {r["image_id"]: r for unit in list_units(str(folder)) for r in read_unit(unit)}
    assert sorted(records) == ["a.png", "inside.png", "outside.png"]  # no image silently skipped
    assert records["inside.png"]["data"] == png_bytes(1)
    assert records["outside.png"]["data"] is None and "links outside" in records["outside.png"]["error"]


# -- 7. smaller findings --------------------------------------------------------------------------


def test_a_sidecar_caption_parquet_of_the_wrong_shape_is_named_in_a_warning(tmp_path, caplog):
    write_shard(tmp_path / "00000.tar", {"k0": png_bytes(1)}, {})
    pq.write_table(pa.table({"name": ["k0"]}), tmp_path / "00000.parquet")
    (record,) = [r for unit in list_units(str(tmp_path / "00000.tar")) for r in read_unit(unit)]
    assert record["caption"] is None and "00000.parquet" in caplog.text and "no key and caption" in caplog.text


@pytest.mark.parametrize("command", ["query", "report", "compare"])
def test_a_catalog_that_does_not_exist_is_an_error(tmp_path, capsys, command):
    missing = str(tmp_path / "nope")
    argv = {
        "query": ["query", missing, "SELECT 1"],
        "report": ["report", missing, "--out", str(tmp_path / "r.html")],
        "compare": ["compare", missing, "--base", "a", "--new", "b"],
    }[command]
    assert main(argv) == 2
    assert f"no catalog at {missing}" in capsys.readouterr().err


@pytest.mark.parametrize(("name", "text"), [("bad.toml", "invmm = {"), ("bad.yaml", "a: [1,"), ("bad.json", "{")])
def test_a_broken_configuration_file_is_one_line(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match="not a readable configuration file"):
        load_config(tmp_path / name)


def test_truncated_safetensors_are_refused_at_start_up(tiny_sd_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd_dir, broken)
    weights = next((broken / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="not a whole safetensors file"):
        require_safe_weights(broken, allow_pickle=False)


def test_two_checkpoints_in_folders_of_the_same_name_get_different_slugs():
    assert model_slug("/a/ckpt", "0123456789ab") == "ckpt-01234567"
    assert model_slug("/b/ckpt", "fedcba987654") == "ckpt-fedcba98"


def test_queries_cannot_read_duckdbs_spills_and_stop_at_their_time_limit(tmp_path):
    _one_row_catalog(tmp_path)
    catalog = Catalog(tmp_path)
    temp = catalog.query("SELECT current_setting('temp_directory') AS t").to_pylist()[0]["t"]
    assert not temp.startswith(os.getcwd()) and "memray-duckdb-" in temp
    with pytest.raises(CatalogQueryError, match="time limit"):
        catalog.query("SELECT count(*) FROM range(100000000000) AS a(x) WHERE x % 7 = 3", timeout=0.5)


def test_nul_and_control_characters_in_captions_never_reach_the_page(tmp_path):
    from memray.report.html import write_report

    with CatalogWriter(tmp_path / "c") as writer:
        caption = "a cat\x00<script>\x07"
        writer.add(
            [
                AuditRow(
                    image_id="x",
                    model="m",
                    status="ok",
                    audited_at="2026-11-01",
                    caption=caption,
                    verdict="memorized",
                    invmm_kl=0.0,
                    invmm_replicated=True,
                )
            ]
        )
    page = write_report(str(tmp_path / "c"), str(tmp_path / "r.html"))
    html = open(page).read()
    assert "\x00" not in html and "\x07" not in html and "<script>\ufffd" not in html
    assert "a cat\ufffd&lt;script&gt;\ufffd" in html
