"""The evaluation library on what ships with it: the demo set's classes, the LAION-shaped set's labels and the early stop's calibration traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from memray.catalog.schema import AuditRow
from memray.demo import read_demo_manifest, trained_demo_manifest
from memray.evaluation import early_stop
from memray.evaluation.cascade import CascadeOutcome, laion_set, progress_by_kind, seen_counts, write_rows
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
