"""The drafter contract, and the drafter built on the native bidirectional transformer.

A *drafter* is a diffusion language model (DLM): given a batch of prefixes and a draft
length k per row, ONE forward pass over ``[prefix, MASK × k]`` yields a distribution for
each of the k masked positions. The engine only ever calls :meth:`DiffusionDrafter.draft`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from ..kvcache import RaggedKVCache
from .model import BidirectionalTransformer


class DiffusionDrafter(nn.Module, ABC):
    """Base class of every drafter the engine accepts.

    Attributes set by subclasses: ``mask_token_id`` (the id the drafter fills in),
    ``vocab_size`` (width of the returned logits), ``max_positions`` (longest input).
    """

    mask_token_id: int
    vocab_size: int
    max_positions: int

    def new_state(self, batch: int, capacity: int):
        """Per-generation state carried across rounds (e.g. a prefix KV cache), or None."""
        return None

    def cacheable(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] int64 (CPU): prefix tokens per row a pass over prefixes of ``lengths`` leaves in
        the state's cache (a drafter with a prefix cache: the whole prefix by default)."""
        return lengths.clone()

    @abstractmethod
    def draft(
        self,
        tokens: torch.Tensor,       # [B, T] int64 on the model's device: row b's prefix is tokens[b, :lengths[b]]
        lengths: torch.Tensor,      # [B] int64 on the CPU (host metadata, no device sync), >= 1
        k: torch.Tensor,            # [B] int64 on the CPU: masks to fill per row (0 allowed)
        context: int | None = None,  # see only the last `context` prefix tokens (None: all)
        state=None,                 # what new_state() returned for this generation
    ) -> torch.Tensor:              # [B, max(k), vocab] float logits; row b valid for i < k[b]
        """One forward pass over each row's ``[prefix, MASK × k[b]]``."""


def build_masked_input(
    tokens: torch.Tensor,   # [B, T] int64 (device)
    start: torch.Tensor,    # [B] int64 (CPU): first prefix token fed this pass
    lengths: torch.Tensor,  # [B] int64 (CPU)
    k: torch.Tensor,        # [B] int64 (CPU)
    mask_token_id: int,
    pad_token_id: int,
):
    """Right-padded rows ``[tokens[start:length], MASK × k, pad...]``, gathered without a
    Python loop. Returns ``ids [B, W]`` and ``n_real [B]`` (prefix tokens fed per row; the
    first mask sits at column n_real), both on the device of ``tokens``."""
    n_real = lengths - start
    width = int((n_real + k).max())  # host metadata: no device sync
    dev = tokens.device
    start, k, n_real = start.to(dev), k.to(dev), n_real.to(dev)
    col = torch.arange(width, device=dev)[None, :]                             # [1, W]
    src = (start[:, None] + col).clamp(max=tokens.shape[1] - 1)                # [B, W]
    ids = tokens.gather(1, src)
    is_mask = (col >= n_real[:, None]) & (col < (n_real + k)[:, None])
    real = col < (n_real + k)[:, None]
    ids = torch.where(is_mask, torch.full_like(ids, mask_token_id), ids)
    ids = torch.where(real, ids, torch.full_like(ids, pad_token_id))
    return ids, n_real


def draft_attention_mask(offset: torch.Tensor, n_real: torch.Tensor, k: torch.Tensor, width: int, columns: int,
                         prefix_causal: bool, block_size: int | None = None,
                         origin: torch.Tensor | None = None) -> torch.Tensor:
    """[B, 1, width, columns] bool: may query j of row b (at column offset[b] + j) see column c?

    Mask queries see every prefix column and every mask of their row; prefix queries see
    earlier columns only (``prefix_causal``) or the same as the masks; padding queries look
    causally (any finite keys; their outputs are never read).

    Block-causal drafters (``block_size``): every query of the row, prefix token and mask
    alike, sees the row's columns whose block is not after its own, a block being absolute
    position // block_size. ``origin`` [B] is the absolute position of column 0 (the prefix
    tokens a truncated context left out; None: 0), so blocks stay where the model put them."""
    dev = offset.device
    j = torch.arange(width, device=dev)[None, :, None]                        # [1, W, 1]
    c = torch.arange(columns, device=dev)[None, None, :]                       # [1, 1, C]
    pos = offset[:, None, None] + j                                            # [B, W, 1]
    row_end = (offset + n_real + k)[:, None, None]
    is_real = j < n_real[:, None, None]
    is_mask = (j >= n_real[:, None, None]) & (pos < row_end)
    sees_row = c < row_end
    causal = c <= pos
    if block_size is not None:
        shift = 0 if origin is None else origin[:, None, None]
        same_or_earlier_block = (c + shift) // block_size <= (pos + shift) // block_size
        return torch.where(is_real | is_mask, sees_row & same_or_earlier_block, causal)[:, None]
    real_rule = causal if prefix_causal else sees_row
    allowed = torch.where(is_mask, sees_row, torch.where(is_real, real_rule, causal))
    return allowed[:, None]


@dataclass
class RowCache:
    """One row's slice of a :class:`DrafterState`: per layer, keys and values
    ``[kv_heads, length, head_dim]`` of the row's first ``length`` prefix tokens."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class DrafterState:
    """A drafter's prefix KV cache for one generation: ``cached[b]`` tokens of row b have
    their keys/values in ``cache`` (every prefix token but the newest few)."""

    def __init__(self, batch: int, capacity: int) -> None:
        self.cache = RaggedKVCache(batch, capacity)
        self.cached = torch.zeros(batch, dtype=torch.int64)  # CPU

    def load_rows(self, rows: list[RowCache | None]) -> "DrafterState":
        """Start this fresh state's row j from ``rows[j]`` (None: nothing cached), for callers
        whose batches change between rounds (vLLM): they keep each request's rows."""
        known = {j: r for j, r in enumerate(rows) if r is not None and r.length > 0}
        if not known:
            return self
        first = next(iter(known.values()))
        for layer in range(len(first.keys)):
            for kind, buffers in (("keys", self.cache.keys), ("values", self.cache.values)):
                like = getattr(first, kind)[layer]
                buf = like.new_zeros(self.cache.batch, like.shape[0], self.cache.capacity, like.shape[2])
                for j, r in known.items():
                    buf[j, :, : r.length] = getattr(r, kind)[layer]
                buffers.append(buf)
        self.cached = torch.tensor([known[j].length if j in known else 0 for j in range(len(rows))], dtype=torch.int64)
        return self

    def select(self, index: torch.Tensor) -> None:
        """Keep only the rows ``index`` ([R] int64, CPU), in that order."""
        self.cache.select(index)
        self.cached = self.cached.index_select(0, index)

    def extend(self, rows: int) -> None:
        """Append ``rows`` rows with nothing cached."""
        self.cache.extend(RaggedKVCache(rows, self.cache.capacity))
        self.cached = torch.cat([self.cached, torch.zeros(rows, dtype=torch.int64)])

    def take(self, index: torch.Tensor) -> "DrafterState":
        """A new state holding a copy of the rows ``index`` ([R] int64, CPU), in that order."""
        part = DrafterState(0, self.cache.capacity)
        part.cache, part.cached = self.cache.take(index), self.cached.index_select(0, index)
        return part

    def put(self, index: torch.Tensor, part: "DrafterState") -> None:
        """Write the rows of ``part`` (from :meth:`take`) back as rows ``index``."""
        self.cache.put(index, part.cache)
        self.cached[index] = part.cached

    def row(self, j: int) -> RowCache:
        """A copy of row j's cached prefix."""
        n = int(self.cached[j])
        return RowCache([k[j, :, :n].clone() for k in self.cache.keys], [v[j, :, :n].clone() for v in self.cache.values])


def quantize_int8(drafter: DiffusionDrafter, setting: bool | None) -> bool:
    """Apply the ``drafter_int8`` setting: swap the drafter's ``nn.Linear`` layers, in place,
    for dynamically quantized int8 ones (torch's CPU kernels). Returns whether it did.

    None quantizes where it pays and is supported (a float32 drafter on a CPU, a torch that
    still ships ``torch.ao.quantization``); True insists, naming what stands in the way."""
    if setting is False:
        return False
    param = next(drafter.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    reason = None
    if device.type != "cpu":
        reason = f"the drafter runs on {device}; int8 dynamic quantization has CPU kernels only"
    elif dtype != torch.float32:
        reason = f"the drafter is {dtype}; int8 dynamic quantization takes a float32 drafter (dtype=torch.float32)"
    else:
        try:
            from torch.ao.quantization import quantize_dynamic
        except ImportError:
            reason = f"torch {torch.__version__} has no torch.ao.quantization.quantize_dynamic"
    if reason is not None:
        if setting:
            raise ValueError(f"drafter_int8=True, but {reason}; leave drafter_int8 unset or False")
        return False
    import warnings
    with warnings.catch_warnings():  # torch marks its eager quantization API deprecated; it works as pinned
        warnings.simplefilter("ignore")
        quantize_dynamic(drafter, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return True


def set_prefix_cache(drafter: DiffusionDrafter, setting: bool | None) -> None:
    """Apply the ``drafter_cache`` setting (None keeps the drafter's own default)."""
    if setting is None:
        return
    if not hasattr(drafter, "prefix_cache"):
        raise ValueError(f"drafter_cache={setting} but {type(drafter).__name__} has no prefix cache; leave "
                         "drafter_cache unset")
    drafter.prefix_cache = bool(setting)


class TransformerDrafter(DiffusionDrafter):
    """A Dream-, LLaDA-, Fast-dLLM v2- or SDAR-format DLM on the native
    :class:`BidirectionalTransformer` (``format`` names the family).

    ``shifted``: Dream, DiffuCoder and Fast-dLLM v2 predict the token at position j from the
    output at j-1 (as an AR model does), so mask position j is read at j-1; LLaDA and SDAR
    read it at j.

    ``prefix_cache``: keep the prefix's keys/values across rounds, so a round feeds only the
    tokens accepted since the last one plus the masks. On by default where it is exact:
    prefix-causal drafters keep the whole prefix; block-causal ones (``spec.block_size``)
    keep its whole blocks only (see :meth:`cacheable`). For a fully bidirectional drafter
    (Dream, LLaDA) it is an approximation, which can change acceptance but never the output.
    """

    def __init__(self, net: BidirectionalTransformer, *, mask_token_id: int, pad_token_id: int,
                 shifted: bool, format: str, config: dict | None = None, prefix_cache: bool | None = None) -> None:
        super().__init__()
        self.net = net
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        self.shifted = bool(shifted)
        self.format = format
        self.config = dict(config or {})
        self.vocab_size = net.spec.vocab_size
        self.max_positions = net.spec.max_position_embeddings
        exact_cache = net.spec.prefix_causal or net.spec.block_size is not None
        self.prefix_cache = exact_cache if prefix_cache is None else bool(prefix_cache)

    def new_state(self, batch: int, capacity: int):
        return DrafterState(batch, capacity) if self.prefix_cache else None

    def cacheable(self, lengths: torch.Tensor) -> torch.Tensor:
        """[B] int64 (CPU): how many prefix tokens per row the cache may keep after a pass.

        Prefix-causal (and, approximately, bidirectional) drafters: the whole prefix. A
        block-causal drafter's keys/values of a block depend on every token of that block,
        and the last, partial block of a prefix shares its block with this pass's masks: its
        keys/values change when the block fills up next round. So only whole blocks are kept
        (a row's length rounded down to a multiple of block_size) and the partial block is fed
        again; whole blocks see nothing after them, which keeps the cache exact."""
        block = self.net.spec.block_size
        return lengths.clone() if block is None else lengths // block * block

    def draft(self, tokens, lengths, k, context=None, state=None):
        kmax = int(k.max())
        if state is None:
            start = lengths - (lengths if context is None else lengths.clamp(max=context))
            offset_cpu = torch.zeros_like(lengths)
        else:
            start = offset_cpu = state.cached
        ids, n_real = build_masked_input(tokens, start, lengths, k, self.mask_token_id, self.pad_token_id)
        dev, width = ids.device, ids.shape[1]
        offset = offset_cpu.to(dev)
        columns = min(int((offset_cpu + width).max()), state.cache.capacity) if state is not None else width
        spec = self.net.spec
        # Cached columns are absolute positions; without the cache, column 0 is prefix token `start`.
        origin = start.to(dev) if state is None and spec.block_size is not None else None
        mask = draft_attention_mask(offset, n_real, k.to(dev), width, columns, spec.prefix_causal, spec.block_size,
                                    origin)
        positions = offset[:, None] + torch.arange(width, device=dev)[None, :]
        read = n_real[:, None] + torch.arange(kmax, device=dev)[None, :] - (1 if self.shifted else 0)
        read = read.clamp(0, width - 1)                                          # [B, kmax]
        if state is not None:
            state.cache.write_pos = positions
            state.cache.visible = columns
            state.cached = self.cacheable(lengths)
        return self.net(ids, position_ids=positions, read_index=read, attn_mask=mask,
                        cache=state.cache if state is not None else None)
