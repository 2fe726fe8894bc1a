"""Draft trees: more than one continuation from the same DLM pass, verified in one target pass.

A round's single path uses one candidate per lattice position; the lattice holds more.
:func:`build_tree` keeps the CPS path as the tree's spine and adds ``extra`` nodes best
first: a node's score is the drafter's log-probability of its whole branch, Σ log q_i over
its tokens (the lattice positions are the drafter's per-position distributions), and the
next node added is the best-scoring child, among lattice candidates at the next position,
of any node already in the tree (children of one node are distinct tokens; a node holding
EOS gets none; no node lies past the lattice's length). With ``extra = 0`` the tree is the
path.

Layout, per row: nodes ``0 .. N-1`` in creation order (every parent before its children),
``parent[j]`` the index of node j's parent or -1 for a child of the root (the row's newest
token, which the verify pass feeds first), ``depth[j]`` 1 for the root's children. The target
scores ``[root, node 0, .., node N-1]`` in one pass (:meth:`diffuspec.target.TargetRunner.
forward` with ``tree_parent``): node j sits at position ``start + depth[j]`` and attends to
the row's cache and to its own ancestors only, so its logits are the target's next-token
distribution after its branch, as if that branch had been fed alone.

Worked example (the tests write out its mask)::

    root ── a(0) ── b(1) ── c(3)          parent = [-1, 0, -1, 1]
       └─── d(2)                          depth  = [ 1, 2,  1, 3]

Acceptance (:func:`diffuspec.verify.accept_tree`) walks down from the root: at each node it
takes the target's own token there (its argmax, or its sample at that output position's
uniform) and moves to the child holding that token; the first token no child holds is
emitted as the next token. Every emitted token is the one plain decoding would emit (greedy)
or draw (sampling, the same uniform at the same output position), whatever the tree, so
the output is exactly the target's; the tree only decides how many of them one pass
confirms. The accepted branch's keys and values are then moved into place in the cache
(:meth:`diffuspec.kvcache.RaggedKVCache.move`); nothing is recomputed.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
import torch

from .lattice import Lattice


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [B, N] int64: node tokens
    parent: torch.Tensor  # [B, N] int64: parent node index, -1 for a child of the root
    depth: torch.Tensor   # [B, N] int64: 1 for the root's children
    valid: torch.Tensor   # [B, N] bool: False for padding nodes (rows with smaller trees)

    @property
    def nodes(self) -> int:
        return self.tokens.shape[1]


def build_tree(lattice: Lattice, path: torch.Tensor, extra: int, eos_token_id: int | None) -> DraftTree:
    """The spine ``path [B, k]`` (its first ``lattice.length[b]`` tokens) plus up to ``extra``
    best-first nodes per row from the lattice (see the module docstring). Host work: a few
    dozen heap operations per row."""
    tokens = lattice.tokens.cpu().numpy()
    logq = lattice.logq.detach().float().cpu().numpy()
    valid = lattice.valid.cpu().numpy()
    length = lattice.length.cpu().numpy()
    spine = path.cpu().numpy()
    rows = [_row_tree(tokens[b], logq[b], valid[b], int(length[b]), spine[b], extra, eos_token_id)
            for b in range(tokens.shape[0])]
    n = max([len(r[0]) for r in rows] + [1])
    out_tok = np.zeros((len(rows), n), np.int64)
    out_par = np.full((len(rows), n), -1, np.int64)
    out_dep = np.ones((len(rows), n), np.int64)
    out_ok = np.zeros((len(rows), n), bool)
    for b, (tok, par, dep) in enumerate(rows):
        out_tok[b, : len(tok)], out_par[b, : len(tok)], out_dep[b, : len(tok)] = tok, par, dep
        out_ok[b, : len(tok)] = True
    dev = lattice.tokens.device
    return DraftTree(*(torch.from_numpy(a).to(dev) for a in (out_tok, out_par, out_dep, out_ok)))


def _row_tree(tokens: np.ndarray, logq: np.ndarray, valid: np.ndarray, length: int, spine: np.ndarray, extra: int,
              eos: int | None) -> tuple[list[int], list[int], list[int]]:
    """One row: (tokens, parents, depths) of the spine, then the best-first extra nodes."""
    scored = np.where(valid[:length], logq[:length], -np.inf)
    order = np.argsort(-scored, axis=1, kind="stable")                  # [length, M]: best first
    ranked_tok = np.take_along_axis(tokens[:length], order, 1)
    ranked_lq = np.take_along_axis(scored, order, 1)
    n_valid = valid[:length].sum(1)

    def cands(i: int) -> tuple[np.ndarray, np.ndarray]:  # position i's valid candidates by log q, best first
        return ranked_tok[i, : n_valid[i]], ranked_lq[i, : n_valid[i]]

    tok: list[int] = []
    par: list[int] = []
    dep: list[int] = []
    score: list[float] = []
    children: list[set[int]] = []  # per node, the tokens of its children (root: index -1 → last entry)
    root_children: set[int] = set()
    for i in range(length):
        t = int(spine[i])
        at = np.nonzero((tokens[i] == t) & valid[i])[0]
        lq = float(logq[i, at[0]]) if len(at) else float("-inf")
        tok.append(t), par.append(i - 1), dep.append(i + 1)
        score.append((score[-1] if i else 0.0) + lq)
        (children[-1] if i else root_children).add(t)
        children.append(set())
        if eos is not None and t == eos:
            break
    heap: list[tuple[float, int, int]] = []  # (-score of the child, parent node (-1: root), candidate rank)

    def push(node: int, rank: int) -> None:
        d = dep[node] if node >= 0 else 0  # the child sits at lattice position d
        if d >= length or (node >= 0 and eos is not None and tok[node] == eos):
            return
        if rank < len(cands(d)[0]):
            base = score[node] if node >= 0 else 0.0
            heapq.heappush(heap, (-(base + float(cands(d)[1][rank])), node, rank))

    push(-1, 0)
    for node in range(len(tok)):
        push(node, 0)
    added = 0
    while heap and added < extra:
        neg, node, rank = heapq.heappop(heap)
        d = dep[node] if node >= 0 else 0
        t = int(cands(d)[0][rank])
        push(node, rank + 1)
        siblings = children[node] if node >= 0 else root_children
        if t in siblings or neg == float("inf"):
            continue
        siblings.add(t)
        tok.append(t), par.append(node), dep.append(d + 1), score.append(-neg)
        children.append(set())
        push(len(tok) - 1, 0)
        added += 1
    return tok, par, dep


def with_root(per_node: torch.Tensor, root: int = 0) -> torch.Tensor:
    """[B, N] per-node values → [B, N+1] over the block ``[root, node 0, .., node N-1]``, the
    root's value first (a depth of 0, a parent that is itself)."""
    return torch.cat([per_node.new_full((per_node.shape[0], 1), root), per_node], dim=1)


def ancestor_mask(parent: torch.Tensor) -> torch.Tensor:
    """[B, N] parents → [B, N+1, N+1] bool over the block ``[root, node 0, .., node N-1]``:
    entry (i, j) is True when j is i itself or one of its ancestors (the root is everyone's).
    The transitive closure of "is the parent of", by repeated squaring (log2 N products)."""
    b, n = parent.shape
    dev = parent.device
    block_parent = with_root(parent + 1)  # block indices; the root's parent is itself
    reach = torch.zeros(b, n + 1, n + 1, device=dev)
    reach.scatter_(2, block_parent[:, :, None], 1.0)
    reach += torch.eye(n + 1, device=dev)
    for _ in range(max(n, 1).bit_length()):  # paths of length <= 2^steps
        reach = (reach @ reach).clamp_(max=1.0)
    return reach > 0
