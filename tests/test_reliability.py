"""Faults and hostile input: batch invariance, unsafe or damaged checkpoints, a misbehaving drafter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import RandomDrafter, hf_greedy
from safetensors.torch import load_file, save_file

from diffuspec import DiffuSpec, DiffuSpecConfig, SamplingParams
from diffuspec.drafters import DiffusionDrafter, load_drafter
from diffuspec.drafters.base import DrafterState
from diffuspec.engine import SpeculativeEngine
from diffuspec.proxy import NGramModel

TEXTS = ["def fibonacci(n):", "import os\nimport sys\n", "x", "for i in range(10):\n    print(", "class A:",
         "    return self._data", "# Copyright (c) Python", "if __name__ == '__main__':", "with open(p) as f:",
         "raise ValueError(", "x = [i * i for i in", "def __repr__(self):", "while True:", "try:\n    import numpy",
         "print(", "lambda x:"]


def test_engine_is_batch_invariant(tiny_pair):
    """A prompt's greedy output is the same alone and inside ragged batches of 2, 5 and 16 with
    different neighbours (and different draft lengths chosen for the batch)."""
    ds = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])
    alone = {t: ds.generate(t, max_new_tokens=24)[0].token_ids for t in TEXTS}
    for size, offset in ((2, 3), (5, 7), (16, 0)):
        batch = [TEXTS[(offset + i) % len(TEXTS)] for i in range(size)]
        for text, result in zip(batch, ds.generate(batch, max_new_tokens=24)):
            assert result.token_ids == alone[text], (size, text)


class NaNDrafter(DiffusionDrafter):
    """A broken drafter: NaN logits for some rows, ids past the target's vocabulary for others."""

    def __init__(self, vocab_size: int, mask_token_id: int):
        super().__init__()
        self.vocab_size, self.mask_token_id, self.max_positions = vocab_size + 50, mask_token_id, 10_000

    def draft(self, tokens, lengths, k, context=None, state=None):
        logits = torch.full((tokens.shape[0], int(k.max()), self.vocab_size), -20.0)
        logits[0::2] = float("nan")
        logits[1::2, :, -1] = 20.0  # the most likely id is one the target cannot take
        return logits


class RaisingDrafter(NaNDrafter):
    """A drafter that raises on every other call and drafts noise otherwise."""

    calls = 0

    def draft(self, tokens, lengths, k, context=None, state=None):
        self.calls += 1
        if self.calls % 2:
            raise RuntimeError("drafter exploded")
        return torch.randn(tokens.shape[0], int(k.max()), self.vocab_size)


class CachingRaisingDrafter(RaisingDrafter):
    """RaisingDrafter with a prefix-cache state: rows new to it get a drafter pass of their
    own before the round's (PathProposer.catch_up), and the first one raises."""

    def new_state(self, batch, capacity):
        return DrafterState(batch, capacity)


@pytest.mark.parametrize("drafter_class", [RaisingDrafter, CachingRaisingDrafter])
def test_drafter_exception_costs_only_drafts(tiny_target, caplog, drafter_class):
    """A drafter that raises mid-generation (and, with a prefix cache, while new rows encode
    their prompts): every request still finishes with plain decoding's output, the
    failures are counted and logged once."""
    model, tok = tiny_target
    prompts = [tok(t)["input_ids"] for t in TEXTS[:3]]
    params = SamplingParams(max_new_tokens=10)
    cfg = DiffuSpecConfig.from_kwargs(adl="fixed", k_init=4, max_batch_size=2)
    plain = SpeculativeEngine(model, None, cfg, None, model.config.vocab_size).generate(prompts, params)
    engine = SpeculativeEngine(model, drafter_class(model.config.vocab_size, tok.mask_token_id), cfg, None,
                               model.config.vocab_size)
    with caplog.at_level("ERROR", logger="diffuspec.engine"):
        out = engine.generate(prompts, params)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain]
    assert engine.drafter_failures >= 2
    assert sum("drafter failed" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_broken_drafter_changes_nothing(tiny_target, temperature):
    model, tok = tiny_target
    prompts = [tok(t)["input_ids"] for t in TEXTS[:4]]
    params = SamplingParams(max_new_tokens=12, temperature=temperature, seed=5)
    cfg = DiffuSpecConfig.from_kwargs(adl="fixed", k_init=4)
    plain = SpeculativeEngine(model, None, cfg, None, model.config.vocab_size).generate(prompts, params)
    broken = SpeculativeEngine(model, NaNDrafter(model.config.vocab_size, tok.mask_token_id), cfg, None,
                               model.config.vocab_size).generate(prompts, params)
    assert [o.token_ids for o in broken] == [o.token_ids for o in plain]
    if temperature == 0:
        assert [o.token_ids for o in plain] == [hf_greedy(model, p, 12, None) for p in prompts]


def test_pickled_weights_are_refused(tiny_pair, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_pair[1], folder)
    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="only pickled weights.*pytorch_model.bin.*safetensors"):
        DiffuSpec.from_pretrained(tiny_pair[0], folder)


def test_damaged_drafter_files_name_the_file_and_tensor(tiny_pair, tmp_path):
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_pair[1], truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors.*cannot be read.*truncated"):
        load_drafter(truncated)
    reshaped = tmp_path / "reshaped"
    shutil.copytree(tiny_pair[1], reshaped)
    state = load_file(str(reshaped / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    state[name] = state[name][:, :-1].contiguous()
    save_file(state, str(reshaped / "model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor '{name}' has shape"):
        load_drafter(reshaped)
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1, dtype=torch.int32)
    save_file(state, str(reshaped / "model.safetensors"))
    with pytest.raises(ValueError, match=f"tensor '{name}' has dtype torch.int32"):
        load_drafter(reshaped)


def test_damaged_proxy_tables(tmp_path):
    seqs = torch.randint(0, 30, (2, 50)).tolist()
    good = tmp_path / "t.safetensors"
    NGramModel.from_corpus(seqs, order=3, vocab_size=30).save(good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:100])
    with pytest.raises(ValueError, match="truncated.safetensors.*cannot be read"):
        NGramModel.load(truncated)
    from safetensors import safe_open
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
    state = load_file(str(good))
    state["counts"] = state["counts"][:-1].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(state, str(bad), metadata=meta)
    with pytest.raises(ValueError, match="tensor 'counts' has .* entries for .* keys"):
        NGramModel.load(bad)


def test_open_server_without_key_warns(monkeypatch):
    from diffuspec_vllm.serve import warn_open_without_key

    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    said = []
    assert warn_open_without_key(["--port", "8000"], said.append) and "every interface" in said[0]
    assert warn_open_without_key(["--host", "0.0.0.0"], said.append) and "--api-key" in said[-1]
    assert not warn_open_without_key(["--host", "127.0.0.1"], said.append)
    assert not warn_open_without_key(["--host=0.0.0.0", "--api-key", "k"], said.append)
    monkeypatch.setenv("VLLM_API_KEY", "k")
    assert not warn_open_without_key(["--host", "0.0.0.0"], said.append)


# ------------------------------------------------------------------ the API boundary, fuzzed
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=12)  # unicode, control characters, empty
_ids = st.lists(st.integers(min_value=-2**40, max_value=2**40), max_size=6)  # huge and negative ids
_prompts = st.one_of(
    _text, st.lists(_text, max_size=3), _ids, st.lists(_ids, max_size=3), st.lists(st.lists(_ids, max_size=2), max_size=2),
    st.just(" \n\t "), st.builds(lambda xs: np.array(xs, dtype=np.int64), _ids),
    st.builds(lambda xs: torch.tensor(xs, dtype=torch.float32), st.lists(st.floats(0, 100), max_size=4)),
    st.builds(lambda xs: torch.tensor([xs], dtype=torch.int64), st.lists(st.integers(0, 20000), min_size=1, max_size=4)),
    st.none(), st.integers(), st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
)


@pytest.fixture(scope="module")
def embedded():
    return DiffuSpec.from_pretrained()


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=_prompts, max_new_tokens=st.one_of(st.integers(-2, 3), st.floats(-1, 3), st.none()),
       temperature=st.one_of(st.floats(-1, 2), st.just(float("nan")), st.just(0.0)))
def test_any_input_gets_a_result_or_a_clear_error(embedded, prompt, max_new_tokens, temperature):
    """Random prompts (unicode, control characters, empty and whitespace-only strings, huge
    ids, nested lists, numpy arrays, tensors of the wrong dtype, wrong types) and arguments:
    a result, or ValueError/TypeError, never another exception."""
    try:
        out = embedded.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=0)
    except (ValueError, TypeError) as exc:
        assert str(exc)  # says what is wrong
        return
    assert isinstance(out, list) and all(isinstance(r.text, str) for r in out)
