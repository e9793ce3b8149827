#!/usr/bin/env bash
# The one prepared command of a session with a GPU (tools/gpu_check.py says what it measures). On this workplace's
# GPU machine (Python 3.12, torch, transformers, no megatron-core, no network) carry .whl/ (see docs/performance.md)
# and run it from the repository root: `bash tools/gpu_check.sh`; everything goes to $OUT (default runs/gpu_check).
# About 5 minutes on one H100, install included; `bash tools/gpu_check.sh --cpu-dry-run` runs the CPU's share.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}
python=${PYTHON:-python3}
mkdir -p "$out"
if ! "$python" -c "import megatron.core" 2>/dev/null; then
    ls .whl/*.whl >/dev/null 2>&1 || { echo "gpu_check: megatron-core is not installed and no .whl/ was carried" >&2; exit 2; }
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu_check_site .whl/*.whl \
        || { echo "gpu_check: installing the carried wheels failed" >&2; exit 2; }
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,power.draw --format=csv > "$out/nvidia-smi.csv" 2>&1
timeout 350 "$python" tools/gpu_check.py "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
