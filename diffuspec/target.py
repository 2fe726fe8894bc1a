"""The AR target behind a preallocated, per-row KV cache (:class:`~diffuspec.kvcache.RaggedKVCache`).

Each row's cache holds its accepted tokens in columns ``[0, start[b])``; a pass over ``[B, n]``
new tokens writes them at ``start[b] .. start[b] + n - 1`` and attends causally through an
explicit 4-D mask, so rows of different lengths share one batched forward.

It works with any transformers causal LM whose attention layers call
``past_key_values.update(key, value, layer_idx)`` and take a prepared 4-D mask as it is (Llama,
Qwen2, Mistral, ... families), without ``generate()`` in the loop.
"""

from __future__ import annotations

import contextlib

import torch

from .kvcache import RaggedKVCache
from .linear import few_row_mode
from .tree import ancestor_mask, with_root

# What one extra target pass costs, in tokens of padding it saves: a prefill of prompts of
# different lengths pads each to the longest of its pass, so prompts are prefilled in passes
# of similar lengths (prefill_passes). Measured with the embedded target on the 2-core CPU:
# a pass's fixed cost is that of ~20-30 tokens; on a GPU padding is nearly free.
PASS_TOKENS = {"cpu": 32, "cuda": 1024}


def prefill_passes(lengths: list[int], pass_tokens: int) -> list[tuple[int, int]]:
    """Split rows sorted by ascending ``lengths`` (tokens each row prefills) into passes
    ``[start, end)`` minimising ``Σ (pass_tokens + rows × longest)`` over the passes with
    any token to prefill (each row padded to its pass's longest). Dynamic programming over
    the cut points, O(n²).

    Example: lengths [10, 12, 100, 110], pass_tokens 32 → [(0, 2), (2, 4)]: 56 + 252 tokens'
    worth, where one pass would cost 32 + 440."""
    n = len(lengths)
    best = [0.0] + [float("inf")] * n  # best[i]: the cheapest split of rows [0, i)
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        longest = lengths[i - 1]
        for j in range(i):
            cost = best[j] + (pass_tokens + (i - j) * longest if longest > 0 else 0)
            if cost < best[i]:
                best[i], cut[i] = cost, j
    passes, i = [], n
    while i > 0:
        passes.append((cut[i], i))
        i = cut[i]
    return passes[::-1]


class TargetRunner:
    """Runs the target over ``[B, n]`` new tokens that start at per-row cache lengths."""

    def __init__(self, model, batch: int, capacity: int) -> None:
        self.model = model
        self.cache = RaggedKVCache(batch, capacity)
        self.dtype = next(model.parameters()).dtype

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, n] int64 (device)
        start: torch.Tensor,      # [B] int64 (CPU): cache length of each row before this pass
        keep: int = 0,            # logits for the last `keep` positions only (0: all); prefill keeps 1
        tree: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:            # [B, n or keep, V] logits
        """``tree``: (parent [B, n-1], depth [B, n-1]) of the draft tree whose nodes follow the
        root token ``input_ids[:, 0]`` (:mod:`diffuspec.tree`): block column j of a row is
        written at cache column ``start + j`` and sits at position ``start + depth``, and
        attends to the cache and to its ancestors in the block only."""
        b, n = input_ids.shape
        dev = input_ids.device
        visible = min(int(start.max()) + n, self.cache.capacity)  # host metadata: no device sync
        write = (start[:, None] + torch.arange(n)[None, :]).to(dev)               # [B, n]
        self.cache.write_pos = write
        self.cache.visible = visible
        cols = torch.arange(visible, device=dev)
        if tree is None:
            pos = write
            allowed = cols[None, None, :] <= pos[:, :, None]                       # [B, n, visible]
        else:
            parent, depth = tree
            start_dev = start.to(dev)
            pos = start_dev[:, None] + with_root(depth)
            in_block = cols[None, :] - start_dev[:, None]                            # [B, visible]
            anc = ancestor_mask(parent)                                             # [B, n, n]
            block = anc.gather(2, in_block.clamp(0, n - 1)[:, None, :].expand(b, n, visible))
            allowed = (in_block < 0)[:, None, :] | (block & (in_block < n)[:, None, :])
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=dev)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]  # [B, 1, n, visible]
        # a pass over a few tokens (a verify pass, a plain step over a few rows) takes the
        # faster form of the linear layers' products where this machine measured one (diffuspec.linear)
        with few_row_mode(self.model, b * n) or contextlib.nullcontext():
            out = self.model(input_ids=input_ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                             attention_mask=mask, logits_to_keep=keep)
        return out.logits
