"""A preallocated KV cache whose rows advance by different amounts: the target's and the drafter's.

Rows of a batch advance by different amounts each round (each keeps its own accepted
prefix), so the cache stores row b's tokens in columns ``[0, length[b])`` and a forward pass
writes each row's new tokens at that row's own columns (``write_pos``). Rejected tokens are
"trimmed" by not advancing a row's length: their slots are overwritten by the next pass and
never attended to meanwhile (the attention mask hides them), so nothing accepted is ever
recomputed.

The object is duck-typed to what transformers' attention layers call on a cache
(``update``, ``get_seq_length``, ``len``) and to what the native drafter transformer calls
(``update``), so one class serves the target (:mod:`diffuspec.target`) and the drafter's
prefix cache (:class:`diffuspec.drafters.DrafterState`).
"""

from __future__ import annotations

import torch


class RaggedKVCache:
    """Per layer ``keys/values [B, kv_heads, capacity, head_dim]``, allocated on first write."""

    is_compileable = False

    def __init__(self, batch: int, capacity: int) -> None:
        self.batch = batch
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.write_pos: torch.Tensor | None = None  # [B, n] int64 (device): columns of this pass's tokens
        self.visible = 0                            # columns returned to attention (host int)

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

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy each row's keys/values from columns ``src [B, n]`` to ``dst [B, n]`` (int64,
        device): the accepted branch of a draft tree into place after the row's prefix.
        Pairs with src == dst are no-ops; all sources are read before anything is written."""
        rows = torch.arange(src.shape[0], device=src.device)[:, None]
        for buffers in (self.keys, self.values):
            for buf in buffers:
                if buf is not None:
                    buf[rows, :, dst] = buf[rows, :, src]

    @staticmethod
    def _allocation(buf: torch.Tensor) -> torch.Tensor:
        """The tensor whose first rows ``buf`` is (rows that left the batch keep their memory,
        and rows that join it fill it again), or ``buf`` itself."""
        base = buf._base
        if base is not None and base.shape[1:] == buf.shape[1:] and base.data_ptr() == buf.data_ptr():
            return base
        return buf

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` ([R] int64), in that order (finished rows leave).
        Rows already in place are not copied: with ``index[i] == i`` for most i (the engine
        fills the places of finished rows from the end of the batch), only the few rows that
        move are, instead of the whole cache (~7 MB a row for the embedded target)."""
        moved = torch.nonzero(index != torch.arange(len(index), device=index.device)).flatten()
        sources = index[moved]
        for buffers in (self.keys, self.values):
            for layer, buf in enumerate(buffers):
                if buf is None:
                    continue
                whole = self._allocation(buf)
                if moved.numel():  # the sources are gathered before any write
                    whole[moved.to(buf.device)] = whole[sources.to(buf.device)]
                buffers[layer] = whole[: len(index)]
        self.batch = len(index)

    def take(self, index: torch.Tensor) -> "RaggedKVCache":
        """A new cache holding a copy of the rows ``index`` ([R] int64), in that order."""
        part = RaggedKVCache(len(index), self.capacity)
        for buffers, mine in ((part.keys, self.keys), (part.values, self.values)):
            buffers.extend(None if buf is None else buf.index_select(0, index.to(buf.device)) for buf in mine)
        return part

    def put(self, index: torch.Tensor, part: "RaggedKVCache") -> None:
        """Write the rows of ``part`` (same capacity, from :meth:`take`) back as rows ``index``."""
        assert part.capacity == self.capacity, (part.capacity, self.capacity)
        for buffers, theirs in ((self.keys, part.keys), (self.values, part.values)):
            buffers.extend([None] * (len(theirs) - len(buffers)))
            for layer, buf in enumerate(theirs):
                if buf is None:
                    continue
                if buffers[layer] is None:
                    buffers[layer] = buf.new_zeros((self.batch, *buf.shape[1:]))
                buffers[layer].index_copy_(0, index.to(buf.device), buf)

    def extend(self, other: "RaggedKVCache") -> None:
        """Append the rows of ``other`` (same capacity) after this cache's rows: into the memory
        of rows that left (:meth:`select`) where there is room, else into a new allocation."""
        assert other.capacity == self.capacity, (other.capacity, self.capacity)
        layers = max(len(self.keys), len(other.keys))
        rows = self.batch + other.batch
        for buffers, more in ((self.keys, other.keys), (self.values, other.values)):
            buffers.extend([None] * (layers - len(buffers)))
            for layer in range(layers):
                mine, theirs = buffers[layer], more[layer] if layer < len(more) else None
                like = mine if mine is not None else theirs
                if like is None:
                    continue
                mine = mine if mine is not None else like.new_zeros((self.batch, *like.shape[1:]))
                theirs = theirs if theirs is not None else like.new_zeros((other.batch, *like.shape[1:]))
                whole = self._allocation(mine)
                if whole.shape[0] >= rows:
                    whole[self.batch: rows] = theirs
                    buffers[layer] = whole[:rows]
                else:
                    buffers[layer] = torch.cat([mine, theirs])
        self.batch = rows

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.visible

    def __len__(self) -> int:
        return len(self.keys)
