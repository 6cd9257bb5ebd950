"""Cost benchmark: UNet forwards/backwards and wall time per image, per measure group, at a preset.

    python jobs/benchmark_cost.py --preset reference --images 2

The benchmark: memray.evaluation.cost.
"""

from memray.evaluation.cost import main

if __name__ == "__main__":
    raise SystemExit(main())
