"""Throughput of the distributed audit: images/h and UNet evaluations/s per actor, catalog writes/s.

    python jobs/benchmark_pipeline.py --images 16 --actors 1 2 --preset quick

The benchmark: memray.evaluation.pipeline_benchmark.
"""

from memray.evaluation.pipeline_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
