"""The shipped pair: loads from package data, also from a non-editable install, and is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from diffuspec import DiffuSpec
from diffuspec.assets import embedded_pair, embedded_proxy_table

ROOT = Path(__file__).resolve().parent.parent


def test_embedded_pair_is_exact_and_drafts_well():
    assert embedded_pair() is not None and embedded_proxy_table() is not None
    ds = DiffuSpec.from_pretrained()
    assert ds.config.proxy_table == str(embedded_proxy_table())
    assert ds.drafter.prefix_cache  # a prefix-causal drafter: exact cache
    prompts = ["def fibonacci(n):\n", "import os\n\n\ndef list_files(path):\n", "class Stack:\n"]
    spec = ds.generate(prompts, max_new_tokens=48)
    plain = ds.generate(prompts, max_new_tokens=48, speculate=False)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert sum(r.stats.new_tokens for r in spec) / sum(r.stats.rounds for r in spec) > 1.5  # drafts get accepted


def test_package_size_budget():
    pair = ROOT / "diffuspec" / "pair"
    assert sum(f.stat().st_size for f in pair.rglob("*") if f.is_file()) <= 60_000_000
    for name in ("target", "drafter"):
        card = (pair / name / "README.md").read_text()
        assert "parameters" in card and "License" in card


def test_non_editable_install_carries_the_pair(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-q",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    code = ("import json, diffuspec; from diffuspec import DiffuSpec; ds = DiffuSpec.from_pretrained(); "
            "[a] = ds.generate('def add(a, b):', max_new_tokens=12); "
            "[b] = ds.generate('def add(a, b):', max_new_tokens=12, speculate=False); "
            "print(json.dumps({'file': diffuspec.__file__, 'same': a.token_ids == b.token_ids}))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["file"].startswith(str(target)) and res["same"]


@pytest.mark.parametrize("missing", ["config.json", "model.safetensors"])
def test_checkpoint_missing_files(tmp_path, missing):
    import shutil
    target, drafter = embedded_pair()
    broken = tmp_path / "drafter"
    shutil.copytree(drafter, broken)
    (broken / missing).unlink()
    with pytest.raises(ValueError, match="missing|no config.json|no \\*.safetensors"):
        DiffuSpec.from_pretrained(target, broken)
