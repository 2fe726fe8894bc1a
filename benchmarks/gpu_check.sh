#!/usr/bin/env bash
# One GPU check that fits a 10-minute window on a lent H100/H200, run from the repository
# root (on a device machine: run(command="bash benchmarks/gpu_check.sh", timeout_s=600)):
#
#   1. the Triton kernels' tests, natively (no interpreter): tests/triton_interpreted.py;
#   2. the kernel microbenchmarks at V = 152064 (torch reference vs Triton, B 1..64, k 8..32);
#   3. the engine on CUDA with the embedded pair (benchmarks/gpu_engine.py): greedy exactness
#      against plain decoding in float32 with kernels "auto" (Triton) and "reference", bf16 speed,
#      and a float32 batch sweep.
#
# Nothing is downloaded: the machine's own torch/transformers/triton/numba are used, and
# diffuspec is put on the path from this checkout (no install). Everything lands in
# ${OUT:-gpu_check_out}/: gpu_check.json (the summary), the microbenchmark's results.json and
# results.md, and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
# The three import names of this checkout, without installing it.
SHIM=$(mktemp -d)
ln -s "$PWD/diffuspec" "$SHIM/diffuspec"
ln -s "$PWD/kernels" "$SHIM/diffuspec_kernels"
ln -s "$PWD/vllm_plugin" "$SHIM/diffuspec_vllm"
export PYTHONPATH="$SHIM:$PWD/benchmarks:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
LOG="$OUT/gpu_check.log"
: > "$LOG"
step() { echo "== $*" | tee -a "$LOG"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
$PY -c "import torch, triton, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

STEPS=${STEPS:-123}  # which of the steps to run, e.g. STEPS=13 for a rerun that skips the microbenchmarks
TESTS_RC=0 BENCH_RC=0 ENGINE_RC=0
if [[ $STEPS == *1* ]]; then
step "1. Triton kernel tests (native)"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/triton_interpreted.py 2>&1 | tee -a "$LOG" | tail -3
TESTS_RC=${PIPESTATUS[0]}
fi

if [[ $STEPS == *2* ]]; then

step "2. kernel microbenchmarks, V=152064"
timeout 130 $PY benchmarks/kernels.py --device cuda --vocab 152064 --batch 1,8,64 --k 8,32 --repeats 10 \
    --out "$OUT" 2>&1 | tee -a "$LOG" | tail -14
BENCH_RC=${PIPESTATUS[0]}
fi

if [[ $STEPS == *3* ]]; then

step "3. engine on CUDA, embedded pair"
timeout 200 $PY benchmarks/gpu_engine.py --device cuda --out "$OUT" 2>&1 | grep -v "Loading weights" | tee -a "$LOG"
ENGINE_RC=${PIPESTATUS[0]}
fi

step "summary"
$PY - "$OUT" "$TESTS_RC" "$BENCH_RC" "$ENGINE_RC" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out, tests, bench, engine = Path(sys.argv[1]), *map(int, sys.argv[2:])
summary = {"tests_rc": tests, "bench_rc": bench, "engine_rc": engine}
try:
    import torch
    summary["device"] = torch.cuda.get_device_name()
except Exception as exc:
    summary["device"] = repr(exc)
if (out / "results.json").is_file():
    rows = json.loads((out / "results.json").read_text())["rows"]
    summary["kernels"] = [{k: r[k] for k in ("vocab", "batch", "k", "reference_total_ms", "kernels_total_ms",
                                             "same_paths")} | {"speedup": r["speedup"]} for r in rows]
if (out / "engine.json").is_file():
    summary["engine"] = json.loads((out / "engine.json").read_text())
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
print(json.dumps({k: v for k, v in summary.items() if k != "kernels"}, indent=1))
PYEOF
rm -rf "$SHIM"
[ "$TESTS_RC" = 0 ] && [ "$BENCH_RC" = 0 ] && [ "$ENGINE_RC" = 0 ]
