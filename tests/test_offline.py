"""The offline job (``diffuspec generate --input --output``): on two Ray Data replicas its
results equal in-process generation, and a job killed half-way and run again writes every
prompt exactly once. Each job is the real command in its own process (with its own local
Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from diffuspec import DiffuSpec


@pytest.fixture(scope="module")
def in_process():
    return DiffuSpec.from_pretrained()


def _job(tmp_path, prompts, out, *extra, wait=True):
    inp = tmp_path / "prompts.jsonl"
    inp.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    cmd = [sys.executable, "-m", "diffuspec.cli", "generate", "--input", str(inp), "--output", str(out),
           "--max-new-tokens", "32", *extra]
    if not wait:
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    return run


def _lines(out):
    return [json.loads(line) for line in out.read_text().splitlines() if line.strip()]


def test_offline_job_on_two_replicas_equals_in_process(tmp_path, in_process):
    prompts = [f"def task_{i}(x):\n    return x * {i}" if i % 2 else f"Tell me one fact about the number {i}."
               for i in range(20)]
    out = tmp_path / "results.jsonl"
    _job(tmp_path, prompts, out, "--replicas", "2")
    rows = _lines(out)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(20))
    want = {f"p{i}": r.token_ids for i, r in enumerate(in_process.generate(prompts, max_new_tokens=32))}
    assert {r["id"]: r["token_ids"] for r in rows} == want
    assert all("tau" in r["stats"] for r in rows)


def test_offline_job_interrupted_and_rerun(tmp_path, in_process):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(12)]
    out = tmp_path / "results.jsonl"
    proc = _job(tmp_path, prompts, out, "--config", "max_batch_size=2", wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and (not out.is_file() or len(out.read_text().splitlines()) < 4):
        time.sleep(0.2)
    proc.kill()
    proc.wait()
    partial = len(_lines(out))
    assert 0 < partial < 12, "the job was not interrupted half-way"
    with open(out, "a") as fh:
        fh.write('{"id": "p')  # a line cut off by the crash
    _job(tmp_path, prompts, out)
    rows = _lines(out)
    assert sorted(r["id"] for r in rows) == sorted(f"p{i}" for i in range(12))  # each exactly once
    want = {f"p{i}": r.token_ids for i, r in enumerate(in_process.generate(prompts, max_new_tokens=32))}
    assert {r["id"]: r["token_ids"] for r in rows} == want
