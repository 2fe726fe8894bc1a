#!/usr/bin/env bash
# One GPU check that fits a 10-minute window on a lent H100/H200, run from the repository
# root (on a device machine: run(command="bash benchmarks/gpu_check.sh", timeout_s=600)):
#
#   1. the Triton kernels' tests, natively (no interpreter): tests/triton_interpreted.py;
#   2. the kernel microbenchmarks at V = 152064 (torch reference vs Triton, B 1..64, k 8..32);
#   3. the engine on CUDA with the embedded pair: greedy exactness against plain decoding,
#      tokens/s and τ, with kernels="auto" (Triton) and "reference".
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

step "1. Triton kernel tests (native)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/triton_interpreted.py 2>&1 | tee -a "$LOG" | tail -3
TESTS_RC=${PIPESTATUS[0]}

step "2. kernel microbenchmarks, V=152064"
timeout 200 $PY benchmarks/kernels.py --device cuda --vocab 152064 --batch 1,4,16,64 --k 8,16,32 --repeats 20 \
    --out "$OUT" 2>&1 | tee -a "$LOG" | tail -14
BENCH_RC=${PIPESTATUS[0]}

step "3. engine on CUDA, embedded pair"
timeout 150 $PY - "$OUT/engine.json" <<'PYEOF' 2>&1 | tee -a "$LOG"
import json, sys, time
import torch
from diffuspec import DiffuSpec

prompts = ["def fibonacci(n):\n", "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n",
           "import numpy as np\n\ndef normalize(x):\n", "class Stack:\n    def __init__(self):\n",
           "Write a short story about a lighthouse keeper.", "Explain what a hash table is."]
out = {}
for kernels in ("auto", "reference"):
    ds = DiffuSpec.from_pretrained(device="cuda", kernels=kernels)
    ds.generate(prompts[0], max_new_tokens=16)  # warm-up: kernels compile, CUDA context
    ds.generate(prompts[0], max_new_tokens=16, speculate=False)
    chosen = ds._engine(True).proposer.kernels(torch.device("cuda"))
    row = {"kernels": chosen.name if chosen is not None else "reference"}
    for speculate in (False, True):
        torch.cuda.synchronize()
        t = time.perf_counter()
        res = [ds.generate(p, max_new_tokens=128, speculate=speculate)[0] for p in prompts]
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        n = sum(len(r.token_ids) for r in res)
        rounds = sum(r.stats.rounds for r in res)
        row["spec" if speculate else "plain"] = {"tokens": n, "seconds": dt, "tok_s": n / dt, "tau": n / rounds,
                                                 "ids": [r.token_ids for r in res],
                                                 "search_ms_per_round": 1e3 * sum(r.stats.time_search for r in res) / rounds}
    row["exact"] = row["spec"]["ids"] == row["plain"]["ids"]
    row["speedup"] = row["spec"]["tok_s"] / row["plain"]["tok_s"]
    for part in ("spec", "plain"):
        del row[part]["ids"]
    out[kernels] = row
    print(kernels, json.dumps(row))
json.dump(out, open(sys.argv[1], "w"), indent=1)
PYEOF
ENGINE_RC=${PIPESTATUS[0]}

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
