"""The evaluation library on what ships with it: the demo set's classes and the early stop's calibration traces."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from memray.demo import read_demo_manifest, trained_demo_manifest
from memray.evaluation import early_stop
from memray.evaluation.demo_benchmark import classes
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
