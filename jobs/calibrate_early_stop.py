"""Calibrate InvMM's early stop and check gate against full-budget runs on a demo model.

    python jobs/calibrate_early_stop.py collect --steps 300 --out traces.json    # full budget, every check traced
    python jobs/calibrate_early_stop.py analyze traces.json                      # agreement and cost per rule
    python jobs/calibrate_early_stop.py confirm --traces traces.json             # the defaults, run for real

jobs/calibration/demo-traces-300-steps.json: `collect --steps 300` on the shipped demo model.
The calibration: memray.evaluation.early_stop.
"""

from memray.evaluation.early_stop import main

if __name__ == "__main__":
    raise SystemExit(main())
