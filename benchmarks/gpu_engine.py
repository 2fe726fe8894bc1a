"""The engine on one device with the embedded pair: exactness and speed, for a lent GPU.

    python benchmarks/gpu_engine.py --device cuda --out DIR       # benchmarks/gpu_check.sh step 3
    python benchmarks/gpu_engine.py --device cpu --max-new-tokens 16 --out /tmp/x   # dry run

Three parts, each written to DIR/engine.json as soon as it ends (a timeout keeps the parts done):

1. ``exact``: float32, batch 1, kernels "auto" and "reference": each prompt's speculative
   greedy output against plain decoding through the same engine (token equality).
2. ``bf16``: the default CUDA dtype, batch 1, kernels "auto": tokens/s with and without
   speculation, τ, and the search's share (bf16 is not batch-invariant, so no exactness claim).
3. ``batch``: float32, kernels "auto", the prompts at several batch sizes: throughput with and
   without speculation, and greedy equality of every batch's outputs with batch-1 plain decoding.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffuspec import DiffuSpec
from hardware import machine_info

PROMPTS = ["def fibonacci(n):\n", "def is_prime(n):\n    \"\"\"Return True if n is prime.\"\"\"\n",
           "import numpy as np\n\ndef normalize(x):\n", "class Stack:\n    def __init__(self):\n",
           "Write a short story about a lighthouse keeper.", "Explain what a hash table is.",
           "def binary_search(items, target):\n", "def merge_sort(xs):\n    \"\"\"Sort a list.\"\"\"\n",
           "Give three tips for writing clear emails.", "def count_words(text):\n",
           "class Node:\n    def __init__(self, value):\n", "Summarise the rules of chess in a paragraph."]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(ds: DiffuSpec, prompts: list[str], batch: int, speculate: bool, max_new: int, device: torch.device):
    """Generate ``prompts`` in batches of ``batch``: (outputs' ids, seconds, rounds, search seconds)."""
    sync(device)
    t = time.perf_counter()
    res = []
    for i in range(0, len(prompts), batch):
        res += ds.generate(prompts[i:i + batch], max_new_tokens=max_new, speculate=speculate)
    sync(device)
    dt = time.perf_counter() - t
    return [r.token_ids for r in res], dt, sum(r.stats.rounds for r in res), sum(r.stats.time_search for r in res)


def speed(ds, prompts, batch, max_new, device) -> dict:
    row = {"batch": batch}
    for speculate in (False, True):
        ids, dt, rounds, search = timed(ds, prompts, batch, speculate, max_new, device)
        n = sum(map(len, ids))
        row["spec" if speculate else "plain"] = {"tokens": n, "seconds": round(dt, 3), "tok_s": round(n / dt, 1),
                                                 "tokens_per_round": round(n / max(rounds, 1), 2),
                                                 "search_share": round(search / dt, 4)}
        row["ids_spec" if speculate else "ids_plain"] = ids
    row["speedup"] = round(row["spec"]["tok_s"] / row["plain"]["tok_s"], 3)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,4,12")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"machine": machine_info(), "max_new_tokens": args.max_new_tokens}

    def save() -> None:
        (out / "engine.json").write_text(json.dumps(result, indent=1))

    def warm(ds) -> None:  # CUDA context, caches, and Triton's compiles for the draft lengths a run reaches
        for speculate in (True, False):
            ds.generate(PROMPTS[:2], max_new_tokens=args.max_new_tokens, speculate=speculate)

    # 1. exactness, float32, batch 1, both kernel implementations
    result["exact"] = {}
    for kernels in ("auto", "reference"):
        ds = DiffuSpec.from_pretrained(device=device, dtype="float32", kernels=kernels)
        warm(ds)
        chosen = ds._engine(True).proposer.kernels(device)
        row = speed(ds, PROMPTS[:6], 1, args.max_new_tokens, device)
        row["kernels"] = chosen.name if chosen is not None else "reference"
        row["mismatched_prompts"] = [i for i, (a, b) in enumerate(zip(row.pop("ids_spec"), row.pop("ids_plain")))
                                     if a != b]
        result["exact"][kernels] = row
        print("exact", kernels, json.dumps(row), flush=True)
        save()
        del ds

    # 2. bf16 speed, batch 1
    ds = DiffuSpec.from_pretrained(device=device, kernels="auto")
    warm(ds)
    row = speed(ds, PROMPTS[:6], 1, args.max_new_tokens, device)
    row["dtype"] = str(next(ds.target.parameters()).dtype)
    row["spec_equals_plain"] = row.pop("ids_spec") == row.pop("ids_plain")
    result["bf16"] = row
    print("bf16", json.dumps(row), flush=True)
    save()
    del ds

    # 3. batch sweep, float32
    ds = DiffuSpec.from_pretrained(device=device, dtype="float32", kernels="auto")
    warm(ds)
    reference = None
    result["batch"] = []
    for b in [int(x) for x in args.batch_sizes.split(",")]:
        row = speed(ds, PROMPTS, b, args.max_new_tokens, device)
        if reference is None and b == 1:
            reference = row["ids_plain"]
        ids_spec, ids_plain = row.pop("ids_spec"), row.pop("ids_plain")
        if reference is not None:
            row["spec_equals_batch1_plain"] = ids_spec == reference
            row["plain_equals_batch1_plain"] = ids_plain == reference
        result["batch"].append(row)
        print("batch", json.dumps(row), flush=True)
        save()


if __name__ == "__main__":
    main()
