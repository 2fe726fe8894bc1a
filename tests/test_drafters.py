"""Dream- and LLaDA-format checkpoints: written here in each exact format, loaded by
diffuspec, and checked against a forward pass computed independently in this file."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from diffuspec.drafters import (BidirectionalTransformer, TransformerDrafter, TransformerSpec, build_masked_input,
                                draft_attention_mask, load_drafter)

H, F, LAYERS, HEADS, KV, V = 32, 48, 2, 4, 2, 50
HD = H // HEADS
MASK, PAD, EOS = 47, 48, 49


def _random_weights(seed: int, bias: bool):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    w = {"embed": r(V, H), "norm": 1 + r(H), "head": r(V, H), "layers": []}
    for _ in range(LAYERS):
        w["layers"].append({
            "q": r(HEADS * HD, H), "k": r(KV * HD, H), "v": r(KV * HD, H), "o": r(H, HEADS * HD),
            "qb": r(HEADS * HD) if bias else None, "kb": r(KV * HD) if bias else None, "vb": r(KV * HD) if bias else None,
            "gate": r(F, H), "up": r(F, H), "down": r(H, F), "n1": 1 + r(H), "n2": 1 + r(H)})
    return w


def _reference_logits(w, ids: list[int], theta: float, eps: float) -> torch.Tensor:
    """Plain bidirectional transformer over one unpadded sequence, written out by hand."""
    x = w["embed"][torch.tensor(ids)]
    n = len(ids)
    pos = torch.arange(n, dtype=torch.float32)
    inv = theta ** (-torch.arange(0, HD, 2, dtype=torch.float32) / HD)
    ang = pos[:, None] * inv[None, :]                       # [n, HD/2]
    cos, sin = ang.cos(), ang.sin()

    def rope(t):  # t: [heads, n, HD], rotate-half convention
        a, b = t[..., : HD // 2], t[..., HD // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    def rms(t, g):
        return g * t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps)

    for L in w["layers"]:
        h = rms(x, L["n1"])
        q = h @ L["q"].T + (L["qb"] if L["qb"] is not None else 0)
        k = h @ L["k"].T + (L["kb"] if L["kb"] is not None else 0)
        v = h @ L["v"].T + (L["vb"] if L["vb"] is not None else 0)
        q = rope(q.view(n, HEADS, HD).transpose(0, 1))
        k = rope(k.view(n, KV, HD).transpose(0, 1)).repeat_interleave(HEADS // KV, 0)
        v = v.view(n, KV, HD).transpose(0, 1).repeat_interleave(HEADS // KV, 0)
        att = torch.softmax(q @ k.transpose(1, 2) / HD ** 0.5, dim=-1)  # no causal mask
        x = x + (att @ v).transpose(0, 1).reshape(n, H) @ L["o"].T
        h = rms(x, L["n2"])
        x = x + (torch.nn.functional.silu(h @ L["gate"].T) * (h @ L["up"].T)) @ L["down"].T
    return rms(x, w["norm"]) @ w["head"].T


def _write_dream(path, w):
    state = {"model.embed_tokens.weight": w["embed"], "model.norm.weight": w["norm"], "lm_head.weight": w["head"]}
    for i, L in enumerate(w["layers"]):
        p = f"model.layers.{i}."
        state.update({p + "self_attn.q_proj.weight": L["q"], p + "self_attn.k_proj.weight": L["k"],
                      p + "self_attn.v_proj.weight": L["v"], p + "self_attn.o_proj.weight": L["o"],
                      p + "self_attn.q_proj.bias": L["qb"], p + "self_attn.k_proj.bias": L["kb"],
                      p + "self_attn.v_proj.bias": L["vb"], p + "mlp.gate_proj.weight": L["gate"],
                      p + "mlp.up_proj.weight": L["up"], p + "mlp.down_proj.weight": L["down"],
                      p + "input_layernorm.weight": L["n1"], p + "post_attention_layernorm.weight": L["n2"]})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    cfg = {"architectures": ["DreamModel"], "model_type": "Dream", "vocab_size": V, "hidden_size": H,
           "intermediate_size": F, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
           "num_key_value_heads": KV, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
           "max_position_embeddings": 128, "mask_token_id": MASK, "pad_token_id": PAD, "eos_token_id": EOS,
           "torch_dtype": "float32", "auto_map": {"AutoModel": "modeling_dream.DreamModel"}}
    (path / "config.json").write_text(json.dumps(cfg))


def _write_llada(path, w):
    state = {"model.transformer.wte.weight": w["embed"], "model.transformer.ln_f.weight": w["norm"],
             "model.transformer.ff_out.weight": w["head"]}
    for i, L in enumerate(w["layers"]):
        p = f"model.transformer.blocks.{i}."
        state.update({p + "q_proj.weight": L["q"], p + "k_proj.weight": L["k"], p + "v_proj.weight": L["v"],
                      p + "attn_out.weight": L["o"], p + "ff_proj.weight": L["gate"], p + "up_proj.weight": L["up"],
                      p + "ff_out.weight": L["down"], p + "attn_norm.weight": L["n1"], p + "ff_norm.weight": L["n2"]})
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(path / "model.safetensors"))
    cfg = {"architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": H, "n_heads": HEADS,
           "n_kv_heads": KV, "n_layers": LAYERS, "mlp_hidden_size": F, "vocab_size": V, "embedding_size": V,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "include_bias": False, "weight_tying": False,
           "max_sequence_length": 128, "mask_token_id": MASK, "eos_token_id": EOS, "pad_token_id": PAD}
    (path / "config.json").write_text(json.dumps(cfg))


def test_dream_format_loads_and_matches_reference(tmp_path):
    w = _random_weights(0, bias=True)
    _write_dream(tmp_path / "dream", w)
    drafter = load_drafter(tmp_path / "dream")
    assert drafter.format == "dream" and drafter.shifted and drafter.mask_token_id == MASK
    prefix = [3, 14, 15, 9, 2, 6]
    k = 4
    ref = _reference_logits(w, prefix + [MASK] * k, 10000.0, 1e-6)
    out = drafter.draft(torch.tensor([prefix]), torch.tensor([len(prefix)]), torch.tensor([k]))
    # shifted: mask position j is read from the output at j - 1
    assert out.shape == (1, k, V)
    assert torch.allclose(out[0], ref[len(prefix) - 1: len(prefix) - 1 + k], atol=1e-4)


def test_llada_format_loads_and_matches_reference(tmp_path):
    w = _random_weights(1, bias=False)
    _write_llada(tmp_path / "llada", w)
    drafter = load_drafter(tmp_path / "llada")
    assert drafter.format == "llada" and not drafter.shifted and drafter.mask_token_id == MASK
    prefix = [5, 8, 13, 21]
    k = 3
    ref = _reference_logits(w, prefix + [MASK] * k, 500000.0, 1e-5)
    out = drafter.draft(torch.tensor([prefix]), torch.tensor([len(prefix)]), torch.tensor([k]))
    assert torch.allclose(out[0], ref[len(prefix): len(prefix) + k], atol=1e-4)  # unshifted


def test_ragged_batch_equals_rows_alone(tmp_path):
    """Padding never leaks into a row: a ragged batch gives each row's solo result."""
    _write_dream(tmp_path / "dream", _random_weights(2, bias=True))
    drafter = load_drafter(tmp_path / "dream")
    rows = [[1, 2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ks = [3, 5, 1]
    tokens = torch.zeros(3, 10, dtype=torch.int64)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    batch = drafter.draft(tokens, torch.tensor([len(r) for r in rows]), torch.tensor(ks))
    assert batch.shape == (3, 5, V)
    for i, (r, k) in enumerate(zip(rows, ks)):
        solo = drafter.draft(torch.tensor([r]), torch.tensor([len(r)]), torch.tensor([k]))
        assert torch.allclose(batch[i, :k], solo[0], atol=1e-5)


def test_masked_input_layout():
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]])
    lengths = torch.tensor([5, 2])
    ids, n_real = build_masked_input(tokens, torch.tensor([2, 0]), lengths, torch.tensor([2, 3]), 99, 0)
    assert ids.tolist() == [[3, 4, 5, 99, 99], [6, 7, 99, 99, 99]]
    assert n_real.tolist() == [3, 2]
    ids, _ = build_masked_input(tokens, torch.tensor([0, 0]), lengths, torch.tensor([1, 1]), 99, 0)
    assert ids.tolist() == [[1, 2, 3, 4, 5, 99], [6, 7, 99, 0, 0, 0]]


def test_draft_attention_mask_by_hand():
    # one row, 2 new prefix tokens after 3 cached ones, 2 masks, 1 padding query
    m = draft_attention_mask(torch.tensor([3]), torch.tensor([2]), torch.tensor([2]), 5, 8, prefix_causal=True)[0, 0]
    assert m.int().tolist() == [
        [1, 1, 1, 1, 0, 0, 0, 0],  # prefix token at column 3: causal
        [1, 1, 1, 1, 1, 0, 0, 0],  # prefix token at column 4
        [1, 1, 1, 1, 1, 1, 1, 0],  # mask at column 5: whole row
        [1, 1, 1, 1, 1, 1, 1, 0],  # mask at column 6
        [1, 1, 1, 1, 1, 1, 1, 1],  # padding: causal, never read
    ]
    full = draft_attention_mask(torch.tensor([0]), torch.tensor([2]), torch.tensor([1]), 3, 3, prefix_causal=False)
    assert full[0, 0].all()


def test_prefix_cache_is_exact_for_prefix_causal_drafters(tmp_path):
    """With a prefix-causal drafter, drafting round after round from the cache gives the
    same distributions as a full pass over the whole prefix."""
    torch.manual_seed(0)
    spec = TransformerSpec(vocab_size=V, hidden_size=H, intermediate_size=F, num_layers=LAYERS, num_heads=HEADS,
                           num_kv_heads=KV, prefix_causal=True, max_position_embeddings=128)
    for shifted in (True, False):
        drafter = TransformerDrafter(BidirectionalTransformer(spec), mask_token_id=MASK, pad_token_id=PAD,
                                     shifted=shifted, format="dream").eval()
        assert drafter.prefix_cache
        tokens = torch.randint(0, 40, (2, 30))
        state = drafter.new_state(2, 40)
        lengths = torch.tensor([5, 9])
        for step, (grow, k) in enumerate([((0, 0), (4, 2)), ((3, 1), (3, 5)), ((1, 4), (2, 2))]):
            lengths = lengths + torch.tensor(grow)
            kk = torch.tensor(k)
            if step == 2:  # rows taken out and put back in the other order (vLLM's batches change)
                swapped = drafter.new_state(2, 40).load_rows([state.row(1), state.row(0)])
                flip = drafter.draft(tokens.flip(0), lengths.flip(0), kk.flip(0), state=swapped).flip(0)
            cached = drafter.draft(tokens, lengths, kk, state=state)
            if step == 2:
                for b in range(2):
                    assert torch.allclose(flip[b, : k[b]], cached[b, : k[b]], atol=1e-5)
            full = drafter.draft(tokens, lengths, kk, state=None)
            for b in range(2):
                assert torch.allclose(cached[b, : k[b]], full[b, : k[b]], atol=1e-5)


def test_bad_checkpoint_folders(tmp_path, tiny_pair):
    with pytest.raises(ValueError, match="not a directory"):
        load_drafter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_drafter(tmp_path / "empty")
    w = _random_weights(3, bias=True)
    _write_dream(tmp_path / "noweights", w)
    (tmp_path / "noweights" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_drafter(tmp_path / "noweights")
    _write_dream(tmp_path / "nomask", w)
    cfg = json.loads((tmp_path / "nomask" / "config.json").read_text())
    del cfg["mask_token_id"]
    (tmp_path / "nomask" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="mask_token_id"):
        load_drafter(tmp_path / "nomask")
    _write_dream(tmp_path / "wrongshape", w)
    cfg = json.loads((tmp_path / "wrongshape" / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (tmp_path / "wrongshape" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="do not match"):
        load_drafter(tmp_path / "wrongshape")
    with pytest.raises(TypeError, match="causal"):
        load_drafter(tiny_pair[0])  # the Qwen2 target folder


def test_padding_of_finished_rows_stays_inside_the_cache():
    """A finished row near the end of its cache rides along while another row drafts a wide
    block: its padding positions run past the capacity and must not break the pass."""
    torch.manual_seed(0)
    spec = TransformerSpec(vocab_size=V, hidden_size=H, intermediate_size=F, num_layers=LAYERS, num_heads=HEADS,
                           num_kv_heads=KV, prefix_causal=True, max_position_embeddings=128)
    drafter = TransformerDrafter(BidirectionalTransformer(spec), mask_token_id=MASK, pad_token_id=PAD,
                                 shifted=True, format="dream").eval()
    tokens = torch.randint(0, 40, (2, 14))
    state = drafter.new_state(2, 14)
    drafter.draft(tokens, torch.tensor([13, 3]), torch.tensor([1, 1]), state=state)
    out = drafter.draft(tokens, torch.tensor([13, 9]), torch.tensor([0, 4]), state=state)  # row 0 finished
    full = drafter.draft(tokens, torch.tensor([13, 9]), torch.tensor([0, 4]))
    assert torch.allclose(out[1], full[1], atol=1e-5)
