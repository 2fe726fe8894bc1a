"""The drafter contract, and the drafter built on the native bidirectional transformer.

A *drafter* is a diffusion language model (DLM): given a batch of prefixes and a draft
length k per row, ONE forward pass over ``[prefix, MASK × k]`` yields a distribution for
each of the k masked positions. The engine only ever calls :meth:`DiffusionDrafter.draft`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from .model import BidirectionalTransformer


class DiffusionDrafter(nn.Module, ABC):
    """Base class of every drafter the engine accepts.

    Attributes set by subclasses: ``mask_token_id`` (the id the drafter fills in),
    ``vocab_size`` (width of the returned logits), ``max_positions`` (longest input).
    """

    mask_token_id: int
    vocab_size: int
    max_positions: int

    @abstractmethod
    def draft(
        self,
        tokens: torch.Tensor,       # [B, T] int64 on the model's device: row b's prefix is tokens[b, :lengths[b]]
        lengths: torch.Tensor,      # [B] int64 on the CPU (host metadata, no device sync), >= 1
        k: torch.Tensor,            # [B] int64 on the CPU: masks to fill per row (0 allowed)
        context: int | None = None,  # see only the last `context` prefix tokens (None: all)
    ) -> torch.Tensor:              # [B, max(k), vocab] float logits; row b valid for i < k[b]
        """One forward pass over each row's ``[prefix, MASK × k[b]]``."""


def build_masked_input(
    tokens: torch.Tensor,   # [B, T] int64 (device)
    lengths: torch.Tensor,  # [B] int64 (CPU)
    k: torch.Tensor,        # [B] int64 (CPU)
    mask_token_id: int,
    pad_token_id: int,
    context: int | None,
):
    """Right-padded ``[prefix tail, MASK × k]`` rows, gathered without a Python loop.

    Returns ``ids [B, W]``, ``real [B, W]`` (True where a prefix or mask token sits) and
    ``n_prefix [B]`` (prefix tokens kept per row; the first mask is at column n_prefix), all
    on the device of ``tokens``.
    """
    n_prefix = lengths if context is None else lengths.clamp(max=context)
    width = int((n_prefix + k).max())  # host metadata: no device sync
    dev = tokens.device
    start, k, n_prefix = (lengths - n_prefix).to(dev), k.to(dev), n_prefix.to(dev)
    col = torch.arange(width, device=dev)[None, :]                             # [1, W]
    src = (start[:, None] + col).clamp(max=tokens.shape[1] - 1)                # [B, W]
    ids = tokens.gather(1, src)
    is_mask = (col >= n_prefix[:, None]) & (col < (n_prefix + k)[:, None])
    real = col < (n_prefix + k)[:, None]
    ids = torch.where(is_mask, torch.full_like(ids, mask_token_id), ids)
    ids = torch.where(real, ids, torch.full_like(ids, pad_token_id))
    return ids, real, n_prefix


class TransformerDrafter(DiffusionDrafter):
    """A Dream- or LLaDA-format DLM on the native :class:`BidirectionalTransformer`.

    ``shifted``: Dream predicts the token at position j from the output at j-1 (as an AR
    model does), so mask position j is read at j-1; LLaDA reads it at j.
    """

    def __init__(self, net: BidirectionalTransformer, *, mask_token_id: int, pad_token_id: int,
                 shifted: bool, format: str, config: dict | None = None) -> None:
        super().__init__()
        self.net = net
        self.mask_token_id = int(mask_token_id)
        self.pad_token_id = int(pad_token_id)
        self.shifted = bool(shifted)
        self.format = format
        self.config = dict(config or {})
        self.vocab_size = net.spec.vocab_size
        self.max_positions = net.spec.max_position_embeddings

    def draft(self, tokens, lengths, k, context=None):
        kmax = int(k.max())
        ids, real, n_prefix = build_masked_input(tokens, lengths, k, self.mask_token_id, self.pad_token_id, context)
        read = n_prefix[:, None] + torch.arange(kmax, device=ids.device)[None, :]  # [B, kmax]
        if self.shifted:
            read = read - 1
        read = read.clamp(0, ids.shape[1] - 1)
        return self.net(ids, key_padding=real, read_index=read)
