#!/usr/bin/env bash
# The real-size throughput table on one GPU, in under 8 minutes with start-up: SD 1.5 and SD 2.1 networks
# with random weights (bf16, and SD 1.5 in fp32 for the ratio), the demo model's InvMM loop, and the
# demo set's verdicts in bf16 against fp32 with the early stop and the slot occupancy.
#
#   bash jobs/device_benchmark.sh            # from the repository root, on a machine with CUDA torch
#
# A machine without diffusers gets it from wheels in .whl/ (pure Python; `pip download --no-deps
# diffusers==<the version in pyproject's lock>` on a machine with an index, into .whl/).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 jobs/benchmark_throughput.py --arch sd15 sd21 demo --precision bf16 --slots 8 --steps 4 --repeats 5
python3 jobs/benchmark_throughput.py --arch sd15 --precision fp32 --slots 8 --steps 2 --repeats 3
python3 jobs/calibrate_early_stop.py confirm --device cuda --precision bf16 --against fp32
