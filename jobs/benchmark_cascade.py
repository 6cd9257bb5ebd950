"""The cascade against InvMM on every image: cost, recall, and the recall a run states about itself.

    python jobs/benchmark_cascade.py                                  # demo set and a 2,000-image LAION-shaped set
    python jobs/benchmark_cascade.py --sets demo --settings caption   # a part of it
    python jobs/benchmark_cascade.py --truth-of ROWS.parquet          # the graded truth of a kept run's judged negatives
    python jobs/benchmark_cascade.py --sweep start_check.steps 4 6 8  # the screen alone at each value of a setting

On the shipped demo set InvMM runs on every image too (both the counting verdict and the
reference's all-K evidence), and the cascade's stage 2 reuses those rows; on the LAION-shaped set
(memray.evaluation.laion, written to --laion if missing) only the cascade runs, and InvMM's cost
on every image is estimated from the calibration sample. The benchmark: memray.evaluation.cascade.
"""

from memray.evaluation.cascade import main

if __name__ == "__main__":
    raise SystemExit(main())
