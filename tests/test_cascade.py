"""The cascade end to end: images read again from their screen rows, and the two stages on a real
local Ray into a real catalog over a LAION-shaped set of the demo model (whose memorization is
known): every image screened, the flagged and a calibration sample confirmed, the selection table
and the views, resume, and `memray confirm` asking for more."""

from __future__ import annotations

import io
import tarfile

import pytest
from conftest import png_bytes, tiny_flags

from memray.catalog.cascade import cascade_summary
from memray.catalog.reader import Catalog
from memray.cli import main
from memray.data.images import sha256_hex
from memray.data.readers.located import read_located
from memray.evaluation.laion import write_laion_set
from memray.report.html import render_report

pytest_plugins = ["s3server"]


def _shard(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_an_image_is_read_again_by_one_ranged_read_and_only_if_unchanged(tmp_path):
    data = png_bytes(3)
    _shard(tmp_path / "00000.tar", {"a.png": png_bytes(1), "b.png": data})
    with tarfile.open(tmp_path / "00000.tar") as tar:
        member = tar.getmember("b.png")
    located = dict(
        image_id="00000.tar/b",
        image_sha256=sha256_hex(data),
        source=f"{tmp_path}/00000.tar#b",
        source_offset=member.offset_data,
        source_length=member.size,
        caption="a cat",
        url="https://example.org/b.png",
        selected_by="calibration",
    )
    allowed = (str(tmp_path),)
    again = read_located(located, allowed)
    assert again["data"] == data and again["error"] is None
    assert (again["caption"], again["url"], again["selected_by"]) == (
        "a cat",
        "https://example.org/b.png",
        "calibration",
    )
    # without a byte range (a compressed shard), the member is found by reading its container
    assert read_located({**located, "source_offset": None, "source_length": None}, allowed)["data"] == data
    # the bytes changed since the screen: an error record, never another image's verdict
    changed = read_located({**located, "image_sha256": sha256_hex(b"other")}, allowed)
    assert changed["data"] is None and "changed since the screen" in changed["error"]
    # a row pointing outside what the run could read is refused before any read
    outside = read_located({**located, "source": "/etc/passwd", "source_offset": 0, "source_length": 10}, allowed)
    assert outside["data"] is None and "outside the sources" in outside["error"]
    (tmp_path / "loose.png").write_bytes(data)
    plain = {**located, "source": str(tmp_path / "loose.png"), "source_offset": None, "source_length": None}
    assert read_located(plain, allowed)["data"] == data


@pytest.mark.slow
def test_the_cascade_screens_every_image_confirms_the_selection_and_states_its_recall(tmp_path, capsys):
    shards = tmp_path / "laion"
    write_laion_set(str(shards), 64, shard_size=32, copies=2)
    catalog = str(tmp_path / "catalog")
    # the demo model; a tiny InvMM budget (the screen keeps its defaults), a calibration sample of 3
    model = [
        "--model",
        "demo",
        "--cpus-per-actor",
        "0.5",
        *tiny_flags(),
        "--set",
        "similarity.null_samples=16",
        "--set",
        'measures=["invmm","uncond_replication"]',
    ]
    flags = ["--catalog", catalog, "--cascade", "on", "--calibration-min", "3", "--screen-slots", "16", *model]
    # fmt: skip
    assert main(["audit", f"{shards}/{{00000..00001}}.tar", *flags]) == 0
    out = capsys.readouterr().out
    assert "cascade run" in out and "screen recall" in out

    audits = Catalog(catalog).query("SELECT image_id, stage, selected_by, status FROM audits").to_pylist()
    screened = {r["image_id"] for r in audits if r["stage"] == "screen"}
    confirmed = {r["image_id"]: r["selected_by"] for r in audits if r["stage"] == "confirm"}
    assert len(screened) == 60  # 64 rows minus 4 failed downloads; the 2 truncated JPEGs are error rows
    assert sum(r["status"] == "error" for r in audits if r["stage"] == "screen") == 2
    selection = Catalog(catalog).query("SELECT image_id, flagged, selected_by FROM selections").to_pylist()
    assert {r["image_id"] for r in selection} == {
        r["image_id"] for r in audits if r["stage"] == "screen" and r["status"] == "ok"
    }
    chosen = {r["image_id"]: r["selected_by"] for r in selection if r["selected_by"]}
    assert confirmed == chosen and list(chosen.values()).count("calibration") == 3
    assert all(r["selected_by"] == "screen" for r in selection if r["flagged"])
    # planted copies the demo model memorized are flagged and confirmed memorized
    view = Catalog(catalog).query("SELECT image_id, flagged, verdict, confirmed_verdict FROM cascade").to_pylist()
    assert any(r["confirmed_verdict"] == "memorized" for r in view)
    latest = Catalog(catalog).query("SELECT image_id, stage FROM latest").to_pylist()
    assert {r["image_id"] for r in latest if r["stage"] == "confirm"} == set(chosen)  # a confirmed row outranks
    summary = cascade_summary(Catalog(catalog))
    assert summary.screened == 58 and summary.flagged_confirmed == summary.flagged
    assert summary.calibration_confirmed == 3 and summary.recall.recall is not None

    # a rerun does no new work in either stage
    assert main(["audit", f"{shards}/{{00000..00001}}.tar", *flags]) == 0
    assert Catalog(catalog).query("SELECT count(*) AS n FROM audits").column("n")[0].as_py() == len(audits)

    # stage 2 on request, from the catalog alone: the two cleared images of the newest run closest to their bar
    newest = "SELECT run_id FROM selections ORDER BY created_at DESC, run_id DESC LIMIT 1"  # the rerun's selection
    cleared = sorted(
        (r for r in Catalog(catalog).query("SELECT image_id, screen_progress, selected_by, flagged FROM selections "
                                           f"WHERE run_id = ({newest})").to_pylist()
         if not r["selected_by"] and not r["flagged"]),
        key=lambda r: -r["screen_progress"],
    )  # fmt: skip
    assert main(["confirm", catalog, "--top", "2", *model]) == 0
    requested = Catalog(catalog).query("SELECT image_id FROM audits WHERE selected_by = 'request'").column("image_id")
    assert set(requested.to_pylist()) == {r["image_id"] for r in cleared[:2]}
    assert cascade_summary(Catalog(catalog)).requested == 2
    page = render_report(catalog)  # the report states the run's recall too
    assert 'id="cascade"' in page and "screen recall" in page
