"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

The target scores ``[last token, path_1 .. path_k]`` in one pass, giving ``p_1 .. p_{k+1}``
(``p_i`` is the target's distribution for path position i).

- Greedy: keep ``path_i`` while it equals ``argmax p_i``; then emit ``argmax p`` at the first
  mismatch, or the bonus ``argmax p_{k+1}`` after a fully kept path. Identical to target-only
  greedy decoding.
- Sampling: the path is a deterministic proposal (a point mass), so ``path_i`` is kept with
  probability ``p_i(path_i)``; on the first rejection the emitted token is drawn from ``p_i``
  with ``path_i`` removed and renormalised; after a fully kept path the bonus is drawn from
  ``p_{k+1}``. Each emitted token then has exactly the target's (warped) distribution.
"""

from __future__ import annotations

import torch


def warp_logits(
    logits: torch.Tensor,  # [..., V]
    temperature: float,
    top_k: int | None,
    top_p: float | None,
) -> torch.Tensor:         # [..., V] probabilities
    """Temperature, then top-k, then top-p (the order transformers applies them)."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if top_p is not None and top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        drop_sorted = mass_before >= top_p  # keeps the smallest set reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def _accepted_count(ok: torch.Tensor) -> torch.Tensor:  # ok: [B, k] bool → [B] int64
    return ok.to(torch.int64).cumprod(1).sum(1)


def accept_greedy(
    target_logits: torch.Tensor,  # [B, k+1, V]
    path: torch.Tensor,           # [B, k] int64
    path_len: torch.Tensor,       # [B] int64
) -> tuple[torch.Tensor, torch.Tensor]:  # n_accepted [B], next_token [B]
    best = target_logits.argmax(-1)                                            # [B, k+1]
    k = path.shape[1]
    in_path = torch.arange(k, device=path.device)[None, :] < path_len[:, None]
    n_acc = _accepted_count((path == best[:, :k]) & in_path)
    return n_acc, best.gather(1, n_acc[:, None]).squeeze(1)


def accept_sampling(
    target_logits: torch.Tensor,  # [B, k+1, V]
    path: torch.Tensor,           # [B, k] int64
    path_len: torch.Tensor,       # [B] int64
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # n_accepted [B], next_token [B]
    probs = warp_logits(target_logits, temperature, top_k, top_p)             # [B, k+1, V]
    b, k = path.shape
    in_path = torch.arange(k, device=path.device)[None, :] < path_len[:, None]
    p_path = probs[:, :k].gather(2, path[..., None]).squeeze(2)                # [B, k]
    u = torch.rand(b, k, device=path.device, generator=generator)
    n_acc = _accepted_count((u < p_path) & in_path)
    p_next = probs.gather(1, n_acc[:, None, None].expand(-1, 1, probs.shape[2])).squeeze(1)  # [B, V]
    rejected = n_acc < path_len
    rejected_tok = path.gather(1, n_acc.clamp(max=max(k - 1, 0))[:, None]) if k else torch.zeros(b, 1, dtype=torch.int64, device=path.device)
    residual = p_next.scatter(1, rejected_tok, 0.0)
    p_next = torch.where(rejected[:, None], residual, p_next)
    p_next = p_next / p_next.sum(-1, keepdim=True)
    next_token = torch.multinomial(p_next, 1, generator=generator).squeeze(1)
    return n_acc, next_token
