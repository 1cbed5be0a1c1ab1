#!/usr/bin/env bash
# The GPU checks of one short session on a CUDA machine, in order of importance: correctness
# (the CUDA-only tests: fused attention kernels on hardware, CUDA graphs, device-independent
# masks), then host overhead per call, then the GPT-2-small training-step benchmark (eager,
# then compiled).  Each step runs under its own time limit, so one slow step cannot take the
# others' results with it; logs and JSON go to $OUT (default /tmp/dropkit-gpu-checks).
#
# Usage: OUT=DIR bash benchmarks/gpu_checks.sh [STEP ...]
#        (steps: info graphs fused tests devices overhead eager compiled; all by default)
set -u
OUT=${OUT:-/tmp/dropkit-gpu-checks}
mkdir -p "$OUT"
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
export PYTHONPATH="$ROOT/src:$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
STEPS=${*:-info graphs fused tests devices overhead eager compiled}

step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date -u +%H:%M:%S)"
    local started=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "--- $name: exit $? after $((SECONDS - started)) s"
    tail -n "${TAIL:-30}" "$OUT/$name.log"
}

for name in $STEPS; do
    case $name in
    info)
        nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
        $PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
        ;;
    graphs)
        TAIL=60 step graphs "${GRAPHS_LIMIT:-150}" $PYTHON -m pytest -q -rA --tb=short -p no:cacheprovider \
            tests/test_cuda_graphs.py
        ;;
    fused)
        # The fused-attention cases run by the worker directly: its JSON report keeps each
        # failure's traceback even if the step is cut off later.
        TAIL=5 step fused "${FUSED_LIMIT:-240}" $PYTHON -m tests.test_attention_fused cuda "$OUT/fused.json"
        $PYTHON - "$OUT/fused.json" <<'PY'
import json, sys
report = json.load(open(sys.argv[1]))
bad = {name: r for name, r in report.items() if r.get("error")}
print(f"fused attention on the GPU: {len(report) - len(bad)} of {len(report)} cases passed")
for name, result in bad.items():
    print(f"FAILED {name}:", result["error"][-1500:])
PY
        ;;
    tests)
        TAIL=40 step tests "${TESTS_LIMIT:-120}" $PYTHON -m pytest -q -rA --tb=short -p no:cacheprovider \
            tests/test_attention.py tests/test_transformer.py -k cuda
        ;;
    devices)
        step devices "${DEVICES_LIMIT:-90}" $PYTHON benchmarks/check_cuda.py --json "$OUT/check_cuda.json"
        ;;
    overhead)
        step overhead "${OVERHEAD_LIMIT:-60}" $PYTHON benchmarks/bench_triton.py --sizes 1M --dtypes float32 \
            --repeats 5 --skip-check --launch-overhead
        ;;
    eager)
        step eager "${EAGER_LIMIT:-120}" $PYTHON benchmarks/bench_transformer.py --device cuda --repeats 7 \
            --no-compile --output "$OUT/bench_transformer_eager.json"
        ;;
    compiled)
        step compiled "${COMPILED_LIMIT:-300}" $PYTHON benchmarks/bench_transformer.py --device cuda --repeats 7 \
            --output "$OUT/bench_transformer.json"
        ;;
    *)
        echo "unknown step $name" >&2
        exit 2
        ;;
    esac
done
