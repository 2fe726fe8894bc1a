"""Configuration: frozen dataclasses, validated on construction.

Terms used throughout the package:

- *round*: one draft → lattice → path search → verify step of the engine.
- *k*: the draft length of a round (number of mask tokens the drafter fills).
- *lattice*: per draft position, a small set of candidate tokens with their drafter
  log-probabilities.
- *path*: one left-to-right chain through the lattice, the proposal the target verifies.
- *τ*: tokens emitted per round, including the bonus token (plain AR decoding has τ = 1).

Defaults follow DiffuSpec (arXiv 2510.02358) except the draft-length bounds, which the
paper tuned for an A100 with a 32B target; ours are chosen for a CPU (see ``ADLConfig``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ValueError(message)


@dataclass(frozen=True)
class LatticeConfig:
    # Keep the smallest top set per position whose cumulative drafter mass reaches this.
    mass: float = 0.8
    # ...but never more than this many tokens per position (paper: M_max = 15).
    max_candidates: int = 15
    # EOS joins a position's set whenever its drafter probability reaches this, even when
    # the mass/size cut would drop it, so a path can end where the text ends.
    eos_min_prob: float = 0.05

    def __post_init__(self) -> None:
        _check(0.0 < self.mass <= 1.0, f"lattice mass={self.mass!r} must be in (0, 1]; the paper uses 0.8")
        _check(self.max_candidates >= 1, f"lattice max_candidates={self.max_candidates!r} must be >= 1; the paper uses 15")
        _check(0.0 <= self.eos_min_prob <= 1.0, f"lattice eos_min_prob={self.eos_min_prob!r} must be in [0, 1]")


@dataclass(frozen=True)
class ProxyConfig:
    # n-gram order of the causal proxy (paper: a 3-gram LM).
    order: int = 3
    # Weight of the corpus table against the request's own online model, when a table is
    # loaded: p = w * p_corpus + (1 - w) * p_request.
    corpus_weight: float = 0.5

    def __post_init__(self) -> None:
        _check(2 <= self.order <= 5, f"proxy order={self.order!r} must be in 2..5 (a unigram proxy has no "
               "context to check a path against); the paper uses 3")
        _check(0.0 <= self.corpus_weight <= 1.0, f"proxy corpus_weight={self.corpus_weight!r} must be in [0, 1]")


@dataclass(frozen=True)
class RetrievalConfig:
    # Add continuations copied from the request's own context to the lattice (as prompt
    # lookup proposes them): after the latest earlier occurrence of the context's last n
    # tokens, for each n in min_match..max_match, the tokens that followed become
    # candidates at the positions they cover (diffuspec.lattice.add_context_candidates).
    # On by default: with matches of 3..5 tokens it measured ahead of the drafter alone on
    # MT-Bench and Spec-Bench and level on HumanEval (README, ablation). Matches of 1 or 2
    # tokens copy too much that is wrong: with min_match=1, HumanEval fell 7% behind.
    enabled: bool = True
    max_match: int = 5
    min_match: int = 3
    # Their drafter-side weight: a copied token enters with log q = log(prior) (a token the
    # drafter already proposes keeps the larger of the two).
    prior: float = 0.3
    # Where a round would decode plainly (the policy or the throughput guard keeps the
    # drafter from running), verify the rows' copies instead: prompt-lookup drafts with no
    # drafter pass, cut to the length that pays by their own acceptance and the verify cost,
    # and only while such rounds measure at least as fast as plain ones (the engine's copy
    # rounds; vLLM's proposer copies for the rows it does not draft). Needs the "auto" or
    # "cost" policy (the cost model prices a copy).
    copy_rounds: bool = True

    def __post_init__(self) -> None:
        _check(1 <= self.min_match <= self.max_match <= 8,
               f"retrieval needs 1 <= min_match <= max_match <= 8, got min_match={self.min_match!r}, "
               f"max_match={self.max_match!r}")
        _check(0.0 < self.prior <= 1.0, f"retrieval prior={self.prior!r} must be in (0, 1]")


@dataclass(frozen=True)
class TreeConfig:
    # Verify a draft tree instead of one path (diffuspec.tree): the CPS path plus
    # `extra_nodes` more nodes per row, best first by the drafter's branch log-probability,
    # all scored by the target in one pass. The engine only (vLLM verifies chains).
    enabled: bool = False
    extra_nodes: int = 8

    def __post_init__(self) -> None:
        _check(isinstance(self.extra_nodes, int) and 0 <= self.extra_nodes <= 256,
               f"tree extra_nodes={self.extra_nodes!r} must be an int in [0, 256]")


@dataclass(frozen=True)
class CPSConfig:
    # Run the causal-consistency path search; False takes the per-position argmax path.
    enabled: bool = True
    # Beam width B (paper: 3).
    beam_width: int = 3
    # λ in S = Σ λ·log q + (1-λ)·log p_proxy (paper: 0.5).
    lam: float = 0.5

    def __post_init__(self) -> None:
        _check(self.beam_width >= 1, f"cps beam_width={self.beam_width!r} must be >= 1; the paper uses 3")
        _check(0.0 <= self.lam <= 1.0, f"cps lam={self.lam!r} must be in [0, 1]; the paper uses 0.5")


DRAFT_LENGTH_POLICIES = ("auto", "paper", "fixed", "cost")
KERNELS = ("auto", "reference", "compiled", "triton")


@dataclass(frozen=True)
class ADLConfig:
    # Which draft-length policy chooses each request's k (diffuspec.policy): "paper", the
    # paper's adaptive draft length (§3.3) under verify_budget; "fixed", k_init every round;
    # "cost", the draft length that maximises expected tokens/s from measured costs, each
    # request capped by its ADL (diffuspec.scheduler); "auto", "paper" for greedy batches of
    # 2 to 15 rows and "cost" otherwise (one row, sampling, big batches, vLLM), where each
    # measured best (docs/architecture.md §6).
    policy: str = "auto"
    # EMA rate ρ for the generated / accepted lengths (paper: 0.5).
    rho: float = 0.5
    # Growth step δ when the accepted EMA keeps up with the generated EMA (paper: 10). The
    # paper's step suits its 20..30 bounds; ours are narrower, so a smaller step.
    delta: int = 4
    # Draft-length bounds. Paper: 20..30 on an A100 with a 32B target. Ours come from a
    # fixed-k sweep on a CPU (docs/architecture.md, "Choosing k on a CPU";
    # benchmarks/results/humaneval_k_sweep_cpu): at batch 1 longer drafts kept paying up to
    # 32, the verify pass of the embedded target growing slowly past 2 tokens.
    k_min: int = 4
    k_max: int = 32
    # k of a request's first round (and every round's, under the "fixed" policy); None:
    # k_max. Starting at the longest draft measured best at batch 1 (HumanEval-10: 7.47×
    # against 5.34× from 8; MT-Bench-20: 1.96× against 1.87×) and no worse at batch 4–8 or
    # at T = 0.7 (docs/architecture.md §5): the ADL shrinks k where drafts are rejected.
    k_init: int | None = None
    # Tokens a round may verify over the whole batch: each row's k is capped at
    # verify_budget // active_rows - 1 (0, plain decoding, when that is below 1); None: no
    # cap; "auto": 48 on a CPU, no cap on an accelerator. A CPU verifies compute-bound, so
    # long drafts for a large batch cost more than they return (docs/architecture.md).
    verify_budget: int | str | None = "auto"

    @property
    def first_k(self) -> int:
        """k of a request's first round: k_init, or k_max when it is None."""
        return self.k_init if self.k_init is not None else self.k_max

    def __post_init__(self) -> None:
        _check(self.policy in DRAFT_LENGTH_POLICIES,
               f"adl policy={self.policy!r} is not one of {list(DRAFT_LENGTH_POLICIES)}")
        _check(0.0 < self.rho <= 1.0, f"adl rho={self.rho!r} must be in (0, 1]; the paper uses 0.5")
        _check(self.delta >= 0, f"adl delta={self.delta!r} must be >= 0")
        _check(1 <= self.k_min <= self.k_max, f"adl needs 1 <= k_min <= k_max, got k_min={self.k_min!r}, k_max={self.k_max!r}")
        _check(self.k_init is None or (isinstance(self.k_init, int) and self.k_min <= self.k_init <= self.k_max),
               f"adl k_init={self.k_init!r} must lie in [k_min={self.k_min}, k_max={self.k_max}] (or None: k_max)")
        budget = self.verify_budget
        _check(budget is None or budget == "auto" or (isinstance(budget, int) and not isinstance(budget, bool)
                                                       and budget >= 2),
               f"adl verify_budget={budget!r} must be an int >= 2 (tokens a round verifies over the batch), "
               "None (no cap) or 'auto'")


@dataclass(frozen=True)
class DiffuSpecConfig:
    lattice: LatticeConfig = field(default_factory=LatticeConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    cps: CPSConfig = field(default_factory=CPSConfig)
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    tree: TreeConfig = field(default_factory=TreeConfig)
    adl: ADLConfig = field(default_factory=ADLConfig)
    # Draft at all; False runs plain AR decoding through the same engine (the baseline).
    speculate: bool = True
    # The drafter sees at most this many trailing prefix tokens (None: all). Drafting may
    # approximate freely: it changes acceptance, never the output.
    drafter_context: int | None = None
    # Keep the drafter's prefix keys/values across rounds (None: on for prefix-causal
    # drafters, where it is exact; True forces it on for bidirectional ones such as Dream,
    # as an approximation). With the cache on, drafter_context is not applied.
    drafter_cache: bool | None = None
    # Path of a corpus n-gram table (``diffuspec build-proxy``), mixed with the online model.
    proxy_table: str | None = None
    # Run the drafter's linear layers in int8 (dynamic quantization, weights int8 and
    # activations quantized per pass). None: on for a float32 drafter on a CPU, where it
    # halves the drafter pass; True forces it (CPU, float32 only); False keeps float32. Like
    # every drafting approximation it changes acceptance, never the output. Applied in place.
    drafter_int8: bool | None = None
    # A measured cost table for the "cost" draft-length policy (JSON written by
    # benchmarks/verify_cost.py --table); None: profile this machine as batch sizes appear
    # and cache the result under $DIFFUSPEC_CACHE/costs/ (diffuspec.cost).
    cost_table: str | None = None
    # vLLM proposer: a proposal that takes longer than this many seconds is abandoned; that
    # step decodes without drafts, and none are made until the late proposal has ended.
    # None: no limit. (A hung drafter must not stall a server. In both the engine and the
    # proposer a drafter that raises costs that round's drafts, logged once.)
    drafter_timeout_s: float | None = None
    # Check the "auto" / "cost" draft-length policy against measurement ("paper" and "fixed"
    # run as written): per decoding regime and batch-size class, draft only while drafting rounds (steps, in vLLM) measure at least as many
    # tokens/s as plain ones, re-measuring the losing mode now and then (diffuspec.guard).
    throughput_guard: bool = True
    # Rows in flight in one generate() call: with more prompts, the others wait and take the
    # place of rows that finish (continuous batching). None: every prompt at once.
    max_batch_size: int | None = 64
    # Implementation of the lattice build and the path search (diffuspec_kernels): "auto",
    # Triton kernels for CUDA tensors and compiled (numba) loops for CPU tensors, falling back
    # to the reference with a warning when they cannot load; "reference", the PyTorch/numpy
    # reference; "compiled" / "triton" require that path. All give the same paths.
    kernels: str = "auto"

    def __post_init__(self) -> None:
        _check(self.kernels in KERNELS, f"kernels={self.kernels!r} is not one of {list(KERNELS)}")
        _check(self.drafter_context is None or self.drafter_context >= 1,
               f"drafter_context={self.drafter_context!r} must be None or >= 1")
        _check(self.drafter_timeout_s is None or (isinstance(self.drafter_timeout_s, (int, float))
                                                 and not isinstance(self.drafter_timeout_s, bool)
                                                 and self.drafter_timeout_s > 0),
               f"drafter_timeout_s={self.drafter_timeout_s!r} must be a number of seconds > 0, or None (no limit)")
        _check(self.max_batch_size is None or (isinstance(self.max_batch_size, int)
                                               and not isinstance(self.max_batch_size, bool)
                                               and self.max_batch_size >= 1),
               f"max_batch_size={self.max_batch_size!r} must be an int >= 1 (rows in flight) or None (all prompts)")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "DiffuSpecConfig":
        """Build from flat or nested keyword arguments.

        Flat keys name a field of any section (``k_max=16``, ``beam_width=1``) or of the
        top level; section keys take a dict or a section instance (``adl={"k_max": 16}``).
        Unknown keys raise ``TypeError`` listing the valid ones.
        """
        return DiffuSpecConfig().replace(**kwargs)

    def replace(self, **kwargs: Any) -> "DiffuSpecConfig":
        """A copy with the given keys changed (same key rules as ``from_kwargs``)."""
        top = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _SECTIONS}
        nested = {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}
        for key, value in kwargs.items():
            if key in _SECTIONS:
                if isinstance(value, _SECTIONS[key]):
                    value = dataclasses.asdict(value)
                if key == "adl" and isinstance(value, str):  # adl="paper" | "fixed": the policy's name
                    value = {"policy": value}
                if key == "adl" and isinstance(value, Mapping) and "enabled" in value:
                    # the earlier spelling of the fixed policy: adl={"enabled": False}
                    value = {k: v for k, v in value.items() if k != "enabled"} | (
                        {} if value["enabled"] else {"policy": "fixed"})
                if not isinstance(value, Mapping):
                    raise TypeError(f"config section {key!r} must be a dict or {_SECTIONS[key].__name__}"
                                    f"{' (or a policy name)' if key == 'adl' else ''}, got {type(value).__name__}")
                for sub, sub_value in value.items():
                    if sub not in _section_fields(key):
                        raise TypeError(f"unknown config key {key}.{sub!r}; valid keys: {sorted(_section_fields(key))}")
                    nested[key][sub] = sub_value
            elif key in top:
                top[key] = value
            else:
                owners = [name for name in _SECTIONS if key in _section_fields(name)]
                if len(owners) != 1:
                    raise TypeError(f"unknown config key {key!r}; valid keys: {sorted(valid_config_keys())} "
                                    f"(or nested: adl={{...}}, cps={{...}}, lattice={{...}}, proxy={{...}}, "
                                    f"retrieval={{...}}, tree={{...}})")
                nested[owners[0]][key] = value
        return DiffuSpecConfig(**top, **{name: _SECTIONS[name](**values) for name, values in nested.items()})


_SECTIONS: dict[str, type] = {"lattice": LatticeConfig, "proxy": ProxyConfig, "cps": CPSConfig, "adl": ADLConfig,
                              "retrieval": RetrievalConfig, "tree": TreeConfig}


def _section_fields(name: str) -> set[str]:
    return {f.name for f in fields(_SECTIONS[name])}


def valid_config_keys() -> set[str]:
    keys = {f.name for f in fields(DiffuSpecConfig)}
    for name in _SECTIONS:
        keys |= _section_fields(name)
    # "enabled" is ambiguous between sections: it is only reachable nested.
    keys.discard("enabled")
    return keys


@dataclass(frozen=True)
class SamplingParams:
    """Per-call decoding settings, validated at the API boundary."""

    max_new_tokens: int = 128
    # 0 is greedy decoding.
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    # Strings that end a request's text (the text is cut before the stop string).
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise TypeError(f"max_new_tokens must be an int, got {self.max_new_tokens!r}")
        _check(self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens!r} must be >= 1")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool):
            raise TypeError(f"temperature must be a number, got {self.temperature!r}")
        _check(self.temperature >= 0.0, f"temperature={self.temperature!r} must be >= 0 (use 0 for greedy decoding)")
        if self.top_k is not None:
            if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
                raise TypeError(f"top_k must be an int or None, got {self.top_k!r}")
            _check(self.top_k >= 1, f"top_k={self.top_k!r} must be >= 1 (or None for no top-k cut)")
        if self.top_p is not None:
            _check(0.0 < float(self.top_p) <= 1.0, f"top_p={self.top_p!r} must be in (0, 1] (or None for no nucleus cut)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"seed must be an int or None, got {self.seed!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop strings must be non-empty strings, got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0
