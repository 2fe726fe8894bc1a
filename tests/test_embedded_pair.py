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


def test_new_rows_encode_their_prompts_apart():
    """A row new to the drafter's prefix cache (a prompt admitted into a running batch) has
    it filled in a pass over such rows alone when it first drafts (PathProposer.catch_up):
    the round's drafter pass over the whole batch then feeds each row only its newest tokens
    and masks, instead of padding every row to the new prompt's length, and its
    distributions are those of a pass that encodes the whole prompt at once (in float32: an
    int8 drafter quantizes each pass's activations with their own scale). Rows the policy
    does not draft for never pay for it. Outputs stay those of plain decoding."""
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
    widths = []
    with torch.inference_mode():
        cold = drafter.draft(tokens, lengths, k, None, proposer.new_state(len(prompts), cap).drafter)
        state = proposer.new_state(len(prompts), cap)
        hook = drafter.net.register_forward_pre_hook(lambda m, args: widths.append(tuple(args[0].shape)))
        try:
            assert proposer.catch_up(tokens, lengths, state, behind=8) > 0
            assert state.drafter.cached.tolist() == (lengths - 1).tolist()  # all but the newest token
            assert proposer.catch_up(tokens, lengths, state, behind=8) == 0.0  # nothing new: no pass
            warm = drafter.draft(tokens, lengths, k, None, state.drafter)
            # two rows move on: one by 3 tokens (a round's worth), one by 20 (rounds without drafts)
            longer = torch.cat([tokens, torch.randint(5, 100, (len(prompts), 20))], dim=1)
            ahead = lengths + torch.tensor([3, 20, 0, 0])
            proposer.catch_up(longer, ahead, state, behind=8)
        finally:
            hook.remove()
    assert widths == [(4, int(lengths.max())), (4, 1 + 6), (1, 19 + 1)]  # prefixes + 1 mask; the far row alone
    # the round's pass cached every row's prefix; the catch-up took the far row to its newest token
    assert state.drafter.cached.tolist() == [lengths[0], ahead[1] - 1, lengths[2], lengths[3]]
    assert torch.allclose(warm, cold, atol=1e-3)

    calls = {"propose": [], "catch_up": []}  # (rows, columns fed) of every drafter pass of the rounds
    for name in calls:
        def wrapped(*args, _real=getattr(proposer, name), _log=calls[name], **kw):
            hook = drafter.net.register_forward_pre_hook(lambda m, a: _log.append(tuple(a[0].shape)))
            try:
                return _real(*args, **kw)
            finally:
                hook.remove()
        setattr(proposer, name, wrapped)
    spec = ds.generate(ds.tokenizer.batch_decode(prompts), max_new_tokens=40)
    plain = ds.generate(ds.tokenizer.batch_decode(prompts), max_new_tokens=40, speculate=False)
    assert [r.token_ids for r in spec] == [r.token_ids for r in plain]
    cols = [c for _, c in calls["propose"]]
    assert cols and max(cols) <= 2 * 6 + 1  # at most k + 1 new tokens, then k masks
    assert any(rows == 2 for rows, _ in calls["propose"])  # passes over the running batch took place
    assert sum(rows for rows, _ in calls["catch_up"]) == len(prompts)  # each prompt once, in passes apart


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
