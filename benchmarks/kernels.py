"""Time the proposal half's stages per call: reference vs kernels (diffuspec_kernels).

For each vocabulary V, batch B and draft length k: the lattice build over [B, k, V]
log-probs, the online proxy's upkeep for a round (reference: the refit over every row's
whole context; kernels: the incremental update with the round's new tokens), and the path
search (beam 3, λ 0.5, order-3 proxy; with the embedded corpus table when V is its
vocabulary). Medians of --repeats calls after a warm-up; the sizes interleave, so a slow
spell of the machine hits every one alike.

    python benchmarks/kernels.py --out benchmarks/results/kernels_cpu      # CPU: reference vs compiled
    python benchmarks/kernels.py --device cuda --out ...                   # GPU: torch reference vs Triton

Writes results.json (the machine described) and results.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import diffuspec_kernels
from diffuspec.assets import embedded_proxy_table
from diffuspec.config import CPSConfig, LatticeConfig
from diffuspec.cps import search_path
from diffuspec.lattice import build_lattice
from diffuspec.proxy import CausalProxy, FlatNGram, NGramModel, OnlineNGram
from hardware import machine_info, machine_line

CONTEXT = 512     # tokens per row before the round
NEW = 8           # tokens a round adds per row
CTX_VOCAB = 600   # context tokens are drawn below this: repeated n-grams, as in real text


def workload(gen, b, k, vocab, device):
    """Peaked drafter distributions (a few candidates a position, as DLM drafts have),
    each row's context and its tail."""
    scale = torch.empty(b, k, 1).uniform_(2.0, 9.0, generator=gen)
    logits = torch.randn(b, k, vocab, generator=gen) * scale
    hot = torch.randint(0, CTX_VOCAB, (b, k, 4), generator=gen)  # the likely tokens come from the context's words
    logits.scatter_(2, hot, logits.max(-1, keepdim=True).values + torch.rand(b, k, 4, generator=gen) * 3)
    logq = logits.log_softmax(-1).to(device)
    ctx = torch.randint(0, CTX_VOCAB, (b, CONTEXT + NEW + 2), generator=gen)
    lengths = torch.full((b,), CONTEXT + NEW)
    tail = ctx[:, CONTEXT + NEW - 2: CONTEXT + NEW]
    return logq, torch.full((b,), k, device=device), ctx.to(device), lengths, tail.to(device)


def timed(fn, repeats, sync) -> float:
    fn()
    out = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return 1e3 * statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", default="1,4,16,64")
    ap.add_argument("--k", default="8,16,32")
    ap.add_argument("--vocab", default="8192,152064")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kernels = diffuspec_kernels.select("triton" if device.type == "cuda" else "compiled", device)
    table = NGramModel.load(embedded_proxy_table())
    lat_cfg, cps = LatticeConfig(), CPSConfig()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for vocab in map(int, args.vocab.split(",")):
        corpus = table if vocab == table.vocab_size else None
        corpus_k = kernels.prepare_table(FlatNGram.from_model(corpus), device) if corpus is not None else None
        for b in map(int, args.batch.split(",")):
            for k in map(int, args.k.split(",")):
                logq, kk, ctx, lengths, tail = workload(gen, b, k, vocab, device)
                lattice = build_lattice(logq, kk, 2, lat_cfg)
                lattice_k = kernels.build_lattice(logq, kk, 2, lat_cfg)
                # the round's state: contexts counted up to the round's new tokens
                online = OnlineNGram(3, vocab, b)
                online.update(ctx, lengths - NEW, kernels.add_ngrams)
                fitted = CausalProxy(NGramModel.fit(ctx, lengths.to(device), 3, vocab), corpus, 0.5)

                def ref_proxy():
                    NGramModel.fit(ctx, lengths.to(device), 3, vocab)

                clones = []

                def ker_proxy():
                    state = clones.pop() if clones else copy.deepcopy(online)
                    state.update(ctx, lengths, kernels.add_ngrams)
                    kernels.prepare_table(state.flat(), device)

                after = copy.deepcopy(online)
                after.update(ctx, lengths, kernels.add_ngrams)
                proxy_k = diffuspec_kernels.ProxyInputs(kernels.prepare_table(after.flat(), device), corpus_k, 0.5)
                n = max(3, args.repeats if b * k * vocab < 2e8 else 3)
                clones.extend(copy.deepcopy(online) for _ in range(n + 2))
                ref = {"lattice": timed(lambda: build_lattice(logq, kk, 2, lat_cfg), n, sync),
                       "proxy": timed(ref_proxy, n, sync),
                       "search": timed(lambda: search_path(lattice, fitted, tail, cps), n, sync)}
                ker = {"lattice": timed(lambda: kernels.build_lattice(logq, kk, 2, lat_cfg), n, sync),
                       "proxy": timed(ker_proxy, n, sync),
                       "search": timed(lambda: kernels.search_path(lattice_k, proxy_k, tail, cps), n, sync)}
                same = torch.equal(search_path(lattice, fitted, tail, cps).cpu(),
                                   kernels.search_path(lattice_k, proxy_k, tail, cps).cpu())
                row = {"vocab": vocab, "batch": b, "k": k, "corpus_table": corpus is not None,
                       "reference_ms": ref, "kernels_ms": ker, "same_paths": same,
                       "reference_total_ms": sum(ref.values()), "kernels_total_ms": sum(ker.values())}
                row["speedup"] = {s: ref[s] / ker[s] for s in ref} | {"total": row["reference_total_ms"] /
                                                                    row["kernels_total_ms"]}
                rows.append(row)
                print(f"V={vocab:6d} B={b:2d} k={k:2d}  " + "  ".join(
                    f"{s} {ref[s]:7.2f}->{ker[s]:6.2f} ms" for s in ref) + f"  total x{row['speedup']['total']:.1f}"
                    + ("" if same else "  PATHS DIFFER"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"machine": machine_info(), "device": str(device), "kernels": kernels.name, "context": CONTEXT,
              "new_tokens": NEW, "repeats": args.repeats, "rows": rows,
              "command": "python benchmarks/kernels.py " + " ".join(
                  f"--{a} {v}" for a, v in vars(args).items() if v is not None and a != "out")}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Proposal-half stages per call: reference vs {kernels.name} ({device})", "",
             f"Machine: {machine_line()}. Context {CONTEXT} tokens a row, {NEW} new a round; medians.", "",
             "| V | B | k | lattice ms (ref → kernel) | proxy ms | search ms | total ms | total speedup | same paths |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ref, ker = r["reference_ms"], r["kernels_ms"]
        lines.append(f"| {r['vocab']} | {r['batch']} | {r['k']} | " + " | ".join(
            f"{ref[s]:.2f} → {ker[s]:.2f}" for s in ("lattice", "proxy", "search")) +
            f" | {r['reference_total_ms']:.2f} → {r['kernels_total_ms']:.2f} | {r['speedup']['total']:.1f}× | "
            f"{'yes' if r['same_paths'] else 'NO'} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out}/results.json and results.md")


if __name__ == "__main__":
    main()
