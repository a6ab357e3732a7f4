#!/usr/bin/env bash
# Every GPU check in one command, within 8 minutes of device time: the `cuda`-marked tests, the
# kernel tables for 8192x8192 (single calls, then CUDA-graph replays without the host's launch
# cost; each ends with the kernel targets, met or not), and the engine's decode throughput on int4
# weights beside the same engine on bf16 weights (1, 8 and 32 requests, 0 and 4 adapters).
#
#   bash benchmarks/cuda.sh [LOGDIR] [--tune]
#
# Each stage has its own time limit, so one that hangs does not cost the others; each writes its
# log to LOGDIR (default ./cuda-logs): env.txt, tests.log, tables.log, graphs.log, engine.log.
# `--tune` then regenerates this GPU's tuned kernel table into LOGDIR/tuned (not within the 8
# minutes; copy the file into kernels/tuned/ to use it). It runs a copy of the checkout named
# `quadapt` (the root is the package), so it needs no install, whatever the checkout is called.
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
stage tests 150 python3 -P -m pytest -m cuda -q -p no:cacheprovider "${workers[@]}" \
    tests/test_kernels.py tests/test_kernel_layout.py tests/test_decode_graphs.py
stage tables 70 python3 benchmarks/kernel_tables.py --quick
stage graphs 70 python3 benchmarks/kernel_tables.py --quick --cuda-graphs
stage engine 180 python3 benchmarks/cuda_engine.py --layers 4 --new-tokens 64 --runs 3
[ "${2:-}" = --tune ] && stage tune 1200 python3 -m quadapt.kernels.tune --out "$logs/tuned"
exit $status
