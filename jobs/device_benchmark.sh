#!/usr/bin/env bash
# The real-size throughput table on one GPU, in under 8 minutes with start-up: SD 1.5 and SD 2.1 networks
# with random weights (bf16, and SD 1.5 in fp32), and the demo set's verdicts in bf16 against fp32 with
# the early stop and the slot occupancy.
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
# Slots sized to fit: InvMM's step is slots x 16 samples forward and backward at 512 px (SD 1.5) or
# 768 px (SD 2.1); the peak memory lines say how far each size could grow. Each line has its own
# time limit, so the table always comes back within the device time.
timeout 150 python3 jobs/benchmark_throughput.py --arch sd15 --precision bf16 --slots 4 --steps 4 --repeats 5 || true
timeout 120 python3 jobs/benchmark_throughput.py --arch sd21 --precision bf16 --slots 2 --steps 3 --repeats 3 || true
timeout 90 python3 jobs/benchmark_throughput.py --arch sd15 --precision fp32 --slots 2 --steps 2 --repeats 3 --unet-only || true
timeout 150 python3 jobs/calibrate_early_stop.py confirm --device cuda --precision bf16 --against fp32 \
    --settings unknown --traces jobs/calibration/demo-traces-300-steps.json || true
