#!/usr/bin/env bash
# The GPU path checked in one command: scripts/gpu_check.py's parts, then `pytest -m gpu`.
#
#   bash scripts/gpu_check.sh                         # a GPU machine: at most 10 minutes on one GPU
#   bash scripts/gpu_check.sh --device cpu --quick    # every part on the CPU, in a few minutes (CI)
#   bash scripts/gpu_check.sh --out DIR               # where the report goes (default: gpu-check/)
#
# Arguments are passed to scripts/gpu_check.py (see its --help). The exit status is non-zero when
# any part or any gpu test failed. Run from a checkout with the project installed (pip install -e .).
set -uo pipefail
cd "$(dirname "$0")/.."
export FLWR_TELEMETRY_ENABLED=0

out="gpu-check"
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    if [[ "${args[i]}" == "--out" ]]; then out="${args[i + 1]}"; fi
done

python scripts/gpu_check.py "$@"
checks=$?
# The gpu-marked tests: skipped (and said so) on a machine without CUDA.
python -m pytest -m gpu -q -rs tests/test_gpu.py 2>&1 | tee "$out/pytest-gpu.txt"
tests=${PIPESTATUS[0]}
echo "[gpu-check] scripts/gpu_check.py exit $checks; pytest -m gpu exit $tests; report in $out/"
if ((checks != 0 || tests != 0)); then exit 1; fi
