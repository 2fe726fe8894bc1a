"""The API boundary: every bad input gets a clear error naming the value and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import RandomDrafter
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from diffuspec import DiffuSpec, DiffuSpecConfig
from diffuspec.drafters import load_drafter
from diffuspec.recipe.tiny import train_tokenizer


@pytest.fixture(scope="module")
def ds(tiny_pair):
    return DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])


def test_wrapping_loaded_objects(tiny_pair):
    target = AutoModelForCausalLM.from_pretrained(str(tiny_pair[0]))
    tok = AutoTokenizer.from_pretrained(str(tiny_pair[0]))
    ds = DiffuSpec(target, load_drafter(tiny_pair[1]), tok, k_max=6, k_init=6)
    assert ds.config.adl.k_max == 6
    [r] = ds.generate("print(", max_new_tokens=8)
    assert len(r.token_ids) == 8 and isinstance(r.text, str)
    assert max(r.stats.draft_lengths) <= 6


def test_int8_drafter_on_cpu(tiny_pair):
    """On a CPU the drafter's linear layers run in int8 unless told not to; the output stays
    the target's own, and forcing int8 where it cannot run names the reason."""
    from torch.ao.nn.quantized.dynamic import Linear as Int8Linear

    auto = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1])
    assert auto.drafter_int8 and isinstance(auto.drafter.net.lm_head, Int8Linear)
    [spec], [plain] = auto.generate("def add(a, b):", max_new_tokens=24), \
        auto.generate("def add(a, b):", max_new_tokens=24, speculate=False)
    assert spec.token_ids == plain.token_ids and sum(spec.stats.drafted) > 0
    off = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1], drafter_int8=False)
    assert not off.drafter_int8 and isinstance(off.drafter.net.lm_head, torch.nn.Linear)
    with pytest.raises(ValueError, match="drafter_int8=True.*bfloat16.*float32"):
        DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1], dtype=torch.bfloat16, drafter_int8=True)
    assert not DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1], dtype=torch.bfloat16).drafter_int8


def test_prompt_forms(ds):
    ids = ds.tokenizer("x = 1")["input_ids"]
    by_text = ds.generate("x = 1", max_new_tokens=5)[0].token_ids
    assert ds.generate(ids, max_new_tokens=5)[0].token_ids == by_text
    assert ds.generate([ids, ids], max_new_tokens=5)[1].token_ids == by_text
    assert ds.generate(torch.tensor([ids]), max_new_tokens=5)[0].token_ids == by_text
    assert len(ds.generate(["a", "b", "c"], max_new_tokens=2)) == 3


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"prompts": []}, ValueError, "prompts is empty"),
    ({"prompts": ""}, ValueError, "empty string"),
    ({"prompts": ["ok", ""]}, ValueError, "prompt 1 is an empty string"),
    ({"prompts": [[]]}, ValueError, "empty token list"),
    ({"prompts": [[1, 10**6]]}, ValueError, "outside the tokenizer's range"),
    ({"prompts": 3.5}, TypeError, "prompts must be"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens=0 must be >= 1"),
    ({"max_new_tokens": 2.5}, TypeError, "max_new_tokens must be an int"),
    ({"temperature": -0.1}, ValueError, "temperature=-0.1 must be >= 0"),
    ({"top_p": 0.0}, ValueError, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, ValueError, r"top_p=1.5 must be in \(0, 1\]"),
    ({"top_k": 0}, ValueError, "top_k=0 must be >= 1"),
    ({"stop": [""]}, ValueError, "stop strings must be non-empty"),
])
def test_bad_generate_arguments(ds, kwargs, exc, match):
    args = {"prompts": "def f():", "max_new_tokens": 4, **kwargs}
    with pytest.raises(exc, match=match):
        ds.generate(**args)
    assert len(ds.generate("ok", max_new_tokens=2)[0].token_ids) == 2  # still serving


def test_prompt_longer_than_context(ds):
    ctx = ds.target.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the target's context of {ctx} tokens"):
        ds.generate([[5] * ctx], max_new_tokens=1)
    with pytest.raises(ValueError, match="lower max_new_tokens"):
        ds.generate([[5] * 10], max_new_tokens=ctx)


def test_unknown_config_keys(tiny_pair):
    with pytest.raises(TypeError, match="unknown config key 'beam_size'.*beam_width"):
        DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1], beam_size=3)
    with pytest.raises(TypeError, match=r"unknown config key adl.'kmax'"):
        DiffuSpecConfig.from_kwargs(adl={"kmax": 3})
    with pytest.raises(ValueError, match="lattice mass=1.5"):
        DiffuSpecConfig.from_kwargs(mass=1.5)
    with pytest.raises(ValueError, match="k_min"):
        DiffuSpecConfig.from_kwargs(k_min=10, k_max=5)


def test_causal_lm_as_drafter(tiny_pair, tiny_target):
    model, tok = tiny_target
    with pytest.raises(TypeError, match="causal .*autoregressive.* LM"):
        DiffuSpec(model, model, tok)
    with pytest.raises(TypeError, match="causal"):
        DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[0])


def test_tokenizers_disagree(tiny_pair, tmp_path):
    other = tmp_path / "drafter"
    shutil.copytree(tiny_pair[1], other)
    train_tokenizer(["completely different text " * 50, "zebra quartz"], 300, other)
    with pytest.raises(ValueError, match="drafter's tokenizer disagrees with the target's"):
        DiffuSpec.from_pretrained(tiny_pair[0], other)


def test_tokenizer_without_mask_token(tiny_target):
    model, tok = tiny_target
    no_mask = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, eos_token="<|endoftext|>")
    assert no_mask.mask_token_id is None
    drafter = RandomDrafter(model.config.vocab_size, mask_token_id=None)
    with pytest.raises(ValueError, match="no mask token"):
        DiffuSpec(model, drafter, no_mask)


def test_missing_folders(tiny_pair, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        DiffuSpec.from_pretrained(tmp_path / "none", tiny_pair[1])
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing \['\*.safetensors'\]"):
        DiffuSpec.from_pretrained(tiny_pair[0], tmp_path / "half")


def test_cli_generate_json(tiny_pair):
    out = subprocess.run([sys.executable, "-m", "diffuspec.cli", "generate", "def f(x):", "--target", str(tiny_pair[0]),
                          "--drafter", str(tiny_pair[1]), "--max-new-tokens", "6", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert len(data["token_ids"]) == 6 and data["stats"]["rounds"] >= 1
    bad = subprocess.run([sys.executable, "-m", "diffuspec.cli", "generate", "x", "--target", str(tiny_pair[0]),
                          "--drafter", str(tiny_pair[1]), "--temperature", "-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "temperature=-1.0 must be >= 0" in bad.stderr


def test_cli_build_proxy(tiny_pair, tmp_path):
    src = tmp_path / "corpus.txt"
    src.write_text("def f(x):\n    return x\n" * 20)
    out = tmp_path / "proxy.safetensors"
    subprocess.run([sys.executable, "-m", "diffuspec.cli", "build-proxy", str(src), "--tokenizer", str(tiny_pair[0]),
                    "--out", str(out), "--min-count", "1"], check=True, capture_output=True)
    ds = DiffuSpec.from_pretrained(tiny_pair[0], tiny_pair[1], proxy_table=str(out))
    assert ds.engine.proxy_table is not None and ds.engine.proxy_table.order == 3
    spec = ds.generate("def f(x):", max_new_tokens=8)
    assert spec[0].token_ids == ds.generate("def f(x):", max_new_tokens=8, speculate=False)[0].token_ids
