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
    assert sum(ds["draft_length_hist"].values()) > 0
    for png in ("speedup.png", "acceptance.png", "time_split.png"):
        assert (out / png).stat().st_size > 1000
    assert "| diffuspec |" in (out / "results.md").read_text()
