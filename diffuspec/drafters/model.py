"""A native PyTorch non-causal transformer: the body of every drafter family we load.

Qwen2/Llama-style blocks (RMSNorm, rotary positions, grouped-query attention, SwiGLU MLP)
with *bidirectional* attention: every position sees every non-padding position, or, for
block-diffusion drafters (Fast-dLLM v2, SDAR), *block-causal* attention: positions are cut
into blocks of ``block_size`` (block = position // block_size); a token sees every token of
its own block and of earlier blocks. Parameter names follow the Qwen2 layout
(``model.layers.N.self_attn.q_proj``...), which is Dream's checkpoint layout; Qwen3-layout
checkpoints (SDAR) add ``self_attn.q_norm`` / ``self_attn.k_norm``, and the LLaDA loader
renames its weights onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class TransformerSpec:
    vocab_size: int           # rows of the embedding / lm_head (may exceed the tokenizer's ids)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    qkv_bias: bool = True       # Qwen2/Dream: True; LLaDA: usually False
    tie_embeddings: bool = False
    max_position_embeddings: int = 32768
    # Prefix tokens attend causally (to earlier tokens only); mask tokens see the whole
    # prefix and every mask. Dream/LLaDA are fully bidirectional (False); our recipe trains
    # prefix-causal drafters, for which a prefix KV cache is exact, not an approximation.
    prefix_causal: bool = False
    # Width of one attention head. None: hidden_size // num_heads (Qwen2, LLaDA); Qwen3-layout
    # checkpoints give it explicitly and it may differ (SDAR-4B: 128 with hidden 2560, 32 heads).
    # Resolved to an int on construction.
    head_dim: int | None = None
    # Qwen3 layout: an RMSNorm over head_dim on each query and key head (weights
    # self_attn.q_norm / self_attn.k_norm), after the projection and before rotary (SDAR).
    qk_norm: bool = False
    # Block-causal attention (block diffusion: Fast-dLLM v2's bd_size, SDAR's block_size): the
    # token at position p sees position q when q // block_size <= p // block_size, i.e.
    # bidirectional inside a block, causal across blocks. None: no blocks.
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                                 "give head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be a positive even number (rotary rotates halves)")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1 (or None for no blocks)")
        if self.block_size is not None and self.prefix_causal:
            raise ValueError("prefix_causal and block_size are two different attention rules; set one")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin of shape [batch, seq, head_dim] for rotate-half rotary embeddings."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq  # [B, L, head_dim/2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, L, head_dim]; cos/sin: [B, L, head_dim]
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class Attention(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        hd = spec.head_dim
        self.q_proj = nn.Linear(spec.hidden_size, spec.num_heads * hd, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(spec.hidden_size, spec.num_kv_heads * hd, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(spec.num_heads * hd, spec.hidden_size, bias=False)
        if spec.qk_norm:
            self.q_norm = RMSNorm(hd, spec.rms_norm_eps)
            self.k_norm = RMSNorm(hd, spec.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer_idx: int = 0):
        b, length, _ = x.shape
        hd, nh, nkv = self.spec.head_dim, self.spec.num_heads, self.spec.num_kv_heads
        q = self.q_proj(x).view(b, length, nh, hd)
        k = self.k_proj(x).view(b, length, nkv, hd)
        if self.spec.qk_norm:  # per head, before rotary (Qwen3 order)
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, length, nkv, hd).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:  # write this pass's keys/values, attend over the cached columns
            k, v = cache.update(k, v, layer_idx)
        if nkv != nh:
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, nh * hd))


class MLP(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.up_proj = nn.Linear(spec.hidden_size, spec.intermediate_size, bias=False)
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = Attention(spec)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = MLP(spec)

    def forward(self, x, cos, sin, attn_mask, cache=None, layer_idx: int = 0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, cache, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Body(nn.Module):
    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(Block(spec) for _ in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class BidirectionalTransformer(nn.Module):
    """Token ids → logits with non-causal attention: full over non-padding positions, or
    block-causal on ``position_ids`` when ``spec.block_size`` is set (unless ``attn_mask``
    says otherwise)."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Fresh-training initialisation (normal(0, std) weights, zero biases, unit norms)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    def forward(
        self,
        input_ids: torch.Tensor,                  # [B, L] int64
        key_padding: torch.Tensor | None = None,  # [B, L] bool, True = real token
        position_ids: torch.Tensor | None = None,  # [B, L] int64
        read_index: torch.Tensor | None = None,   # [B, R] int64: positions whose logits to return
        attn_mask: torch.Tensor | None = None,    # [B, 1, L, K] bool, True = may attend (overrides key_padding)
        cache=None,                               # a RaggedKVCache (diffuspec.kvcache) to write/read K/V
    ) -> torch.Tensor:                            # [B, R or L, vocab]
        b, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(b, length)
        x = self.model.embed_tokens(input_ids)
        cos, sin = rotary_cos_sin(position_ids, self.spec.head_dim, self.spec.rope_theta, x.dtype)
        if attn_mask is None and self.spec.block_size is not None:
            block = position_ids // self.spec.block_size                          # [B, L]
            attn_mask = (block[:, :, None] >= block[:, None, :])[:, None]         # [B, 1, L, L]
            if key_padding is not None:
                attn_mask = attn_mask & key_padding[:, None, None, :]
        elif attn_mask is None and key_padding is not None:
            attn_mask = key_padding[:, None, None, :]
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attn_mask, cache, i)
        if read_index is not None:
            x = x.gather(1, read_index[..., None].expand(-1, -1, x.shape[-1]))
        return self.lm_head(self.model.norm(x))
