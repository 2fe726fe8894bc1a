"""DiffuCoder, Fast-dLLM v2 and SDAR drafters: tiny checkpoints written here in each family's
published format (config.json keys, safetensors weight names, tokenizer files), loaded by
diffuspec and checked against a forward pass written independently in this file; the
block-causal prefix cache against passes from scratch; greedy speculative decoding with each
family against plain greedy decoding.

Where each format comes from (the published files the configs below copy, dimensions shrunk):
- DiffuCoder: huggingface.co/apple/DiffuCoder-7B-Instruct, config.json (Dream's format; Dream's
  modeling code: NVlabs/Fast-dLLM dream/model/modeling_dream.py).
- Fast-dLLM v2: the HF folder Efficient-Large-Model/Fast_dLLM_v2_7B as copied to GitHub in
  Xenearkr/Fast-dLLM v2/base_models/Fast_dLLM_v2_7B/{config.json, added_tokens.json,
  special_tokens_map.json, modeling.py}.
- SDAR: JetAstra/SDAR training/model/SDAR-4B-Chat/{config.json, added_tokens.json,
  tokenizer_config.json, model.safetensors.index.json, modeling_sdar.py} and generate.py; the HF
  copy huggingface.co/JetLM/SDAR-4B-Chat config.json lacks block_size and mask_token_id.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import pytest
import torch
from conftest import hf_greedy
from safetensors.torch import save_file
from test_exactness import _engine, _prompt_ids

from diffuspec import SamplingParams
from diffuspec.drafters import FAMILIES, draft_attention_mask, load_drafter

H, F, LAYERS, HEADS, KV, V = 32, 48, 2, 4, 2, 64
# Tiny stand-ins for the published special ids (Qwen2.5/Qwen3 <|endoftext|> 151643,
# <|im_end|> 151645, the families' masks 151665..151669).
EOT, IM_END, MASK = 56, 57, 60
_TOKEN = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


@dataclass(frozen=True)
class Arch:
    """What the reference forward needs to know about a family."""

    head_dim: int
    bias: bool          # q/k/v biases (Qwen2 layout)
    qk_norm: bool       # per-head RMSNorm on q and k, before rotary (Qwen3 layout)
    shifted: bool       # mask j is read from the output at j - 1
    block: int | None   # block-causal block size on absolute positions; None: bidirectional
    theta: float = 1_000_000.0
    eps: float = 1e-6


DIFFUCODER = Arch(head_dim=H // HEADS, bias=True, qk_norm=False, shifted=True, block=None)
FAST_DLLM = Arch(head_dim=H // HEADS, bias=True, qk_norm=False, shifted=True, block=8)
SDAR = Arch(head_dim=16, bias=False, qk_norm=True, shifted=False, block=4)  # head_dim != H / HEADS, as SDAR-4B


def _weights(arch: Arch, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the published names: Qwen2 (q/k/v biases) or Qwen3 (q_norm/k_norm)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    hd = arch.head_dim
    w = {"model.embed_tokens.weight": r(vocab, H), "model.norm.weight": 1 + r(H), "lm_head.weight": r(vocab, H)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update({p + "self_attn.q_proj.weight": r(HEADS * hd, H), p + "self_attn.k_proj.weight": r(KV * hd, H),
                  p + "self_attn.v_proj.weight": r(KV * hd, H), p + "self_attn.o_proj.weight": r(H, HEADS * hd),
                  p + "mlp.gate_proj.weight": r(F, H), p + "mlp.up_proj.weight": r(F, H),
                  p + "mlp.down_proj.weight": r(H, F), p + "input_layernorm.weight": 1 + r(H),
                  p + "post_attention_layernorm.weight": 1 + r(H)})
        if arch.bias:
            w.update({p + "self_attn.q_proj.bias": r(HEADS * hd), p + "self_attn.k_proj.bias": r(KV * hd),
                      p + "self_attn.v_proj.bias": r(KV * hd)})
        if arch.qk_norm:
            w.update({p + "self_attn.q_norm.weight": 1 + r(hd), p + "self_attn.k_norm.weight": 1 + r(hd)})
    return w


def _reference(w: dict[str, torch.Tensor], arch: Arch, ids: list[int], first_position: int = 0) -> torch.Tensor:
    """[n, vocab] logits of one unpadded sequence at positions first_position.., written out by hand."""
    n, hd = len(ids), arch.head_dim
    x = w["model.embed_tokens.weight"][torch.tensor(ids)]
    pos = torch.arange(n) + first_position
    if arch.block is None:
        allowed = torch.ones(n, n, dtype=torch.bool)
    else:  # [query, key]: the key's block is not after the query's
        allowed = pos[None, :] // arch.block <= pos[:, None] // arch.block
    ang = pos.float()[:, None] * arch.theta ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)
    cos, sin = ang.cos(), ang.sin()                                    # [n, hd/2]

    def rope(t):  # [heads, n, hd], rotate-half
        a, b = t[..., : hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms(t, g):
        return g * t / torch.sqrt((t * t).mean(-1, keepdim=True) + arch.eps)

    for i in range(LAYERS):
        L = lambda name: w[f"model.layers.{i}.{name}"]  # noqa: E731
        h = rms(x, L("input_layernorm.weight"))
        q, k, v = (h @ L(f"self_attn.{m}_proj.weight").T + (L(f"self_attn.{m}_proj.bias") if arch.bias else 0)
                   for m in "qkv")
        q, k, v = q.view(n, HEADS, hd), k.view(n, KV, hd), v.view(n, KV, hd)
        if arch.qk_norm:  # after the projection and reshape, before rotary
            q, k = rms(q, L("self_attn.q_norm.weight")), rms(k, L("self_attn.k_norm.weight"))
        q = rope(q.transpose(0, 1))
        k = rope(k.transpose(0, 1)).repeat_interleave(HEADS // KV, 0)
        v = v.transpose(0, 1).repeat_interleave(HEADS // KV, 0)
        scores = (q @ k.transpose(1, 2) / hd ** 0.5).masked_fill(~allowed, float("-inf"))
        x = x + (torch.softmax(scores, -1) @ v).transpose(0, 1).reshape(n, HEADS * hd) @ L("self_attn.o_proj.weight").T
        h = rms(x, L("post_attention_layernorm.weight"))
        x = x + (torch.nn.functional.silu(h @ L("mlp.gate_proj.weight").T) * (h @ L("mlp.up_proj.weight").T)) \
            @ L("mlp.down_proj.weight").T
    return rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


def _reference_draft(w, arch: Arch, prefix: list[int], k: int, mask: int, first_position: int = 0) -> torch.Tensor:
    """[k, vocab]: the reference logits of the k mask positions after ``prefix``."""
    logits = _reference(w, arch, prefix + [mask] * k, first_position)
    first = len(prefix) - (1 if arch.shifted else 0)
    return logits[first: first + k]


def _write(path, weights: dict[str, torch.Tensor], config: dict, token_files: dict[str, dict]) -> None:
    path.mkdir(parents=True)
    save_file({name: t.contiguous() for name, t in weights.items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name, content in token_files.items():
        (path / name).write_text(json.dumps(content, indent=2))


def _shape(vocab: int) -> dict:
    return {"hidden_size": H, "intermediate_size": F, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "max_window_layers": LAYERS, "vocab_size": vocab}


def write_diffucoder(path, vocab=V, mask=MASK, eot=EOT, seed=0):
    """apple/DiffuCoder-7B-Instruct: Dream's config keys, the mask in config.json."""
    w = _weights(DIFFUCODER, vocab, seed)
    config = {"architectures": ["DreamModel"], "attention_dropout": 0.0,
              "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
              "bos_token_id": eot, "eos_token_id": eot, "hidden_act": "silu", "initializer_range": 0.02,
              "mask_token_id": mask, "max_position_embeddings": 131072, "model_type": "Dream", "pad_token_id": eot,
              "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.3",
              "use_cache": False, "use_mrope": False, "use_sliding_window": False, **_shape(vocab)}
    _write(path, w, config, {"added_tokens.json": {"<|endoftext|>": eot, "<|mask|>": mask}})
    return w


def write_fast_dllm_v2(path, vocab=V, mask=MASK, eot=EOT, im_end=IM_END, seed=1):
    """Fast_dLLM_v2_7B: no mask_token_id in config.json, the misspelled conplemenrary_mask key,
    layer_types; the mask |<MASK>| in added_tokens.json and special_tokens_map.json."""
    w = _weights(FAST_DLLM, vocab, seed)
    config = {"architectures": ["Fast_dLLM_QwenForCausalLM"], "attention_dropout": 0.0,
              "auto_map": {"AutoConfig": "configuration.Fast_dLLM_QwenConfig",
                           "AutoModel": "modeling.Fast_dLLM_QwenModel",
                           "AutoModelForCausalLM": "modeling.Fast_dLLM_QwenForCausalLM"},
              "bd_size": FAST_DLLM.block, "bos_token_id": eot, "conplemenrary_mask": True, "eos_token_id": im_end,
              "hidden_act": "silu", "initializer_range": 0.02, "layer_types": ["full_attention"] * LAYERS,
              "max_position_embeddings": 32768, "model_type": "Fast_dLLM_Qwen", "pad_token_id": im_end,
              "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.53.1",
              "use_cache": True, "use_sliding_window": False, **_shape(vocab)}
    _write(path, w, config, {
        "added_tokens.json": {"<|endoftext|>": eot, "<|im_end|>": im_end, "|<MASK>|": mask},
        "special_tokens_map.json": {"additional_special_tokens": [{"content": "|<MASK>|", **_TOKEN}],
                                    "eos_token": {"content": "<|im_end|>", **_TOKEN},
                                    "pad_token": {"content": "<|endoftext|>", **_TOKEN}}})
    return w


def write_sdar(path, vocab=V, mask=MASK, eot=EOT, seed=2, hf_copy=False):
    """SDAR-4B-Chat: Qwen3 names, explicit head_dim, block_size and mask_token_id in config.json
    (GitHub copy); ``hf_copy``: neither key (HF copy), the mask "<MASK>" from added_tokens.json."""
    w = _weights(SDAR, vocab, seed)
    config = {"architectures": ["SDARForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                           "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
              "attention_bias": False, "attention_dropout": 0.0, "attn_implementation": "flex_attention",
              "bos_token_id": eot, "debug": False, "eos_token_id": eot, "block_size": SDAR.block,
              "mask_token_id": mask, "ep_size": 1, "fuse_cross_entropy": True, "head_dim": SDAR.head_dim,
              "hidden_act": "silu", "initializer_range": 0.02, "max_position_embeddings": 32768,
              "micro_forward": False, "model_type": "sdar", "rms_norm_eps": 1e-06, "rope_scaling": None,
              "rope_theta": 1000000, "skip_checkpoint": False, "sliding_window": None, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "transformers_version": "4.52.4", "use_cache": False, "use_deepep": False,
              "use_sliding_window": False, **_shape(vocab)}
    if hf_copy:
        del config["block_size"], config["mask_token_id"]
    _write(path, w, config, {"added_tokens.json": {"<|endoftext|>": eot, "<|im_end|>": IM_END, "<MASK>": mask}})
    return w


# name: (writer, format, architecture)
CASES = {
    "diffucoder": (write_diffucoder, "dream", DIFFUCODER),
    "fast_dllm_v2": (write_fast_dllm_v2, "fast_dllm_v2", FAST_DLLM),
    "sdar": (write_sdar, "sdar", SDAR),
    "sdar_hf_copy": (lambda path, **kw: write_sdar(path, hf_copy=True, **kw), "sdar", SDAR),
}
BLOCK_CASES = ["fast_dllm_v2", "sdar"]


def _load(path):
    return load_drafter(path, dtype=torch.float32)


def _padded(rows: list[list[int]], width: int) -> torch.Tensor:
    tokens = torch.zeros(len(rows), width, dtype=torch.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    return tokens


@pytest.mark.parametrize("case", list(CASES))
def test_family_loads_with_its_format(tmp_path, case):
    write, fmt, arch = CASES[case]
    write(tmp_path / case)
    drafter = _load(tmp_path / case)
    spec = drafter.net.spec
    assert drafter.format == fmt and drafter.mask_token_id == MASK
    assert drafter.shifted == arch.shifted
    assert spec.head_dim == arch.head_dim and spec.block_size == arch.block and spec.qk_norm == arch.qk_norm
    assert spec.qkv_bias == arch.bias and not spec.prefix_causal
    assert drafter.prefix_cache == (arch.block is not None)  # on where it is exact
    assert drafter.pad_token_id == (IM_END if case == "fast_dllm_v2" else EOT)


@pytest.mark.parametrize("case", list(CASES))
def test_drafts_match_reference_forward(tmp_path, case):
    """A ragged batch (prefixes ending inside a block, on a block boundary, drafts spanning
    blocks) gives, at every drafted position, the hand-written forward's logits."""
    write, _, arch = CASES[case]
    w = write(tmp_path / case)
    drafter = _load(tmp_path / case)
    rows = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6], [8, 9], [10, 11, 12, 13, 5, 6, 7, 8],
            [1, 2, 3]]
    ks = [3, 9, 5, 1]
    out = drafter.draft(_padded(rows, 24), torch.tensor([len(r) for r in rows]), torch.tensor(ks))
    assert out.shape == (4, max(ks), V)
    for b, (r, k) in enumerate(zip(rows, ks)):
        assert torch.allclose(out[b, :k], _reference_draft(w, arch, r, k, MASK), atol=1e-4), b
    seq = rows[0] + [MASK] * ks[0]  # the network alone, with its own default attention rule
    assert torch.allclose(drafter.net(torch.tensor([seq]))[0], _reference(w, arch, seq), atol=1e-4)


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_truncated_context_keeps_absolute_blocks(tmp_path, case):
    """With ``context``, the blocks stay on absolute positions: the draft equals the reference
    over the last `context` tokens placed at their absolute positions."""
    write, _, arch = CASES[case]
    w = write(tmp_path / case)
    drafter = _load(tmp_path / case)
    rows, ks, context = [list(range(1, 20)), list(range(30, 41))], [4, 6], 6  # starts 13, 5: mid-block
    out = drafter.draft(_padded(rows, 20), torch.tensor([len(r) for r in rows]), torch.tensor(ks), context=context)
    for b, (r, k) in enumerate(zip(rows, ks)):
        ref = _reference_draft(w, arch, r[-context:], k, MASK, first_position=len(r) - context)
        assert torch.allclose(out[b, :k], ref, atol=1e-4), b


@pytest.mark.parametrize("case", BLOCK_CASES)
def test_block_prefix_cache_is_exact(tmp_path, case):
    """Round after round, drafts from the whole-block prefix cache equal drafts from scratch,
    also after rows are taken out and put back in another order (vLLM); keeping the partial
    block too would not be exact."""
    write, _, arch = CASES[case]
    write(tmp_path / case)
    drafter = _load(tmp_path / case)
    assert drafter.prefix_cache
    tokens = torch.randint(0, MASK, (3, 64), generator=torch.Generator().manual_seed(0))
    schedule = [((5, 8, 3), (4, 2, 7)), ((3, 1, 5), (3, 9, 1)), ((1, 7, 2), (2, 2, 4)), ((4, 4, 1), (6, 1, 3)),
                ((8, 3, 9), (1, 5, 5))]

    def run(state, check_reorder: bool):
        lengths, drafts = torch.zeros(3, dtype=torch.int64), []
        for step, (grow, k) in enumerate(schedule):
            lengths, kk = lengths + torch.tensor(grow), torch.tensor(k)
            if check_reorder and step == 3:
                swapped = drafter.new_state(3, 64).load_rows([state.row(2), state.row(1), state.row(0)])
                flip = drafter.draft(tokens.flip(0), lengths.flip(0), kk.flip(0), state=swapped).flip(0)
            cached = drafter.draft(tokens, lengths, kk, state=state)
            if check_reorder:
                assert state.cached.tolist() == (lengths // arch.block * arch.block).tolist()
            if check_reorder and step == 3:
                assert all(torch.allclose(flip[b, : k[b]], cached[b, : k[b]], atol=1e-5) for b in range(3))
            full = drafter.draft(tokens, lengths, kk)
            drafts.append(all(torch.allclose(cached[b, : k[b]], full[b, : k[b]], atol=1e-5) for b in range(3)))
        return drafts

    assert all(run(drafter.new_state(3, 64), check_reorder=True))
    drafter.cacheable = lambda lengths: lengths.clone()  # keep the partial block as well: inexact
    assert not all(run(drafter.new_state(3, 64), check_reorder=False))


def test_block_causal_attention_mask_by_hand():
    # one row, 4 cached tokens, 3 new prefix tokens, 3 masks, 1 padding query; blocks of 4
    m = draft_attention_mask(torch.tensor([4]), torch.tensor([3]), torch.tensor([3]), 7, 11, prefix_causal=False,
                             block_size=4)[0, 0]
    first_two_blocks, row = [1] * 8 + [0] * 3, [1] * 10 + [0]
    assert m.int().tolist() == [
        first_two_blocks,  # prefix token at position 4 (block 1) sees blocks 0 and 1, also position 7
        first_two_blocks,  # position 5
        first_two_blocks,  # position 6
        first_two_blocks,  # mask at position 7, block 1
        row,               # mask at position 8, block 2: everything of the row (it ends at 10)
        row,               # mask at position 9
        [1] * 11,          # padding: causal, never read
    ]
    # truncated context: column 0 is absolute position 2, so columns 0-1 are block 0, 2-5 block 1
    m = draft_attention_mask(torch.tensor([0]), torch.tensor([3]), torch.tensor([2]), 5, 5, prefix_causal=False,
                             block_size=4, origin=torch.tensor([2]))[0, 0]
    assert m.int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1] * 5, [1] * 5, [1] * 5]


@pytest.mark.parametrize("files", [
    # SDAR-4B-Chat added_tokens.json spells the mask "<MASK>" ...
    {"added_tokens.json": {"<|endoftext|>": EOT, "<MASK>": MASK}},
    # ... and its tokenizer_config.json "<|MASK|>", with the id in added_tokens_decoder
    {"tokenizer_config.json": {"mask_token": "<|MASK|>", "added_tokens_decoder": {
        str(EOT): {"content": "<|endoftext|>", "special": True, **_TOKEN},
        str(MASK): {"content": "<|MASK|>", "special": False, **_TOKEN}}}},
    # Fast-dLLM v2: "|<MASK>|" in added_tokens.json, named in special_tokens_map.json
    {"added_tokens.json": {"|<MASK>|": MASK},
     "special_tokens_map.json": {"additional_special_tokens": [{"content": "|<MASK>|", **_TOKEN}]}},
    # the tokenizer's declared mask_token wins over any other known mask string
    {"added_tokens.json": {"<|mask|>": MASK - 1, "<mask>": MASK},
     "special_tokens_map.json": {"mask_token": {"content": "<mask>", **_TOKEN}}},
], ids=["sdar-added-tokens", "sdar-tokenizer-config", "fast-dllm-added-tokens", "declared-mask-token"])
def test_mask_id_from_tokenizer_files(tmp_path, files):
    write_sdar(tmp_path / "sdar", hf_copy=True)
    (tmp_path / "sdar" / "added_tokens.json").unlink()
    for name, content in files.items():
        (tmp_path / "sdar" / name).write_text(json.dumps(content))
    assert _load(tmp_path / "sdar").mask_token_id == MASK


def test_clear_errors(tmp_path):
    write_sdar(tmp_path / "other")
    config = json.loads((tmp_path / "other" / "config.json").read_text())
    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "mdm",
                                                                "architectures": ["MDMModel"]}))
    with pytest.raises(ValueError, match="supported drafter families") as err:
        _load(tmp_path / "other")
    for family in FAMILIES.values():
        assert family.title in str(err.value) and repr(family.model_type) in str(err.value)
    assert "DiffuCoder" in str(err.value)

    (tmp_path / "other" / "config.json").write_text(json.dumps({**config, "model_type": "qwen3",
                                                                "architectures": ["Qwen3ForCausalLM"]}))
    with pytest.raises(TypeError, match="causal .* SDAR"):
        _load(tmp_path / "other")

    folder = tmp_path / "fast_dllm_v2"
    write_fast_dllm_v2(folder)
    for name in ("added_tokens.json", "special_tokens_map.json"):
        (folder / name).unlink()
    with pytest.raises(ValueError, match=re.escape(str(folder / "config.json"))) as err:
        _load(folder)
    assert "mask_token_id" in str(err.value) and "151665" in str(err.value)


@pytest.mark.parametrize("case", ["diffucoder", "fast_dllm_v2", "sdar"])
def test_greedy_speculative_decoding_equals_plain(tmp_path, tiny_target, case):
    """Each family drafting for the tiny target (same 512-id vocabulary) through
    SpeculativeEngine: greedy output is the target's own greedy output, token for token
    (block-causal drafters with their prefix cache, on by default)."""
    model, tok = tiny_target
    write, _, arch = CASES[case]
    write(tmp_path / case, vocab=model.config.vocab_size, mask=tok.mask_token_id, eot=tok.eos_token_id)
    drafter = _load(tmp_path / case)
    assert drafter.prefix_cache == (arch.block is not None)
    prompts = _prompt_ids(tok, 4)
    outs = _engine(model, drafter, eos=None).generate(prompts, SamplingParams(max_new_tokens=24))
    for p, o in zip(prompts, outs):
        assert o.token_ids == hf_greedy(model, p, 24, None)
        assert sum(o.stats.drafted) > 0
