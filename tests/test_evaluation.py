"""The evaluation library on what ships with it: the demo set's classes, the LAION-shaped set's labels and the early stop's calibration traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import png_bytes, tiny_budgets

from memray.auditing.runner import audit
from memray.catalog.schema import AuditRow
from memray.data.records import ImageInput
from memray.demo import read_demo_manifest, trained_demo_manifest
from memray.evaluation import early_stop
from memray.evaluation.cascade import (
    CascadeOutcome,
    Labelled,
    cost_floor,
    detection_line,
    laion_set,
    progress_by_kind,
    screen_detection,
    seen_counts,
    sweep_screen,
    write_rows,
)
from memray.evaluation.demo_benchmark import classes
from memray.evaluation.laion import read_truth, write_laion_set
from memray.measures.invmm import TRACE_COLUMNS

TRACES = str(Path(__file__).resolve().parents[1] / "jobs" / "calibration" / "demo-traces-300-steps.json")


@pytest.fixture(scope="module")
def traces() -> dict:
    with open(TRACES) as handle:
        return json.load(handle)


def test_the_demo_set_has_the_documented_classes():
    positive, negative, borderline = classes(read_demo_manifest(trained_demo_manifest()))
    assert (positive.sum(), negative.sum()) == (4, 41)  # docs/demo-model.md
    assert borderline == ["planted-x1024-0023", "planted-x6144-0028"]


def test_the_laion_shaped_set_labels_each_image_with_what_training_did_with_it_and_keeps_rows_with_it(tmp_path):
    write_laion_set(str(tmp_path / "set"), 64, shard_size=32, copies=2)
    truth = {row["key"]: row for row in read_truth(str(tmp_path / "set"))}
    labelled = laion_set(str(tmp_path / "set"), with_caption=True)
    assert len(labelled) == 60  # 64 rows less 4 failed downloads (the 2 truncated JPEGs fail when decoded)
    for x in labelled:
        row = truth[x.item.image_id.rsplit("/", 1)[-1]]
        assert x.split == row["split"]
        if row["split"] == "planted":
            assert x.copies == row["duplicates"] > 0
        elif row["split"] == "normal":
            assert 1 <= x.copies <= 4 and x.truth == "unmeasured"
        else:  # held-out scenes and hard negatives were never trained on
            assert x.copies == 0 and not x.trained and x.truth == "negative"

    normal = [x for x in labelled if x.split == "normal"]
    once, twice = [x for x in normal if x.copies == 1][:2], [x for x in normal if x.copies == 2][:1]
    assert seen_counts(once + twice + once[:1]) == f"3 seen once{', 1 seen 2x' if twice else ''}"
    assert seen_counts([]) == ""

    screened = [AuditRow(x.item.image_id, stage="screen", status="ok") for x in labelled]
    for k, row in enumerate(screened):
        row.screen_progress = k / len(screened)  # 0 to 59/60
    lines = progress_by_kind(labelled, screened, flags=(0.5,))
    kinds = {line.split(" (")[0].strip(): line for line in lines[1:]}
    assert set(kinds) <= {"heldout", "normal", "hard", "planted positive", "planted borderline", "planted negative"}
    counted = sum(int(line.split("(")[1].split(")")[0]) for line in kinds.values())
    reaching = sum(int(line.rsplit(": ", 1)[1]) for line in kinds.values())
    assert (counted, reaching) == (60, 30)  # every image in one kind; 30 of 60 at 0.5 or above
    confirmed = {labelled[0].item.image_id: AuditRow(labelled[0].item.image_id, stage="confirm", verdict="memorized")}
    outcome = CascadeOutcome(screened, {labelled[0].item.image_id: "calibration"}, confirmed, None, None, {})
    write_rows(tmp_path / "rows.parquet", labelled, outcome)
    kept = pq.read_table(tmp_path / "rows.parquet").to_pylist()
    assert len(kept) == len(labelled) + 1
    assert kept[-1]["selected_by"] == "calibration" and kept[-1]["truth_split"] == labelled[0].split
    assert [r["truth_copies"] for r in kept[:-1]] == [x.copies for x in labelled]


def test_analyze_reproduces_the_calibration_of_the_default_early_stop(traces, capsys):
    assert early_stop.main(["analyze", TRACES, "--after", "100", "--gap", "0", "--progress", "0.25"]) == 0
    printed = capsys.readouterr().out.splitlines()
    default = [line.split() for line in printed if "progress 0.25" in line]
    # docs/throughput.md: the default rule agrees with the full runs, at 0.041 and 0.036 of the reference's cost
    assert default == [
        ["after", "100", "progress", "0.25", "100.0%", "6/6", "3687", "0.041", "0.573"],
        ["after", "100", "progress", "0.25", "100.0%", "5/5", "3261", "0.036", "0.500"],
    ]


def test_a_trace_with_the_later_columns_replays_as_its_first_four(traces):
    entries = traces["settings"]["unknown"]
    invmm = traces["config"]["invmm"]
    rule = early_stop.progress_rule(100, 0.25)
    extended = [dict(e, trace=[[*check, 1.0, 4.0] for check in e["trace"]]) for e in entries]
    assert len(extended[0]["trace"][0]) == len(TRACE_COLUMNS)  # as `collect` writes them now
    replayed = [early_stop.replay(e, invmm, rule) for e in entries]
    assert [early_stop.replay(e, invmm, rule) for e in extended] == replayed
    assert np.mean([f + b for _, f, b in replayed]) == pytest.approx(3261, abs=0.5)


def _row(image_id, stage, forwards, backwards=0, verdict=None):
    return AuditRow(
        image_id, stage=stage, status="ok", unet_forwards=forwards, unet_backwards=backwards, verdict=verdict
    )


def test_the_cost_floor_is_the_screen_the_calibration_sample_and_the_memorized_images_alone():
    screen = [_row(f"i{k}", "screen", 80) for k in range(10)] + [AuditRow("bad", stage="screen", status="error")]
    stage2 = {
        "i0": _row("i0", "confirm", 1000, 500, "memorized"),  # flagged, memorized: the floor pays for it
        "i1": _row("i1", "confirm", 1000, 500, "not_memorized"),  # flagged in vain: the floor does not
        "i2": _row("i2", "confirm", 900, 400, "memorized"),  # the calibration sample's: paid once, as a sample
        "i3": _row("i3", "confirm", 800, 300, "not_memorized"),
    }
    selected = {"i0": "screen", "i1": "screen", "i2": "calibration", "i3": "calibration"}
    outcome = CascadeOutcome(screen, selected, stage2, None, None, {})
    assert cost_floor(outcome, 10) == pytest.approx((80.0, (1300 + 1100) / 10, (800 + 2400 + 1500) / 10))
    # where InvMM ran on every image, its verdicts say which images the floor confirms, found by the screen or not
    everyone = {**stage2, "i5": _row("i5", "full", 700, 0, "memorized")}
    outcome = CascadeOutcome(screen, selected, stage2, None, everyone, {})
    assert cost_floor(outcome, 10)[2] == pytest.approx((800 + 2400 + 1500 + 700) / 10)


def test_detection_names_the_weakest_image():
    line = detection_line("the positives", {"a": 1.0, "b": 0.25, "c": 0.5}, 16)
    assert line == "  screen detection over 16 seeds of the positives (3): expected recall 0.583, lowest 0.25 (b)"


def test_screen_detection_draws_every_seed_afresh(tiny_sd):
    config = tiny_budgets().replace(start_check={"noises": 2, "steps": 2, "guidance_scales": [2.0]})
    items = [ImageInput(f"i{k}", data=png_bytes(40 + k), caption="a red circle") for k in range(6)]
    once = screen_detection(tiny_sd, items, config.replace(start_check={"flag_progress": -1e9}), 1)
    assert once == {f"i{k}": 1.0 for k in range(6)}
    # a flag in the middle of the images' progress: with the same noises every draw, each image would be
    # flagged always or never; fresh seeds flag some of them only sometimes
    progress = sorted(r.screen_progress for r in audit(items, tiny_sd, config.screen_config(), replicas=0))
    middle = config.replace(start_check={"flag_progress": progress[3]})
    detection = screen_detection(tiny_sd, items, middle, 4)
    assert set(detection) == {f"i{k}" for k in range(6)}
    assert any(0 < p < 1 for p in detection.values())


def test_a_sweep_screens_every_image_at_each_value_and_counts_what_it_flags_by_kind(tiny_sd):
    config = tiny_budgets().replace(start_check={"noises": 2, "steps": 2, "guidance_scales": [2.0]})
    labelled = [
        Labelled(ImageInput(f"p{k}", data=png_bytes(60 + k), caption="a red circle"), "positive", "planted", 64)
        for k in range(2)
    ] + [Labelled(ImageInput("n0", data=png_bytes(70), caption="a blue square"), "negative", "heldout", 0)]
    lines = list(sweep_screen(tiny_sd, labelled, config, "start_check.steps", ["1", "2"], draws=1))
    assert len(lines) == 4  # a line per value, and its detection line
    # a pilot at the one scale and 2 counted noises, each guided (2 evaluations a step): 6 forwards a step
    assert lines[0].startswith("  start_check.steps=1: 6 UNet forwards per image; flagged positives ")
    assert lines[2].startswith("  start_check.steps=2: 12 UNet forwards per image; flagged positives ")
    assert "never-trained " in lines[0] and "/1 (" in lines[0] and "borderline" not in lines[0]
    assert lines[1].startswith("    screen detection over 1 seeds of the positives (2): expected recall ")
