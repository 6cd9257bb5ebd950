"""What an InvMM audit costs on this machine: UNet throughput, FLOP utilisation, images per hour, memory.

    python jobs/benchmark_throughput.py --arch demo                      # the shipped demo model (CPU: a minute)
    python jobs/benchmark_throughput.py --arch demo sd15 sd21 --precision bf16 --slots 8    # on a GPU

The benchmark: memray.evaluation.throughput.
"""

from memray.evaluation.throughput import main

if __name__ == "__main__":
    raise SystemExit(main())
