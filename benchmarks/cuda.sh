#!/usr/bin/env bash
# Every GPU check in one command: the `cuda`-marked tests, the kernel tables (single calls, then
# CUDA-graph replays without the host's launch cost), the tiling sweep.
#
#   bash benchmarks/cuda.sh [LOGDIR] [--no-sweep]
#
# Each stage has its own time limit, so one that hangs does not cost the others; each writes its
# log to LOGDIR (default ./cuda-logs). It runs a copy of the checkout named `quadapt` (the root is
# the package), so it needs no install, whatever the checkout's directory is called.
set -uo pipefail
logs=$(mkdir -p "${1:-cuda-logs}" && cd "${1:-cuda-logs}" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
copy=$(mktemp -d)
cp -r "$root" "$copy/quadapt"
rm -rf "$copy/quadapt/.git"
cd "$copy/quadapt"
export PYTHONPATH="$copy${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$logs/env.txt"

status=0
stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to LOGDIR/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -eq 0 ] || status=1
}

workers=()
python3 -c "import xdist" 2>/dev/null && workers=(-n 8)
stage tests 90 python3 -m pytest -m cuda -q -p no:cacheprovider "${workers[@]}" tests/test_kernels.py
stage tables 140 python3 benchmarks/kernel_tables.py
stage graphs 90 python3 benchmarks/kernel_tables.py --quick --cuda-graphs
[ "${2:-}" = --no-sweep ] || stage sweep 220 python3 benchmarks/kernel_tables.py --sweep
exit $status
