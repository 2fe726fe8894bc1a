"""Kernels for the proposal half of a round (import name ``diffuspec_kernels``).

Two stages run between the drafter's pass and the target's: the lattice build and the
causal-consistency path search (CPS) with its n-gram proxy. Their references live in
:mod:`diffuspec.lattice`, :mod:`diffuspec.cps` and :mod:`diffuspec.proxy`; this package
holds faster implementations of the same two stages, each tested against the reference
(tests/test_kernels.py):

- ``compiled`` (:mod:`.cpu`): numba loops for CPU tensors;
- ``triton`` (:mod:`.gpu`): Triton kernels for CUDA tensors, one launch per stage.

Both read the online proxy as an :class:`diffuspec.proxy.OnlineNGram` updated with each
round's new tokens, where the reference refits it from the whole context.

:func:`select` resolves the ``kernels`` config key: ``"auto"`` takes Triton on CUDA, the
compiled path on a CPU and the reference elsewhere; a kernel that cannot load (no numba, no
Triton, an old GPU) falls back to the reference with one warning. ``"compiled"`` and
``"triton"`` ask for one path and raise when it cannot load.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from diffuspec.config import KERNELS, CPSConfig, LatticeConfig
from diffuspec.lattice import Lattice
from diffuspec.proxy import FlatNGram

logger = logging.getLogger(__name__)



@dataclass
class ProxyInputs:
    """The causal proxy as the kernels read it: the batch's online model (one segment per
    row), the corpus table when one is loaded, and the corpus's mixture weight."""

    online: FlatNGram      # (Triton: its arrays on the device, see TritonKernels.prepare_table)
    corpus: FlatNGram | None
    corpus_weight: float


class _Kernels:
    name = ""
    device = torch.device("cpu")

    def self_check(self) -> None:
        """Build and search a tiny lattice: compiles the kernels (or loads them from cache)
        and fails here, at selection, if they cannot run."""
        from diffuspec.proxy import OnlineNGram
        logq = torch.linspace(-3, 0, 16).reshape(1, 2, 8).log_softmax(-1).to(self.device)
        lattice = self.build_lattice(logq, torch.tensor([2], device=self.device), 7, LatticeConfig())
        online = OnlineNGram(3, 8, 1)
        online.update(torch.tensor([[1, 2, 3, 1, 2]]), torch.tensor([5]), self.add_ngrams)
        self.search_path(lattice, ProxyInputs(online.flat(), None, 0.5), torch.tensor([[2, 3]], device=self.device),
                         CPSConfig())


class CompiledKernels(_Kernels):
    """The numba path (CPU tensors)."""

    name = "compiled"

    def __init__(self) -> None:
        from . import cpu  # numba compiles (or loads its cache) on first call
        self._cpu = cpu
        self.add_ngrams = cpu.add_ngrams  # the online proxy's update (OnlineNGram.update)
        self.context_continuations = cpu.context_continuations  # retrieval candidates, [B, R, k]

    def prepare_table(self, table: FlatNGram, device: torch.device) -> FlatNGram:
        return table

    def build_lattice(self, logq: torch.Tensor, k: torch.Tensor, eos_token_id: int | None,
                      cfg: LatticeConfig) -> Lattice:
        m = min(cfg.max_candidates, logq.shape[-1])
        tokens, out, valid, length, gen_len = self._cpu.build_lattice(
            logq.detach().float().contiguous().numpy(), k.cpu().numpy().astype(np.int64),
            -1 if eos_token_id is None else int(eos_token_id), cfg.mass, m, cfg.eos_min_prob)
        return Lattice(tokens=torch.from_numpy(tokens), logq=torch.from_numpy(out), valid=torch.from_numpy(valid),
                       length=torch.from_numpy(length), gen_len=torch.from_numpy(gen_len))

    def search_path(self, lattice: Lattice, proxy: ProxyInputs, tail: torch.Tensor, cfg: CPSConfig,
                    return_scores: bool = False):
        online = proxy.online
        corpus = proxy.corpus if proxy.corpus is not None else _EMPTY
        path, score = self._cpu.search_path(
            lattice.tokens.numpy(), lattice.logq.detach().float().numpy(), lattice.valid.numpy(),
            lattice.length.numpy(), np.ascontiguousarray(tail.numpy()), cfg.lam, cfg.beam_width,
            *_model_args(online), *_model_args(corpus), proxy.corpus is not None, proxy.corpus_weight)
        path = torch.from_numpy(path)
        return (path, torch.from_numpy(score)) if return_scores else path


def _model_args(t: FlatNGram) -> tuple:
    return (t.keys, t.counts, t.ctx_keys, t.ctx_counts, t.ctx_types, t.key_off, t.ctx_off, t.order,
            np.float32(1.0 / t.vocab_size), t.per_row, t.keyed, t.compact)


_EMPTY = FlatNGram(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int64), np.zeros(0, np.float32),
                   np.zeros(0, np.float32), np.zeros(2, np.int64), np.zeros(2, np.int64), 1, 1)


def _load(kind: str):
    if kind == "compiled":
        kernels = CompiledKernels()
    else:
        from .gpu import TritonKernels
        kernels = TritonKernels()
    kernels.self_check()
    return kernels


def select(kind: str, device: torch.device):
    """The kernels for ``device`` under the config's ``kernels`` value; None = the reference."""
    if kind not in KERNELS:
        raise ValueError(f"kernels={kind!r} is not one of {list(KERNELS)}")
    if kind == "reference":
        return None
    want = kind if kind != "auto" else {"cuda": "triton", "cpu": "compiled"}.get(device.type)
    if want is None:
        return None
    if kind != "auto" and (want == "triton") != (device.type == "cuda"):
        raise ValueError(f"kernels={kind!r} cannot run on {device.type} tensors: the compiled path is for CPU "
                         "tensors and the Triton one for CUDA tensors; use kernels='auto'")
    try:
        return _load(want)
    except Exception as exc:
        if kind != "auto":
            raise RuntimeError(f"the {want} kernels could not load ({type(exc).__name__}: {exc}); install "
                               f"{'numba' if want == 'compiled' else 'triton'} or use kernels='reference'") from exc
        logger.warning("diffuspec: the %s kernels could not load (%s: %s); the reference lattice build and path "
                       "search run instead (slower, same output)", want, type(exc).__name__, exc)
        return None
