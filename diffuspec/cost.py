"""Measured round costs: what a verify pass and a proposal cost, by the shape of the batch.

The cost-aware draft-length policy (:mod:`diffuspec.scheduler`) chooses draft lengths from
these numbers, so they are measured on the machine that runs, not guessed:

- ``verify[rows][width]``: seconds for the target to run ``rows`` rows of ``width`` new
  tokens each (a round verifies ``k + 1`` tokens per row, padded to the longest row) over a
  KV cache of ``context`` tokens;
- ``propose[rows][k]``: seconds for the proposal half (drafter pass, lattice, path search)
  over ``rows`` rows drafting ``k`` tokens, the drafter's prefix cache warm.

A table is profiled lazily, a few batch sizes at a time as batches of those sizes appear
(well under a second per batch size for the embedded pair on 2 CPU cores), saved under
``$DIFFUSPEC_CACHE/costs/`` (default ``~/.cache/diffuspec``) keyed by the models, device,
dtype, torch version and machine, and reloaded by later runs. Between grid points it is
interpolated linearly (batch size on a log scale). At run time a correction per kind and
batch size, the running ratio of measured to predicted time, follows the machine's actual
speed (real prompts give narrower lattices than the random tokens profiled here, a busy
machine is slower).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import platform
import statistics
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .propose import COLD_SPAN

ROW_GRID = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WIDTH_GRID = (1, 2, 3, 5, 9, 17, 33)   # tokens per row in a verify pass (k + 1)
K_GRID = (1, 2, 4, 8, 16, 32)          # draft lengths of a proposal
PROFILE_CONTEXT = 256                           # tokens already cached when profiling
PROFILE_METHOD = 2  # how tables are timed (_fastest_times); tables timed otherwise are profiled again


def _interp(points: dict[int, float], x: float, log: bool = False) -> float:
    """Piecewise-linear interpolation of ``points`` at x (linear extrapolation outside, >= 0)."""
    xs = sorted(points)
    if not xs:  # nothing measured (yet): no prediction
        return 0.0
    if len(xs) == 1:
        return points[xs[0]]
    i = min(max(bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1 = xs[i - 1], xs[i]
    f = (lambda v: math.log(v)) if log else (lambda v: v)
    t = (f(x) - f(x0)) / (f(x1) - f(x0))
    return max(points[x0] + t * (points[x1] - points[x0]), 0.0)


def _interp2(table: dict[int, dict[int, float]], rows: float, col: float) -> float:
    """Interpolate a rows → col → seconds table: along col within each measured row count,
    then along rows on a log scale."""
    return _interp({r: _interp(cols, col) for r, cols in table.items()}, rows, log=True)


@dataclass
class CostTable:
    """Seconds per verify pass and per proposal, by batch shape (see the module docstring)."""

    key: str
    context: int = PROFILE_CONTEXT
    verify: dict[int, dict[int, float]] = field(default_factory=dict)   # rows → width → s
    propose: dict[int, dict[int, float]] = field(default_factory=dict)  # rows → k → s
    machine: dict = field(default_factory=dict)
    # seconds per context token a proposal encodes beyond its prefix cache (a request's first
    # draft encodes its prompt); None: not measured (a drafter without a prefix cache)
    encode: float | None = None

    def verify_time(self, rows: int, width: int) -> float:
        return _interp2(self.verify, rows, width)

    def propose_time(self, rows: int, k: int) -> float:
        return _interp2(self.propose, rows, k) if k > 0 and self.propose else 0.0

    def to_json(self) -> dict:
        return {"key": self.key, "context": self.context, "machine": self.machine,
                "verify": {str(r): {str(w): t for w, t in c.items()} for r, c in self.verify.items()},
                "propose": {str(r): {str(k): t for k, t in c.items()} for r, c in self.propose.items()},
                "encode": self.encode}

    @classmethod
    def from_json(cls, data: dict) -> "CostTable":
        def table(d):
            return {int(r): {int(c): float(t) for c, t in cols.items()} for r, cols in d.items()}
        return cls(key=data.get("key", ""), context=int(data.get("context", PROFILE_CONTEXT)),
                   verify=table(data["verify"]), propose=table(data.get("propose", {})),
                   machine=data.get("machine", {}),
                   encode=None if data.get("encode") is None else float(data["encode"]))

    @classmethod
    def load(cls, path: str | Path) -> "CostTable":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            table = cls.from_json(data)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"cost table {str(path)!r} cannot be read ({type(exc).__name__}: {exc}); write one "
                             "with `python benchmarks/verify_cost.py --table OUT.json` or leave cost_table unset to "
                             "profile at start-up") from None
        if not table.verify and not table.propose:
            raise ValueError(f"cost table {str(path)!r} holds no times")
        return table

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        os.replace(tmp, path)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up (twice: a shape's first calls build kernels and buffers)
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _fastest_times(fns: dict, repeats: int) -> dict:
    """Seconds of each call in ``fns`` (key → fn): the fastest of ``repeats`` timings, taken
    in turns (every fn once, then again), after two warm-ups each. A slow spell of a shared
    machine (another process) then slows every point alike and the run-time correction
    follows the level, where timing each point in a block of its own (the median of three)
    can bend the curve: a table profiled that way on the 2-core EPYC had the embedded
    target's one-row passes of 9..33 tokens 30-45% slower than a later quiet measurement
    (18.0 against 12.6 ms for 9 tokens) while those of 1..5 tokens agreed within 8%."""
    for fn in fns.values():
        fn()
        fn()
    best = {key: float("inf") for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            best[key] = min(best[key], time.perf_counter() - t)
    return best


@torch.inference_mode()
def measure_verify(target, rows: int, widths=WIDTH_GRID, context: int = PROFILE_CONTEXT, repeats: int = 3,
                   vocab: int | None = None) -> dict[int, float]:
    """Seconds per verify pass of ``rows`` rows × ``width`` tokens over ``context`` cached tokens."""
    from .target import TargetRunner

    device = next(target.parameters()).device
    vocab = vocab or target.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    runner = TargetRunner(target, rows, context + max(widths) + 1)
    start = torch.full((rows,), context, dtype=torch.int64)
    runner.forward(torch.randint(0, vocab, (rows, context), generator=gen).to(device),
                   torch.zeros(rows, dtype=torch.int64), keep=1)
    x = torch.randint(0, vocab, (rows, max(widths)), generator=gen).to(device)
    return _monotone(_fastest_times({w: functools.partial(runner.forward, x[:, :w], start) for w in widths}, repeats))


def _random_contexts(proposer, rows: int, width: int, seed: int, vocab: int | None) -> torch.Tensor:
    """[rows, width] random token ids (seeded) on the proposer's drafter device: what profiling feeds it."""
    param = next(proposer.drafter.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab or proposer.emit_vocab, (rows, width), generator=gen).to(device)


@torch.inference_mode()
def measure_propose(proposer, rows: int, ks=K_GRID, context: int = PROFILE_CONTEXT, repeats: int = 3,
                    vocab: int | None = None) -> dict[int, float]:
    """Seconds per proposal of ``rows`` rows × ``k`` drafted tokens, the prefix cache warm
    (each call advances every row by a few tokens, as rounds do)."""
    step, calls = 4, (repeats + 2) * len(ks) + 1  # each call advances the rows by `step` tokens
    tokens = _random_contexts(proposer, rows, context + step * calls + 1, seed=1, vocab=vocab)
    state = proposer.new_state(rows, tokens.shape[1] + max(ks) + 1)
    length = [context]

    def once(k: int) -> None:
        proposer.propose(tokens, torch.full((rows,), length[0], dtype=torch.int64),
                         torch.full((rows,), k, dtype=torch.int64), state)
        length[0] += step

    once(1)  # fill the drafter's prefix cache
    return _monotone(_fastest_times({k: functools.partial(once, k) for k in ks}, repeats))


@torch.inference_mode()
def measure_encode(proposer, context: int = PROFILE_CONTEXT, repeats: int = 3, vocab: int | None = None) -> float:
    """Seconds per context token of a one-row proposal whose prefix cache is cold (it
    encodes ``context`` tokens), beyond the same proposal with the cache warm."""
    tokens = _random_contexts(proposer, 1, context, seed=2, vocab=vocab)
    length, k = torch.tensor([context]), torch.tensor([1])
    cold = _fastest_times({0: lambda: proposer.propose(tokens, length, k, proposer.new_state(1, context + 2))},
                          repeats)[0]
    warm = measure_propose(proposer, 1, ks=(1,), context=context, repeats=repeats, vocab=vocab)[1]
    return max(cold - warm, 0.0) / context


def _monotone(times: dict[int, float]) -> dict[int, float]:
    """More tokens never cost less: a noisy short measurement is capped by the longer ones."""
    out, cap = {}, float("inf")
    for n in sorted(times, reverse=True):
        cap = min(cap, times[n])
        out[n] = cap
    return dict(sorted(out.items()))


@functools.lru_cache(maxsize=None)
def _nearest_grid(rows: int) -> int:
    return min(ROW_GRID, key=lambda r: abs(math.log(r) - math.log(max(rows, 1))))


def _grid_rows(rows: int) -> list[int]:
    """The grid points bracketing ``rows`` (what must be measured to interpolate there)."""
    i = bisect_left(ROW_GRID, rows)
    if i < len(ROW_GRID) and ROW_GRID[i] == rows:
        return [rows]
    return [r for r in (ROW_GRID[max(i - 1, 0)], ROW_GRID[min(i, len(ROW_GRID) - 1)])]


class CostModel:
    """A :class:`CostTable` for one (target, proposer) on this machine, measured as needed
    and cached on disk, plus the run-time correction of each kind of time. Rows of a round
    are padded to its longest draft (our engine), so a round's cost is a function of
    (rows, longest draft)."""

    packed = False  # cost by (rows, longest draft), not by total tokens
    ready = True    # measured before use

    def __init__(self, target, proposer=None, path: str | Path | None = None, profile: bool | None = None) -> None:
        self.target, self.proposer = target, proposer
        # measure missing batch sizes (default: only when no table file was named)
        self.profile = path is None if profile is None else profile
        self.key = cost_key(target, proposer)
        self.path = Path(path) if path is not None else cache_dir() / f"{self.key}.json"
        self.table = CostTable(self.key, machine=_machine())
        if self.path.is_file():
            self.table = CostTable.load(self.path)
        elif path is not None:
            raise ValueError(f"cost_table={str(path)!r} does not exist; write one with "
                             "`python benchmarks/verify_cost.py --table OUT.json` or leave cost_table unset")
        self.scale: dict[tuple[str, int], float] = {}  # (kind, grid rows) → running measured / predicted
        self._curves: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        self._predicted: dict[tuple[str, int, int], float] = {}  # table lookups, until the table grows
        self.revision = 0  # counts changes of the table and of the corrections (for callers' caches)
        # seconds spent measuring so far: callers that time their rounds leave them out (a
        # round that profiled a new batch size says nothing about drafting's rate)
        self.profile_seconds = 0.0

    def ensure(self, rows: int) -> None:
        """Measure the grid points around ``rows`` that the table lacks (and save)."""
        if not self.profile:
            return
        missing_v = [r for r in _grid_rows(rows) if self.target is not None and r not in self.table.verify]
        missing_p = [r for r in _grid_rows(rows) if self.proposer is not None and r not in self.table.propose]
        missing_e = self.table.encode is None and getattr(self.proposer, "caches_prefixes", False)
        if not (missing_v or missing_p or missing_e):
            return
        t0 = time.perf_counter()
        for r in missing_v:
            self.table.verify[r] = measure_verify(self.target, r)
        for r in missing_p:
            self.table.propose[r] = measure_propose(self.proposer, r)
        if missing_e:
            self.table.encode = measure_encode(self.proposer)
        self.revision += 1
        self._curves.clear()
        self._predicted.clear()
        try:
            self.table.save(self.path)
        except OSError:  # a read-only cache folder costs a re-profile next time, nothing else
            pass
        self.profile_seconds += time.perf_counter() - t0

    def ensure_up_to(self, rows: int) -> None:
        """Measure every grid point that a round of at most ``rows`` rows may need (a server's
        start-up: its batch is bounded, and measuring there keeps the profile out of serving)."""
        for r in ROW_GRID:
            self.ensure(min(r, rows))
            if r >= rows:
                break

    def round_time(self, rows: int, kmax: int) -> float:
        """Predicted seconds of a round: ``rows`` rows verifying ``kmax + 1`` tokens each
        (padded), after a proposal of ``kmax`` tokens (none when kmax is 0)."""
        t = self.correction("verify", rows) * self.table.verify_time(rows, kmax + 1)
        if kmax > 0:
            t += self.correction("propose", rows) * self.table.propose_time(rows, kmax)
        return t

    def round_times(self, rows: int, kmax: int, propose: bool = True) -> np.ndarray:
        """[kmax + 1] float: :meth:`round_time` for every draft length 0..kmax at once
        (``propose=False``: the verify pass alone, once the proposal is made)."""
        key = (rows, kmax)
        if key not in self._curves:
            verify_t = np.array([self.table.verify_time(rows, k + 1) for k in range(kmax + 1)])
            propose_t = np.array([self.table.propose_time(rows, k) for k in range(kmax + 1)])
            self._curves[key] = verify_t, propose_t
        verify_t, propose_t = self._curves[key]
        out = self.correction("verify", rows) * verify_t
        return out + self.correction("propose", rows) * propose_t if propose else out

    def correction(self, kind: str, rows: int) -> float:
        """The running measured / predicted ratio of ``kind`` at the grid size nearest ``rows``."""
        return self.scale.get((kind, _nearest_grid(rows)), 1.0)

    def calibrate(self, kind: str, rows: int, width: int, measured: float, rate: float = 0.1) -> None:
        """Fold one measured time into the running correction of ``kind`` ("verify": width
        = tokens per row; "propose": width = k)."""
        if (kind, rows, width) not in self._predicted:
            table = self.table.verify_time if kind == "verify" else self.table.propose_time
            self._predicted[(kind, rows, width)] = table(rows, width)
        predicted = self._predicted[(kind, rows, width)]
        if predicted > 0 and measured > 0:
            ratio = min(max(measured / predicted, 0.2), 5.0)  # one slow spell is not the new normal
            key = (kind, _nearest_grid(rows))
            self.scale[key] = (1 - rate) * self.scale.get(key, 1.0) + rate * ratio
            self.revision += 1


def cache_dir() -> Path:
    return Path(os.environ.get("DIFFUSPEC_CACHE", Path.home() / ".cache" / "diffuspec")) / "costs"


def _machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__, "gpu": gpu}


def cost_key(target, proposer=None) -> str:
    """What a cost table depends on: the models' shapes, device, dtype, torch, the machine."""
    from .linear import few_row_limit  # (diffuspec.linear times and caches with this module's helpers)

    parts: dict = {"machine": _machine(), "method": PROFILE_METHOD}
    if target is not None:
        param = next(target.parameters())
        config = getattr(target, "config", None)
        parts |= {"target": config.to_dict() if hasattr(config, "to_dict") else str(config or type(target).__name__),
                  "device": str(param.device), "dtype": str(param.dtype),
                  "few_rows": few_row_limit(target)}  # passes of that many tokens take another product form
    if proposer is not None:
        drafter = proposer.drafter
        dparam = next(drafter.parameters(), None)
        parts["drafter"] = {"spec": str(getattr(getattr(drafter, "net", None), "spec", type(drafter).__name__)),
                            "dtype": str(dparam.dtype) if dparam is not None else None,
                            "int8": any("quantized" in type(m).__module__ for m in drafter.modules()),
                            "cache": bool(getattr(drafter, "prefix_cache", False))}
        kernels = proposer.kernels(dparam.device) if dparam is not None and hasattr(proposer, "kernels") else None
        parts["search"] = {"beam": proposer.config.cps.beam_width, "cps": proposer.config.cps.enabled,
                           "table": proposer.proxy_table is not None,
                           "kernels": getattr(kernels, "name", "reference")}  # a faster path: profile again
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


class OnlineLinear:
    """Least squares fitted as samples arrive, with exponential forgetting (recursive least
    squares): ``y ≈ w · x`` for feature vectors x."""

    def __init__(self, features: int, forget: float = 0.995, ridge: float = 1e-3) -> None:
        self.w = np.zeros(features)
        self.p = np.eye(features) / ridge  # inverse of the (forgetting-weighted) Gram matrix
        self.forget = forget
        self.samples = 0

    def add(self, x: np.ndarray, y: float) -> None:
        px = self.p @ x
        gain = px / (self.forget + x @ px)
        self.w = self.w + gain * (y - x @ self.w)
        self.p = (self.p - np.outer(gain, px)) / self.forget
        self.samples += 1

    def predict(self, x: np.ndarray) -> np.ndarray:  # [..., F] → [...]
        return x @ self.w


class StepCost:
    """The cost of one step of an engine that packs its rows' tokens (vLLM), learnt while
    serving: ``step(tokens) = a + b · tokens`` from the wall time between successive steps
    (what a step of that many tokens really took, sampling and scheduling included), plus
    our proposal's time, profiled like the engine's (:class:`CostModel` without a target).
    Until ``min_samples`` steps have been seen it is not ``ready`` and the policy drafts
    ``k_init``."""

    packed = True

    def __init__(self, proposals: CostModel | None = None, min_samples: int = 16) -> None:
        self.step = OnlineLinear(2)
        self.proposals = proposals
        self.min_samples = min_samples
        # Seconds per context token the drafter encodes beyond its prefix cache (a request's
        # first draft encodes its prompt): learnt from proposals with many such tokens,
        # starting from the profiled cost per drafted token of a one-row proposal.
        self._encode: float | None = None
        self._memo: dict[tuple[int, int], float] = {}  # step_times' proposal costs, for one revision of the profile
        self._memo_key: int | None = -1

    @property
    def encode_s_per_token(self) -> float:
        if self._encode is None:  # the prior, once proposals are profiled
            table = self.proposals.table if self.proposals is not None else None
            if table is None or not table.propose:
                return 0.0
            if table.encode is None:  # not measured yet: a drafted token's cost, which is more
                return table.propose_time(1, K_GRID[-1]) / K_GRID[-1]
            self._encode = table.encode
        return self._encode

    @property
    def ready(self) -> bool:
        return self.step.samples >= self.min_samples and self.step.w[1] > 0

    def ensure(self, rows: int) -> None:
        if self.proposals is not None:
            self.proposals.ensure(rows)

    @property
    def profile_seconds(self) -> float:
        """Seconds spent profiling the proposer so far (see CostModel.profile_seconds)."""
        return self.proposals.profile_seconds if self.proposals is not None else 0.0

    def observe_step(self, tokens: int, seconds: float) -> None:
        """One step of ``tokens`` tokens took ``seconds`` (our proposal's time excluded).
        A gap far beyond the prediction (the engine sat idle between requests) is not a step."""
        if self.step.samples >= self.min_samples:
            expected = float(self.step.predict(np.array([1.0, tokens])))
            if seconds > 3 * expected + 0.05:
                return
        self.step.add(np.array([1.0, float(tokens)]), seconds)

    def propose_time(self, rows: int, k: int) -> float:
        """Profiled seconds of a proposal of ``k`` tokens over ``rows`` rows, prefixes cached."""
        if self.proposals is None or k == 0 or rows == 0:
            return 0.0
        return self.proposals.correction("propose", rows) * self.proposals.table.propose_time(rows, k)

    def step_times(self, tokens: np.ndarray, kmax: np.ndarray, drafting: np.ndarray) -> np.ndarray:
        """Seconds of a step of ``tokens`` tokens plus a proposal of ``kmax`` tokens over
        ``drafting`` rows (none where kmax is 0), elementwise."""
        step = np.maximum(self.step.w[0] + self.step.w[1] * np.asarray(tokens, dtype=np.float64), 1e-6)
        # The proposal's cost by (rows, k), kept between steps (a policy asks for hundreds of
        # pairs a step); cleared when the profile or its corrections change.
        key = self.proposals.revision if self.proposals is not None else None
        if key != self._memo_key:
            self._memo_key, self._memo = key, {}
        memo = self._memo
        propose = [memo[dk] if dk in memo else memo.setdefault(dk, self.propose_time(*dk))
                   for dk in zip(np.atleast_1d(drafting).tolist(), np.atleast_1d(kmax).tolist())]
        return step + np.array(propose).reshape(step.shape)

    # Steps a request's first draft is charged over: encoding its context once buys its drafts
    # in the steps after it, so charging it all to one step kept new requests from ever
    # starting (a vLLM server at 4 concurrent HumanEval requests: two rows drafted, the two
    # that arrived later never did).
    start_horizon = 8

    def start_costs(self, uncached: np.ndarray) -> np.ndarray:  # [R] tokens → [R] seconds
        """What each row's draft adds to a proposal for the ``uncached`` context tokens the
        drafter must encode first (see :class:`~diffuspec.policy.RoundView`), per step of
        ``start_horizon``: the cost is paid once, and the cache serves the steps after it."""
        return np.asarray(uncached, dtype=np.float64) * self.encode_s_per_token / self.start_horizon

    def observe_proposal(self, rows: int, k: int, uncached: int, measured: float, rate: float = 0.2) -> None:
        """A proposal over ``rows`` rows drafting ``k`` tokens, ``uncached`` context tokens
        encoded in all, took ``measured`` seconds: what the profile does not explain of a
        proposal that encoded many tokens is their cost; the rest corrects the profile."""
        if self.proposals is None:
            return
        warm = self.propose_time(rows, k)
        if uncached > COLD_SPAN:  # rows that encode their prompt (in a pass of their own): learn its cost per token
            sample = max(measured - warm, 0.0) / uncached
            self._encode = self.encode_s_per_token + rate * (sample - self.encode_s_per_token)
        elif uncached <= 8 * rows:  # mostly drafting, the prefixes cached: correct the profile
            self.proposals.calibrate("propose", rows, k, measured)

    def calibrate(self, kind: str, rows: int, width: int, measured: float) -> None:
        """Our proposal's measured time corrects its profile; a step is measured by observe_step."""
        if kind == "propose" and self.proposals is not None:
            self.proposals.calibrate(kind, rows, width, measured)
