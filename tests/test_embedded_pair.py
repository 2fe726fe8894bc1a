"""The shipped pair: loads from package data, also from a non-editable install, and is exact."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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


def test_admitted_rows_encode_their_prompts_apart():
    """A prompt admitted into a running batch has its drafter prefix cache filled in a pass
    of its own (PathProposer.warm): the next round's drafter pass over the whole batch then
    feeds each row only its newest tokens and masks, instead of padding every row to the
    new prompt's length, and its distributions are those of a pass that encodes the whole
    prompt at once (in float32: an int8 drafter quantizes each pass's activations with
    their own scale). Outputs stay those of plain decoding."""
    ds = DiffuSpec.from_pretrained(max_batch_size=2, drafter_int8=False, adl="fixed", k_init=6)
    proposer, drafter = ds.engine.proposer, ds.drafter
    prompts = [ds.tokenizer(t)["input_ids"] for t in
               ("def add(a, b):\n", "import os\n\n\ndef list_files(path):\n    " * 4, "x = 1\n", "class Stack:\n")]
    lengths = torch.tensor([len(p) for p in prompts])
    tokens = torch.zeros(len(prompts), int(lengths.max()), dtype=torch.int64)
    for j, p in enumerate(prompts):
        tokens[j, : len(p)] = torch.tensor(p)
    k = torch.full((len(prompts),), 6)
    cap = tokens.shape[1] + 16
    with torch.inference_mode():
        cold = drafter.draft(tokens, lengths, k, None, proposer.new_state(len(prompts), cap).drafter)
        state = proposer.new_state(0, cap)
        state.extend(proposer.warm(tokens, lengths, cap))
        assert state.drafter.cached.tolist() == (lengths - 1).tolist()  # all but the newest token
        widths = []
        hook = drafter.net.register_forward_pre_hook(lambda m, args: widths.append(args[0].shape[1]))
        try:
            warm = drafter.draft(tokens, lengths, k, None, state.drafter)
        finally:
            hook.remove()
    assert widths == [1 + 6]  # the newest token and the masks
    assert torch.allclose(warm, cold, atol=1e-3)

    calls = []  # (rows, columns fed) of every drafter pass of the rounds
    real_propose = proposer.propose

    def propose(tokens, lengths_cpu, k_cpu, state=None):
        hook = drafter.net.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
        try:
            return real_propose(tokens, lengths_cpu, k_cpu, state)
        finally:
            hook.remove()

    proposer.propose = propose
    spec = ds.generate(ds.tokenizer.batch_decode(prompts), max_new_tokens=40)
    plain = ds.generate(ds.tokenizer.batch_decode(prompts), max_new_tokens=40, speculate=False)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    assert calls and max(cols for _, cols in calls) <= 2 * 6 + 1  # at most k + 1 new tokens, then k masks
    assert any(rows == 2 for rows, _ in calls)  # passes over the running batch took place


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
