"""The AR target behind a preallocated, per-row KV cache.

Rows of a batch advance by different amounts each round (each keeps its own accepted
prefix), so the cache stores row b's tokens in columns ``[0, length[b])`` and a forward pass
writes each row's new tokens at that row's own columns. Rejected tokens are "trimmed" by not
advancing ``length``: their slots are overwritten next round and never attended to, and the
accepted prefix is never recomputed.

It works with any transformers causal LM whose attention layers call
``past_key_values.update(key, value, layer_idx)`` and take a prepared 4-D mask as it is (Llama,
Qwen2, Mistral, ... families), without ``generate()`` in the loop.
"""

from __future__ import annotations

import torch


class RaggedKVCache:
    """Duck-typed ``transformers`` cache with per-row write positions."""

    is_compileable = False

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch = batch
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.write_pos: torch.Tensor | None = None  # [B, n] columns of this forward's tokens
        self.visible = 0                            # columns returned to attention

    def update(self, key_states, value_states, layer_idx, cache_kwargs=None):
        # key_states: [B, kv_heads, n, head_dim]
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
        if self.keys[layer_idx] is None:
            b, h, _, d = key_states.shape
            shape = (b, h, self.capacity, d)
            self.keys[layer_idx] = key_states.new_zeros(shape)
            self.values[layer_idx] = value_states.new_zeros(shape)
        k_buf, v_buf = self.keys[layer_idx], self.values[layer_idx]
        rows = torch.arange(k_buf.shape[0], device=k_buf.device)[:, None]
        # Padding queries of short rows (and rows already finished) can run past the end;
        # their keys are garbage that no real query reads, so they may share the last slot.
        pos = self.write_pos.clamp(max=self.capacity - 1)
        k_buf[rows, :, pos] = key_states.transpose(1, 2)
        v_buf[rows, :, pos] = value_states.transpose(1, 2)
        return k_buf[:, :, : self.visible], v_buf[:, :, : self.visible]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible

    def __len__(self) -> int:
        return len(self.keys)


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
    ) -> torch.Tensor:            # [B, n or keep, V] logits
        b, n = input_ids.shape
        visible = min(int(start.max()) + n, self.cache.capacity)  # host metadata: no device sync
        pos = (start[:, None] + torch.arange(n)[None, :]).to(input_ids.device)  # [B, n]
        self.cache.write_pos = pos
        self.cache.visible = visible
        cols = torch.arange(visible, device=input_ids.device)
        allowed = cols[None, None, :] <= pos[:, :, None]                       # [B, n, visible]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=input_ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]  # [B, 1, n, visible]
        out = self.model(input_ids=input_ids, position_ids=pos, past_key_values=self.cache, use_cache=True,
                         attention_mask=mask, logits_to_keep=keep)
        return out.logits
