"""Acceptance rules: which drafted tokens the target keeps, and the token it adds.

The target scores ``[last token, path_1 .. path_k]`` in one pass, giving ``p_1 .. p_{k+1}``
(``p_i`` is the target's distribution for path position i).

- Greedy: keep ``path_i`` while it equals ``argmax p_i``; then emit ``argmax p`` at the first
  mismatch, or the bonus ``argmax p_{k+1}`` after a fully kept path. Identical to target-only
  greedy decoding.
- Sampling: at each position the target's own sample is drawn first, ``s_i = F_i⁻¹(u_i)``
  (the inverse CDF of the warped ``p_i`` at a uniform ``u_i``), and ``path_i`` is kept while
  it equals ``s_i``; the first ``s_i`` that differs (or ``s_{k+1}`` after a fully kept path)
  is emitted. Every emitted token is the target's own sample given the tokens before it, so
  the output has exactly the target's distribution, and ``path_i`` is kept with probability
  ``p_i(path_i)``, the point-mass rule's acceptance. The uniforms come from
  :func:`position_uniforms`, one per (request, output position): a seeded request's output
  is the same whatever was drafted, and the same as plain decoding with that seed.
"""

from __future__ import annotations

import torch

from .tree import with_root


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


_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    """A 64-bit constant as torch's int64 (two's complement)."""
    return x - (1 << 64) if x >= 1 << 63 else x


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bit patterns (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def position_uniforms(seed: int, request: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Uniforms in [0, 1), float64, one per (seed, request, position), by the splitmix64
    mixer on int64 bit patterns (multiplication wraps): a counter-based stream, so a
    request's draw at an output position does not depend on how many draws came before.
    ``request [B]`` int64, ``position [B, n]`` int64 → ``[B, n]``."""
    # The odd offset keeps the all-zero key (seed 0, request 0, position 0) away from the
    # mixer's fixed point 0, which would give every such draw u = 0.
    x = (torch.tensor(_signed(seed & _MASK64), dtype=torch.int64) * _signed(0xD1B54A32D192ED03)
         + request[:, None] * _signed(0x9E3779B97F4A7C15) + position * _signed(0xBF58476D1CE4E5B9)
         + _signed(0x2545F4914F6CDD1D))
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = (x ^ _shr(x, shift)) * _signed(mult)
    x = x ^ _shr(x, 31)
    return _shr(x, 11).to(torch.float64) * (1.0 / (1 << 53))


def sample_at(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The inverse-CDF sample of ``probs [..., V]`` at ``u [...]`` in [0, 1) (float64
    cumulative sums): the first token whose cumulative mass exceeds ``u`` times the total,
    so a token of probability 0 is never drawn (not even at u = 0)."""
    cdf = probs.double().cumsum(-1)
    token = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return token.clamp(max=probs.shape[-1] - 1)


def accept_sampling(
    target_logits: torch.Tensor,  # [B, k+1, V]
    path: torch.Tensor,           # [B, k] int64
    path_len: torch.Tensor,       # [B] int64
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    uniforms: torch.Tensor,       # [B, k+1] float64: the uniform of each position's draw
) -> tuple[torch.Tensor, torch.Tensor]:  # n_accepted [B], next_token [B]
    probs = warp_logits(target_logits, temperature, top_k, top_p)             # [B, k+1, V]
    samples = sample_at(probs, uniforms)                                       # [B, k+1]: the target's own draws
    k = path.shape[1]
    in_path = torch.arange(k, device=path.device)[None, :] < path_len[:, None]
    n_acc = _accepted_count((path == samples[:, :k]) & in_path)
    return n_acc, samples.gather(1, n_acc[:, None]).squeeze(1)


def accept_tree(
    target_logits: torch.Tensor,  # [B, N+1, V]: the root's, then each node's
    tokens: torch.Tensor,         # [B, N] int64: node tokens
    parent: torch.Tensor,         # [B, N] int64: parent node, -1 for the root's children
    valid: torch.Tensor,          # [B, N] bool
    depth: torch.Tensor,          # [B, N] int64: 1 for the root's children
    sampling: tuple[float, int | None, float | None, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # n_accepted [B], next_token [B], accepted nodes [B, D]
    """Walk a draft tree down from the root (see :mod:`diffuspec.tree`): at each node the
    target's own token (argmax; with ``sampling = (temperature, top_k, top_p, uniforms
    [B, D+1])`` its inverse-CDF sample at the uniform of that output position, the node's
    depth), then the child holding it. Returns how many nodes were accepted, the token
    after them, and the accepted nodes' indices by depth (-1 past the end). A chain is the
    single-path rule exactly."""
    b, n = tokens.shape
    dev = tokens.device
    if sampling is None:
        target = target_logits.argmax(-1)                                          # [B, N+1]
    else:
        temperature, top_k, top_p, uniforms = sampling
        u = uniforms.gather(1, with_root(depth).clamp(max=uniforms.shape[1] - 1))
        target = sample_at(warp_logits(target_logits, temperature, top_k, top_p), u)
    levels = int(depth.masked_fill(~valid, 0).max()) if n else 0
    cur = torch.zeros(b, dtype=torch.int64, device=dev)       # block index: 0 is the root
    alive = torch.ones(b, dtype=torch.bool, device=dev)
    n_acc = torch.zeros(b, dtype=torch.int64, device=dev)
    accepted = torch.full((b, levels), -1, dtype=torch.int64, device=dev)
    for d in range(levels):
        want = target.gather(1, cur[:, None])                                        # [B, 1]
        match = valid & (parent + 1 == cur[:, None]) & (tokens == want) & alive[:, None]
        found = match.any(1)
        node = match.to(torch.int64).argmax(1)                                        # siblings are distinct
        cur = torch.where(found, node + 1, cur)
        accepted[:, d] = torch.where(found, node, torch.full_like(node, -1))
        n_acc += found
        alive &= found
    return n_acc, target.gather(1, cur[:, None]).squeeze(1), accepted
