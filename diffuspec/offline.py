"""Offline jobs: a JSONL of prompts in, a JSONL of results out, resumable, on Ray Data.

``diffuspec generate --input prompts.jsonl --output results.jsonl [--replicas N]
[--ray-address ADDR]`` runs :func:`run_job`. Each output line is one prompt's result: its
id, prompt, text, token ids, finish reason and statistics. Lines are appended (and flushed)
as results arrive, so a crash, an interrupted job or a killed replica loses at most the
prompts in flight; running the same command again skips every id already in the output
(a last line cut off mid-write is dropped first), so no prompt is produced twice.

With Ray installed (and more than one replica, or a cluster address), the prompts go
through a Ray Data pipeline: ``map_batches`` over a pool of N actors, each holding a
DiffuSpec replica (one CPU each, or one GPU each on a GPU cluster). Without Ray the same
job runs in this process, batch by batch.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


def completed_ids(output: Path) -> set:
    """The ids already written to ``output``, after cutting a last line left half-written."""
    if not output.is_file():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line cut off by a crash: drop it
        with open(output, "r+b") as fh:
            fh.truncate(end)
    done = set()
    for i, line in enumerate(data[:end].splitlines()):
        if line.strip():
            try:
                done.add(json.loads(line)["id"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{str(output)!r} line {i + 1} is not a result line of this command; pass a new "
                                 "--output file or remove that line") from None
    return done


@dataclass
class _Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: object


def result_record(row: dict, result) -> dict:
    return {"id": row["id"], "prompt": row["prompt"], "text": result.text, "token_ids": result.token_ids,
            "finish_reason": result.finish_reason, "stats": result.stats.as_dict()}


class _Replica:
    """One DiffuSpec in a Ray Data actor: a batch of prompts in, a batch of result lines out."""

    def __init__(self, load: dict, sampling: dict) -> None:
        import torch

        from .api import DiffuSpec
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1") or 1)))
        self.ds = DiffuSpec.from_pretrained(**load)
        self.sampling = sampling

    def __call__(self, batch: dict) -> dict:
        rows = [{"id": json.loads(i), "prompt": p} for i, p in zip(batch["id_json"], batch["prompt"])]
        results = self.ds.generate([r["prompt"] for r in rows], **self.sampling)
        return {"line": [json.dumps(result_record(r, res)) for r, res in zip(rows, results)]}


def run_job(rows: list[dict], output: str | Path, load: dict, sampling: dict, replicas: int = 1,
            ray_address: str | None = None, batch_size: int = 8, log: Callable = print) -> int:
    """Generate every row of ``rows`` ({"id", "prompt"}) not yet in ``output``; returns how
    many were written. ``load``: DiffuSpec.from_pretrained's arguments; ``sampling``:
    generate()'s."""
    output = Path(output)
    ids = [r["id"] for r in rows]
    repeated = sorted({json.dumps(i) for i in ids if ids.count(i) > 1})
    if repeated:
        raise ValueError(f"prompt ids must be unique for a resumable job; repeated: {repeated[:5]}")
    done = completed_ids(output)
    todo = [r for r in rows if r["id"] not in done]
    if done:
        log(f"[diffuspec] {len(done)} prompts already in {output}; {len(todo)} to go")
    if not todo:
        return 0
    try:
        import ray  # noqa: F401
        use_ray = replicas > 1 or ray_address is not None
    except ImportError:
        if replicas > 1 or ray_address is not None:
            log("[diffuspec] Ray is not installed (pip install 'diffuspec[ray]'): running in this process")
        use_ray = False
    written = 0
    with open(output, "a", encoding="utf-8") as out:
        def write(line: str) -> None:
            nonlocal written
            out.write(line + "\n")
            out.flush()
            written += 1

        if use_ray:
            for line in _ray_lines(todo, load, sampling, replicas, ray_address, batch_size, log):
                write(line)
        else:
            from tqdm import tqdm

            from .api import DiffuSpec
            from .stats import GenerationStats
            ds = DiffuSpec.from_pretrained(**load)
            tokens: dict[int, list[int]] = {}
            texts: dict[int, str] = {}
            with tqdm(total=len(todo), desc="generate", unit="prompt", disable=None) as bar:
                # continuous batching over the whole job; a prompt's line is written when it finishes
                for i, delta in ds.stream_batch([r["prompt"] for r in todo], **sampling):
                    tokens.setdefault(i, []).extend(delta.token_ids)
                    texts[i] = texts.get(i, "") + delta.text
                    if delta.finish_reason is not None:
                        result = _Result(texts.pop(i), tokens.pop(i), delta.finish_reason,
                                         delta.stats or GenerationStats())
                        write(json.dumps(result_record(todo[i], result)))
                        bar.update(1)
    return written


def _ray_lines(todo, load, sampling, replicas, ray_address, batch_size, log):
    import ray
    from tqdm import tqdm

    from .remote import _check_address
    _check_address(ray_address)
    if not ray.is_initialized():
        ray.init(address=ray_address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cluster = ray.cluster_resources()
    gpu = cluster.get("GPU", 0) >= replicas and load.get("device") not in ("cpu",)
    # leave Ray Data's own tasks some CPU: on a small machine a replica takes a share of a core
    cpus = min(1.0, cluster.get("CPU", 1) / (replicas + 1))
    items = [{"id_json": json.dumps(r["id"]), "prompt": r["prompt"]} for r in todo]
    data = ray.data.from_items(items).map_batches(
        _Replica, fn_constructor_kwargs={"load": load, "sampling": sampling}, batch_size=batch_size,
        concurrency=replicas, num_gpus=1 if gpu else 0, num_cpus=0 if gpu else cpus, batch_format="numpy")
    log(f"[diffuspec] {len(todo)} prompts on {replicas} Ray replicas ({'GPU' if gpu else 'CPU'} each)")
    with tqdm(total=len(todo), desc="generate", unit="prompt", disable=None) as bar:
        for row in data.iter_rows():
            yield row["line"]
            bar.update(1)
