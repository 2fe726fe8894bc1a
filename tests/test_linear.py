"""The few-row form of the target's linear layers (diffuspec.linear): same products, used only
where measured faster, and greedy decoding through it stays equal to transformers' own."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import OracleDrafter, hf_greedy

from diffuspec import DiffuSpecConfig, SamplingParams, linear
from diffuspec.drafters import load_drafter
from diffuspec.engine import SpeculativeEngine


@pytest.mark.parametrize("bias", [False, True])
def test_few_row_linear_is_the_same_product(bias):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(7, 5, generator=gen)
    b = torch.randn(7, generator=gen) if bias else None
    x = torch.randn(2, 3, 5, generator=gen)
    out = linear.few_row_linear(x, w, b)
    assert out.shape == (2, 3, 7)
    torch.testing.assert_close(out, F.linear(x, w, b))


def _count_few_row_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = linear.few_row_linear

    def counting(x, w, b):
        calls.append(x.numel() // x.shape[-1])
        return real(x, w, b)

    monkeypatch.setattr(linear, "few_row_linear", counting)
    return calls


def test_mode_takes_the_few_row_form_up_to_its_limit(monkeypatch):
    calls = _count_few_row_calls(monkeypatch)
    layer = torch.nn.Linear(5, 7)
    with linear.FewRowLinear(4):
        layer(torch.randn(1, 4, 5))   # 4 rows: the few-row form
        layer(torch.randn(5, 5))      # 5 rows: the usual form
        torch.relu(torch.randn(3))    # anything else runs as usual
    layer(torch.randn(2, 5))          # outside the mode: the usual form
    assert calls == [4]


def test_limit_is_measured_once_and_cached_on_disk(monkeypatch, tiny_target, tmp_path):
    model, _ = tiny_target
    monkeypatch.setenv("DIFFUSPEC_CACHE", str(tmp_path))
    measured = []
    monkeypatch.setattr(linear, "measure_limit", lambda m: measured.append(m) or 6)
    monkeypatch.delitem(linear._limits, model, raising=False)
    assert linear.few_row_limit(model) == 6 and linear.few_row_limit(model) == 6
    assert len(measured) == 1
    [saved] = (tmp_path / "costs").glob("few-rows-*.json")
    assert json.loads(saved.read_text()) == {"limit": 6}
    del linear._limits[model]  # a new process: read from disk, not measured again
    assert linear.few_row_limit(model) == 6 and len(measured) == 1
    assert linear.few_row_mode(model, 1) is None       # one token: nothing to gain
    assert isinstance(linear.few_row_mode(model, 6), linear.FewRowLinear)
    assert linear.few_row_mode(model, 7) is None       # past the measured limit: no mode, no cost
    assert linear.few_row_limit(torch.nn.Linear(3, 3)) == 0 and len(measured) == 1  # not a causal LM


def test_measured_limit_is_on_the_grid(tiny_target):
    model, _ = tiny_target
    assert linear.measure_limit(model, rows_grid=(2, 4), repeats=1) in (0, 2, 4)


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("kind", ["oracle-corrupt", "dream"])
def test_greedy_stays_exact_in_the_few_row_form(monkeypatch, tiny_target, tiny_pair, kind, batch):
    """With every pass of up to 64 tokens in the few-row form (verify passes and plain steps
    over several rows), speculative and plain greedy outputs equal transformers' generate()."""
    model, tok = tiny_target
    monkeypatch.setitem(linear._limits, model, 64)
    calls = _count_few_row_calls(monkeypatch)
    drafter = OracleDrafter(model, tok.mask_token_id, corrupt=True) if kind == "oracle-corrupt" \
        else load_drafter(tiny_pair[1])
    prompts = [tok(p)["input_ids"] for p in ["def f(x):", "import os\nimport sys", "x", "for i in range(3):"][:batch]]
    new = 20
    for d in (drafter, None):
        engine = SpeculativeEngine(model, d, DiffuSpecConfig(), None, emit_vocab=model.config.vocab_size)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=new))
        assert [o.token_ids for o in outs] == [hf_greedy(model, p, new, None) for p in prompts], d
    assert calls  # the form was in use
