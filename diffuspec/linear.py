"""Few-row matrix products for the target's linear layers on a CPU.

A round verifies a handful of tokens: at batch 1 with a draft of 4, every linear layer of
the target multiplies a ``[5, in]`` activation by its ``[out, in]`` weight. On the 2-core
AMD EPYC this project is measured on, torch's CPU ``linear`` (MKL) runs such a product as
slowly as one matrix-vector product per row: the embedded target's 8192 × 512 output layer
took 0.25 ms for 1 row, 0.52 ms for 2 and 1.15 ms for 4, while the same product written as
``W @ xᵀ`` took 0.29 ms for 2 rows and 0.36 ms for 4. The whole target's verify pass at
batch 1 went from 12.5 to 7.1 ms for 2 tokens and from 11.5 to 8.6 ms for 5 (one token:
8.5 ms either way), and a plain step over 4 rows from 17.3 to 9.0 ms. Timed as whole passes
of 1 × M tokens, the few-row form took 0.63, 0.59, 0.80 of the usual time at M = 2, 4, 8,
but 1.16 at 12 and 0.91-1.02 from 16 to 64.

Whether that holds depends on the BLAS library and the CPU, so it is measured, not assumed:
:func:`few_row_limit` times the model's forward pass over M tokens both ways for M on a grid
(about a second for the embedded target; cached on disk beside the cost tables) and keeps
the largest M up to which the few-row form was clearly faster at every grid point (0:
never). :class:`FewRowLinear` applies it to the ``linear`` calls made inside it, as a
torch-function mode around the target's passes of at most that many tokens: the model
object is not changed, calls on other threads are not affected, and other passes pay
nothing. The two forms differ only in floating-point
rounding, as any two matrix-product kernels do; plain decoding and verification both run
through it, so greedy outputs stay equal to plain decoding's (the exactness tests).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .cost import _machine, _median_time, cache_dir

ROWS_GRID = (2, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64)  # tokens per pass timed
MARGIN = 0.9                       # W @ xᵀ is used where it took at most this fraction of linear's time

_limits: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def few_row_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` computed as ``(weight @ x2ᵀ)ᵀ`` over the rows x2 of x."""
    rows = x.reshape(-1, x.shape[-1])                                                # [M, in]
    if bias is None:
        out = torch.mm(weight, rows.t())                                             # [out, M]
    else:
        out = torch.addmm(bias[:, None], weight, rows.t())
    return out.t().reshape(*x.shape[:-1], weight.shape[0])


@torch.inference_mode()
def measure_limit(model: torch.nn.Module, rows_grid=ROWS_GRID, repeats: int = 5) -> int:
    """The largest token count of ``rows_grid`` up to which ``model``'s forward pass over
    that many tokens took at most ``MARGIN`` of its usual time with every linear layer in
    the few-row form (0: at none, starting with the first). The whole pass is timed, not
    one layer: a layer timed alone keeps its weights in cache, which a pass does not."""
    param = next(model.parameters())
    vocab = getattr(model.config, "vocab_size", None) or 2
    gen = torch.Generator().manual_seed(0)
    everywhere = FewRowLinear(max(rows_grid))
    limit = 0
    for m in rows_grid:
        ids = torch.randint(0, vocab, (1, m), generator=gen).to(param.device)

        def usual():
            model(input_ids=ids, use_cache=False)

        def few():
            with everywhere:
                model(input_ids=ids, use_cache=False)

        if _median_time(few, repeats) > MARGIN * _median_time(usual, repeats):
            break
        limit = m
    return limit


def _cache_path(model: torch.nn.Module) -> Path:
    param = next(model.parameters())
    config = getattr(model, "config", None)
    parts = {"machine": _machine(), "dtype": str(param.dtype), "grid": ROWS_GRID, "margin": MARGIN,
             "model": config.to_dict() if hasattr(config, "to_dict") else type(model).__name__}
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir() / f"few-rows-{key}.json"


def few_row_limit(model: torch.nn.Module) -> int:
    """How many tokens a pass of ``model`` may hold and still take the few-row form (see the
    module docstring): 0 off the CPU (GPU libraries handle few rows well) and where it did
    not measure faster. Measured once per model and process (about a second for the
    embedded target), cached on disk per machine, torch, dtype and model configuration."""
    if not isinstance(model, torch.nn.Module) or getattr(model, "config", None) is None:
        return 0  # not a transformers model (a stand-in in tests): the usual form
    known = _limits.get(model)
    if known is not None:  # every pass asks: no lock once measured
        return known
    with _lock:
        if model in _limits:
            return _limits[model]
        param = next(model.parameters(), None)
        limit = 0
        if param is not None and param.device.type == "cpu":
            path = _cache_path(model)
            try:
                limit = int(json.loads(path.read_text())["limit"])
            except (OSError, ValueError, KeyError, TypeError):
                limit = measure_limit(model)
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_suffix(f".{os.getpid()}.tmp")
                    tmp.write_text(json.dumps({"limit": limit}))
                    os.replace(tmp, path)
                except OSError:  # a read-only cache folder costs a re-measure next time, nothing else
                    pass
        _limits[model] = limit
        return limit


class FewRowLinear(TorchFunctionMode):
    """Inside it, ``F.linear`` over at most ``limit`` rows runs as :func:`few_row_linear`;
    everything else runs as usual."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, weight = args[0], args[1]
            if x.numel() <= self.limit * x.shape[-1]:
                return few_row_linear(x, weight, args[2] if len(args) > 2 else kwargs.get("bias"))
        return func(*args, **kwargs)


def few_row_mode(model: torch.nn.Module, tokens: int) -> FewRowLinear | None:
    """The mode to run ``model`` in for a pass over ``tokens`` tokens (all rows): None where
    the few-row form does not pay (one token, many tokens, a GPU), so such passes pay
    nothing for it."""
    if tokens < 2:
        return None
    limit = few_row_limit(model)
    return FewRowLinear(limit) if tokens <= limit else None
