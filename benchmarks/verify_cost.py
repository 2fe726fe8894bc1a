"""Measure the target's verify cost T_verify(n) for n = 1..N new tokens on this machine.

On a CPU, verifying n tokens costs more as n grows well before it does on a GPU; the ADL
bounds (k_min, k_max) are chosen from this curve. Writes JSON with the machine described.

    python benchmarks/verify_cost.py --out benchmarks/results/verify_cost_cpu.json
    python benchmarks/verify_cost.py --target PATH   # another target (default: the embedded one)

With ``--table OUT.json`` it writes instead the step-cost table of the cost-aware
draft-length policy (``diffuspec.cost``): verify times by (rows, tokens per row) and proposal
times by (rows, k) for the embedded pair (or ``--target``/``--drafter``), for the batch
sizes of ``--rows``; pass it to the engine as ``cost_table=OUT.json``:

    python benchmarks/verify_cost.py --table benchmarks/results/cost_table_cpu.json --rows 1,2,4,8,16,32,64

The target is loaded in float32, as the engine runs it on a CPU (a checkpoint's config may
say bfloat16, which an AVX2 CPU emulates several times slower).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffuspec.assets import embedded_pair
from hardware import machine_info


def main() -> None:
    from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from diffuspec.target import TargetRunner

    ap = argparse.ArgumentParser()
    ap.add_argument("--target", help="model folder; default: the embedded target (a random Qwen2 of its shape "
                                     "when the install has no embedded pair)")
    ap.add_argument("--context", type=int, default=256, help="tokens already in the KV cache")
    ap.add_argument("--max-n", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out")
    ap.add_argument("--table", help="write the cost-aware policy's step-cost table here instead (see above)")
    ap.add_argument("--rows", default="1,2,4,8,16,32,64", help="batch sizes of --table")
    ap.add_argument("--drafter", help="drafter folder of --table (default: the embedded one)")
    args = ap.parse_args()
    if args.table:
        return write_table(args)
    torch.manual_seed(0)
    pair = embedded_pair()
    target = args.target or (str(pair[0]) if pair else None)
    if target:
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    else:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=8192, hidden_size=512, intermediate_size=1408,
                                             num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                             tie_word_embeddings=True, max_position_embeddings=4096)).eval()
    params = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    runner = TargetRunner(model, 1, args.context + args.max_n + 2)
    with torch.inference_mode():
        runner.forward(torch.randint(0, vocab, (1, args.context)), torch.tensor([0]))
        sizes = range(1, args.max_n + 1)
        inputs = {n: torch.randint(0, vocab, (1, n)) for n in sizes}
        for n in sizes:  # warm-up
            runner.forward(inputs[n], torch.tensor([args.context]))
        times: dict[int, list[float]] = {n: [] for n in sizes}
        for _ in range(args.repeats):  # sizes interleaved, so a slow spell of the machine hits them all alike
            for n in sizes:
                t = time.perf_counter()
                runner.forward(inputs[n], torch.tensor([args.context]))
                times[n].append(time.perf_counter() - t)
        rows = [{"n": n, "median_ms": 1e3 * statistics.median(times[n]), "min_ms": 1e3 * min(times[n])} for n in sizes]
        for row in rows:
            print(f"n={row['n']:3d}  {row['median_ms']:7.2f} ms  ({row['median_ms'] / rows[0]['median_ms']:.2f}x)")
    result = {"machine": machine_info(), "target": target or "random Qwen2 8 layers, hidden 512, vocab 8192",
              "params": params, "context": args.context, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


def write_table(args) -> None:
    from diffuspec import DiffuSpec
    from diffuspec.cost import CostModel, CostTable

    pair = embedded_pair()
    ds = DiffuSpec.from_pretrained(args.target or pair[0], args.drafter or pair[1])
    model = CostModel(ds.target, ds.engine.proposer, profile=True)
    model.path = Path(args.table)  # written here, not into the cache folder, and measured afresh
    model.table = CostTable(model.key, machine=machine_info())
    for rows in (int(r) for r in args.rows.split(",")):
        model.ensure(rows)
        print(f"rows {rows}: verify " + " ".join(f"{w}:{1e3 * t:.1f}" for w, t in model.table.verify[rows].items())
              + " ms; propose " + " ".join(f"{k}:{1e3 * t:.1f}" for k, t in model.table.propose[rows].items()) + " ms")
    model.table.save(args.table)


if __name__ == "__main__":
    main()
