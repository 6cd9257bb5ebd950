"""Does memray find the images a demo model memorized, and leave the others alone?

    python jobs/benchmark_demo.py --budget cpu                 # the shipped demo model and demo set
    python jobs/benchmark_demo.py --model DIR/model --manifest DIR/images/manifest.jsonl

The benchmark: memray.evaluation.demo_benchmark.
"""

from memray.evaluation.demo_benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
