"""DiffuSpec as a vLLM proposer: the ``custom_class`` speculative-decoding contract.

vLLM (V1 model runner) builds ``DiffuSpecProposer(vllm_config)``, calls
``load_model(target_model)`` once, then after every step::

    propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None)
        -> list[list[int]]   # one draft per batch row, each 0..num_speculative_tokens long

and verifies the drafts itself (its rejection sampler treats a draft without probabilities as
a point mass, which keeps the output exact at every temperature). This module only
translates: the algorithm (one batched drafter pass → lattice → CPS → path, and ADL) is
:class:`diffuspec.propose.PathProposer` and a :mod:`diffuspec.policy` draft-length policy, and
loading and validation are :mod:`diffuspec.loading`, as in the Python API.

Terms:

- *row*: one request's slot in vLLM's batch for this step. Rows are reordered and reused
  between steps, and vLLM passes no request ids.
- *context*: a row's prompt + generated tokens, ``token_ids_cpu[row, :num_tokens_no_spec[row]]``
  (the tokens sampled this step already included).
- *request state*: per request, its draft-length policy's row state, what was proposed last step and,
  for a drafter with a prefix cache, the drafter's keys/values of the context, and the online
  proxy's n-gram counts of the context (grown each step by its new tokens). It is keyed by a fingerprint of the context it was proposed for. A row's next step finds
  it again by fingerprinting its context minus the tokens it just sampled: that is exactly
  the context of its previous proposal, whatever row the request moved to. Two requests with
  the same context share state, which is harmless: the same context gets the same draft.
  States not found again (finished or preempted requests) age out of a bounded LRU, and
  the drafter caches and proxy counts they hold stay under ``DRAFTER_CACHE_BYTES`` (the least recently used
  lose theirs first; such a request's next draft runs over its whole context).

Options come from ``additional_config["diffuspec"]`` (``--additional-config`` on the command
line): ``drafter`` (the drafter folder) and any :class:`diffuspec.DiffuSpecConfig` key.
Every check of user input runs in :func:`resolve_settings`, at start-up, in the engine's
front end (through the plugin) and again in the worker that builds the proposer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from diffuspec import loading
from diffuspec.config import DiffuSpecConfig
from diffuspec.drafters import RowCache, load_drafter
from diffuspec.cost import CostModel, StepCost
from diffuspec.guard import CopyAndDraftGuards, ThroughputGuard
from diffuspec.lattice import copied_drafts
from diffuspec.policy import DraftLengthPolicy, RoundOutcome, RoundView, make_policy
from diffuspec.scheduler import AcceptanceModel, CopyLengths, CostAwareDraftLength, expected_tokens
from diffuspec.propose import PathProposer, pad_contexts

# A child of vLLM's logger, so records use vLLM's handlers and format.
logger = logging.getLogger("vllm.diffuspec_vllm")

OPTIONS_KEY = "diffuspec"   # additional_config[OPTIONS_KEY] holds the drafter options
DRAFTER_KEY = "drafter"     # ...and this key in it, the drafter folder
PLACEMENT_KEYS = ("drafter_placement", "ray_address", "drafter_resources")  # a drafter on Ray (diffuspec.remote)
PROPOSER_CLASS = "diffuspec_vllm.proposer.DiffuSpecProposer"  # the long-form speculative "model"
DRAFTER_CACHE_BYTES = 1 << 30  # all requests' drafter prefix caches and proxy counts together


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ProposerSettings:
    drafter_path: Path
    config: DiffuSpecConfig       # ADL bounds already fitted to num_speculative_tokens
    num_speculative_tokens: int   # vLLM's K: no draft is longer
    eos_token_id: int | None
    emit_vocab: int               # ids >= this are never drafted (the target cannot emit them)
    max_model_len: int
    # "ray": the drafter runs in a Ray actor (diffuspec.remote), at ray_address (None: a local
    # Ray) with drafter_resources (Ray actor options)
    drafter_placement: str = "local"
    ray_address: str | None = None
    drafter_resources: dict | None = None


def resolve_settings(
    model_config: Any,              # vLLM ModelConfig of the target (duck-typed: see below)
    num_speculative_tokens: Any,
    additional_config: Mapping[str, Any] | None,
) -> ProposerSettings:
    """Validate every user input and resolve the proposer's settings. Raises ``ValueError``
    or ``TypeError`` naming the bad value and the fix; never loads drafter weights.

    Reads ``model_config.model``, ``.tokenizer``, ``.trust_remote_code``,
    ``.tokenizer_revision``, ``.max_model_len`` and ``.get_vocab_size()``."""
    k = num_speculative_tokens
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"num_speculative_tokens={k!r}: DiffuSpec needs an int >= 1 (the longest draft vLLM "
                         "verifies per step), e.g. --speculative-config '{\"method\": \"diffuspec\", "
                         "\"model\": DRAFTER, \"num_speculative_tokens\": 8}'")
    options = (additional_config or {}).get(OPTIONS_KEY, {})
    if not isinstance(options, Mapping):
        raise TypeError(f"additional_config[{OPTIONS_KEY!r}] must be a JSON object of diffuspec options, "
                        f"got {type(options).__name__}: {options!r}")
    options = dict(options)
    drafter = options.pop(DRAFTER_KEY, None)
    placement = {name: options.pop(name, None) for name in PLACEMENT_KEYS}
    try:
        config = DiffuSpecConfig.from_kwargs(**options)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"additional_config[{OPTIONS_KEY!r}]: {exc}; plus {DRAFTER_KEY!r}, the drafter folder, and "
                        f"{list(PLACEMENT_KEYS)}") from None
    config = _fit_draft_length(config, k, options)
    where = placement["drafter_placement"] or "local"
    try:
        from diffuspec.remote import _check_address, check_placement, remote_config
        check_placement(where, placement["drafter_resources"])
        if where == "ray":
            config = remote_config(config)
            try:
                import ray  # noqa: F401
            except ImportError:
                raise ValueError("drafter_placement='ray' needs Ray in the vLLM environment: pip install "
                                 "'diffuspec[ray]'") from None
            _check_address(placement["ray_address"])
    except ValueError as exc:
        raise ValueError(f"additional_config[{OPTIONS_KEY!r}]: {exc}") from None

    target = Path(str(model_config.model))
    if drafter is None:
        embedded = loading.embedded_drafter_for(target)
        if embedded is None:
            raise ValueError("no drafter given: pass the drafter folder as the short form's \"model\" "
                             "(--speculative-config '{\"method\": \"diffuspec\", \"model\": DRAFTER, ...}') or as "
                             f"--additional-config '{{\"{OPTIONS_KEY}\": {{\"{DRAFTER_KEY}\": DRAFTER}}}}'")
        drafter, table = embedded
        config = loading.with_default_table(config, table, options)
    drafter_path = loading.resolve_drafter_folder(drafter)
    try:
        loading.check_proxy_table(config)
    except ValueError as exc:
        raise ValueError(f"additional_config[{OPTIONS_KEY!r}]: {exc}") from None

    eos, tokenizer = _check_tokenizers(model_config, drafter_path)
    emit_vocab = loading.emit_vocab(int(model_config.get_vocab_size()), tokenizer)
    return ProposerSettings(drafter_path=drafter_path, config=config, num_speculative_tokens=k,
                            eos_token_id=eos, emit_vocab=emit_vocab, max_model_len=int(model_config.max_model_len),
                            drafter_placement=where, ray_address=placement["ray_address"],
                            drafter_resources=placement["drafter_resources"])


def settings_from_vllm_config(vllm_config: Any) -> ProposerSettings:
    spec = vllm_config.speculative_config
    return resolve_settings(vllm_config.model_config, spec.num_speculative_tokens, vllm_config.additional_config)


def _fit_draft_length(config: DiffuSpecConfig, k: int, options: Mapping[str, Any]) -> DiffuSpecConfig:
    """ADL picks each request's k in [k_min, k_max]; vLLM verifies at most K per step.
    An unset k_max becomes K (k_min, k_init clipped to it); a k_max set above K is an error."""
    adl = config.adl
    explicit = "k_max" in options or "k_max" in (options.get("adl") or {})
    if explicit and adl.k_max > k:
        raise ValueError(f"additional_config[{OPTIONS_KEY!r}]: k_max={adl.k_max} exceeds num_speculative_tokens={k}; "
                         f"raise num_speculative_tokens to at least {adl.k_max} or lower k_max")
    k_max = k if not explicit else adl.k_max
    k_min = min(adl.k_min, k_max)
    k_init = None if adl.k_init is None else min(max(adl.k_init, k_min), k_max)
    return config.replace(adl={"k_max": k_max, "k_min": k_min, "k_init": k_init})


def _check_tokenizers(model_config: Any, drafter_path: Path):
    """Check that the drafter shares the target's tokenizer. Returns (eos id, the target's
    tokenizer); (config eos, None) when the target runs without a tokenizer."""
    from transformers import AutoTokenizer

    name = getattr(model_config, "tokenizer", None) or model_config.model
    try:
        target_tok = AutoTokenizer.from_pretrained(str(name), trust_remote_code=bool(model_config.trust_remote_code),
                                                   revision=getattr(model_config, "tokenizer_revision", None))
    except Exception as exc:  # no tokenizer files (skip_tokenizer_init): nothing to compare against
        logger.warning("diffuspec: could not load the target tokenizer %r (%s); skipping the drafter "
                       "tokenizer check", name, exc)
        target_tok = None
    else:
        drafter_tok = loading.drafter_tokenizer(drafter_path)
        if drafter_tok is not None:
            loading.check_shared_tokenizer(target_tok, drafter_tok, f" (drafter {str(drafter_path)!r}, "
                                                                  f"target {str(name)!r})")
        else:
            logger.warning("diffuspec: drafter folder %s has no tokenizer.json; cannot check that it shares the "
                           "target's tokenizer", drafter_path)
    return loading.resolve_eos(target_tok, getattr(model_config, "hf_config", None)), target_tok


# ---------------------------------------------------------------------- request state
@dataclass
class RequestState:
    policy: dict[str, float]  # the draft-length policy's row (DraftLengthPolicy.export_rows)
    k: int           # masks drafted last step (0: no draft, nothing for the policy to observe)
    path_len: int    # tokens proposed last step
    gen_len: int     # L_gen of last step's raw draft
    drafter_kv: RowCache | None = None  # the drafter's prefix cache of this context (a prefix of it)
    ngrams: object | None = None         # the online proxy's counts of this context (diffuspec.proxy)
    copied: int = 0  # tokens copied from the context last step (DiffuSpecProposer._copies), not drafted


class RequestStates:
    """Request states keyed by a fingerprint of the context they were proposed for (bounded
    LRU; the drafter caches and proxy counts they hold bounded by ``cache_bytes``)."""

    def __init__(self, capacity: int, cache_bytes: int = DRAFTER_CACHE_BYTES) -> None:
        self.capacity = capacity
        self.cache_bytes = cache_bytes
        self.held_bytes = 0  # drafter caches and proxy counts held by the states
        self._states: OrderedDict[bytes, RequestState] = OrderedDict()
        self._sizes: dict[bytes, int] = {}  # _bytes of each state, as put (states are popped before use)

    @staticmethod
    def fingerprint(context: np.ndarray) -> bytes:  # [n] int32 token ids
        return hashlib.blake2b(np.ascontiguousarray(context).tobytes(), digest_size=16).digest()

    @staticmethod
    def _bytes(state: RequestState) -> int:
        return sum(x.nbytes for x in (state.drafter_kv, state.ngrams) if x is not None)

    def pop(self, key: bytes) -> RequestState | None:
        state = self._states.pop(key, None)
        if state is not None:
            self.held_bytes -= self._sizes.pop(key)
        return state

    def put(self, key: bytes, state: RequestState) -> None:
        self.pop(key)
        self._states[key] = state
        self._sizes[key] = size = self._bytes(state)
        self.held_bytes += size
        while len(self._states) > self.capacity:
            self.pop(next(iter(self._states)))
        for old_key, old in self._states.items():  # oldest first; the newest state keeps its caches
            if self.held_bytes <= self.cache_bytes or old is state:
                break
            self.held_bytes -= self._sizes[old_key]  # dropped: rebuilt from the context when next needed
            self._sizes[old_key] = 0
            old.drafter_kv = old.ngrams = None

    def __len__(self) -> int:
        return len(self._states)


@dataclass
class ProposerStats:
    """Counters since start-up (vLLM's own metrics count drafts and acceptance)."""
    steps: int = 0
    rows_drafted: int = 0
    draft_tokens: int = 0
    time_draft: float = 0.0
    time_search: float = 0.0
    time_total: float = 0.0
    failures: int = 0
    invalid_drafts: int = 0  # drafts cut at an id outside the target's vocabulary
    cached_tokens: int = 0   # prefix tokens the drafter took from its cache instead of recomputing
    copied_rows: int = 0     # rows whose draft was copied from their context (no drafter pass), see _copies
    draft_lengths: list[int] = field(default_factory=list)  # histogram: index = proposed length


# -------------------------------------------------------------------------- proposer
class DiffuSpecProposer:
    """vLLM ``custom_class`` proposer drafting with a diffusion LM (DiffuSpec)."""

    max_recheck = 32  # held steps between re-checks at most (see propose)

    def __init__(self, vllm_config: Any) -> None:
        import vllm

        from . import steps
        from .fixes import apply_vllm_fixes
        from .plugin import check_vllm_version

        check_vllm_version(getattr(vllm, "__version__", "unknown"))  # also without the plugin (long form)
        apply_vllm_fixes()  # in the worker, where vLLM verifies the drafts
        steps.install_worker_side(DiffuSpecProposer)  # steps without drafts cost what plain ones do
        self.settings = settings_from_vllm_config(vllm_config)  # raises at start-up on bad input
        self.dtype = vllm_config.model_config.dtype
        self.default_device = torch.device(str(getattr(vllm_config.device_config, "device", "cpu") or "cpu"))
        max_seqs = int(getattr(vllm_config.scheduler_config, "max_num_seqs", 256) or 256)
        self.max_seqs = max_seqs
        self.states = RequestStates(capacity=4 * max_seqs + 64)
        self.stats = ProposerStats(draft_lengths=[0] * (self.settings.num_speculative_tokens + 1))
        self.path_proposer: PathProposer | None = None
        self.remote = None  # the RemoteProposer when the drafter runs on Ray
        self.device = self.default_device  # where the drafter runs (the target's device), set by load_model
        cfg = self.settings.config
        # The cost-aware policy learns vLLM's step cost while serving (vLLM packs a step's
        # tokens: its cost follows their total), and pools acceptance over requests.
        self.costs: StepCost | None = None  # built by load_model, around the loaded drafter
        self.acceptance = AcceptanceModel(cfg.adl.k_max)
        # Copies (_copies) are costed as drafts are, from their own pooled acceptance: what
        # followed an earlier occurrence of a phrase is kept far more often in code than in prose.
        self.copy_lengths = CopyLengths(self.settings.num_speculative_tokens)
        self._last_step: tuple[int, float] | None = None  # (tokens asked of the next step, when)
        # Measured check of the policy: the drafter runs only while steps with its pass measure
        # at least as many tokens/s as steps without it, and copies only while copy-only
        # steps measure at least as many as plain ones (diffuspec.guard.CopyAndDraftGuards).
        self.guard = CopyAndDraftGuards()
        self._last_start: float | None = None  # when the last step's proposal began
        self._last_profiled = 0.0              # the cost model's profiling seconds then
        # Steps held plain since the last full step, which drafted nothing (None: it drafted);
        # request states are keyed by the context of that step (see _held_step).
        self._held: int | None = None
        self._pool = None   # the thread proposals run on, with drafter_timeout_s
        self._late = None   # a proposal abandoned at its timeout, maybe still running

    def load_model(self, target_model: torch.nn.Module | None = None) -> None:
        """Load the drafter on the target's device, in the target's dtype."""
        s = self.settings
        device = self.default_device
        if target_model is not None:
            param = next(iter(target_model.parameters()), None)
            device = param.device if param is not None else device
        self.device = device
        if s.drafter_placement == "ray":
            from diffuspec import remote
            spec = {"config": dataclasses.asdict(s.config), "eos_token_id": s.eos_token_id, "emit_vocab": s.emit_vocab,
                    "device": "cuda" if device.type == "cuda" else "cpu",
                    "dtype": str(self.dtype).removeprefix("torch."), "drafter_path": str(s.drafter_path)}
            actor = remote.start_drafter_actor(spec, s.ray_address, s.drafter_resources, max_restarts=3)
            self.remote = remote.RemoteProposer(actor, s.config, s.emit_vocab, pipelined=False,
                                                device=torch.device("cpu"))
            logger.info("diffuspec: drafter %s in a Ray actor (%s); k in [%d, %d]", s.drafter_path,
                        s.drafter_resources or "default resources", s.config.adl.k_min, s.config.adl.k_max)
            return
        prepared = loading.prepare_drafter(load_drafter(s.drafter_path, dtype=self.dtype, device=device), s.config,
                                           where=f"drafter {str(s.drafter_path)!r}")
        drafter = prepared.drafter
        table = loading.load_proxy_table(s.config, device)
        self.path_proposer = PathProposer(drafter, s.config, s.eos_token_id, s.emit_vocab, table)
        if s.config.adl.policy in ("cost", "auto"):  # proposals profiled here (cached on disk), vLLM's steps learnt online
            self.costs = StepCost(CostModel(None, self.path_proposer, s.config.cost_table))
            self._profile_proposals()
        logger.info("diffuspec: drafter %s loaded (%s, %s%s, %d positions); k in [%d, %d]", s.drafter_path, device,
                    self.dtype, ", int8 linear layers" if prepared.int8 else "", drafter.max_positions,
                    s.config.adl.k_min, s.config.adl.k_max)

    def _profile_proposals(self) -> None:
        """Profile the proposal's cost for every batch size up to max_num_seqs now, before the
        server takes requests: measured lazily instead, the first busy steps at each new
        batch size stall while it runs (a few seconds at 64 rows on a 2-core CPU), and timed
        beside a busy server the table came out ~1.5-2x slower. A table on disk (cached per
        model, dtype and machine, or ``cost_table``) makes this instant; a failure leaves it
        to the steps, which guard it."""
        proposals = self.costs.proposals
        t0 = time.perf_counter()
        try:
            proposals.ensure_up_to(self.max_seqs)
        except Exception:
            logger.warning("diffuspec: profiling the proposal's cost at start-up failed; it is measured while "
                           "serving instead", exc_info=True)
            return
        if proposals.profile_seconds > 0:
            logger.info("diffuspec: proposal cost profiled for 1..%d rows in %.1f s (cached in %s)",
                        self.max_seqs, time.perf_counter() - t0, proposals.path)

    def propose(
        self,
        sampled_token_ids: list[list[int]],  # per row: tokens emitted this step (accepted drafts + 1); [] if none
        num_tokens_no_spec: np.ndarray,      # [max_num_reqs] int32: context length per row
        token_ids_cpu: np.ndarray,           # [max_num_reqs, max_model_len] int32: context per row
        slot_mappings: Any = None,           # unused: the drafter keeps no KV cache in vLLM's blocks
    ) -> list[list[int]]:
        t0 = time.perf_counter()
        if self.path_proposer is None and self.remote is None:
            self.load_model(None)
        s = self.settings
        n_rows = len(sampled_token_ids)
        drafts: list[list[int]] = [[] for _ in range(n_rows)]
        rows = [i for i, sampled in enumerate(sampled_token_ids) if sampled]  # [] rows: prefill chunk, discarded
        if not rows or not s.config.speculate:
            self._last_step = self._last_start = self._held = None
            self.guard.discard()
            return drafts
        if self._held is not None and CostAwareDraftLength.skip_round(self.acceptance):
            return self._held_step(drafts, rows, t0)
        lengths = num_tokens_no_spec[rows].astype(np.int64)                    # [R]
        emitted = np.array([len(sampled_token_ids[i]) for i in rows])           # [R]
        back = emitted + (self._held or 0)  # tokens each row gained since its state was stored
        prev = [self.states.pop(RequestStates.fingerprint(token_ids_cpu[i, : n - b]))
                for i, n, b in zip(rows, lengths.tolist(), back.tolist())]
        keys = [RequestStates.fingerprint(token_ids_cpu[i, :n]) for i, n in zip(rows, lengths.tolist())]
        clean = len(rows) == n_rows and all(p is not None for p in prev)
        self._observe_step(t0, clean)
        self._observe_copies(prev, emitted)
        profiled = 0.0 if self.costs is None else self.costs.profile_seconds  # (cost profiling is not a step's)
        if clean and self._last_start is not None:
            self.guard.finished(int(emitted.sum()), t0 - self._last_start - (profiled - self._last_profiled))
        else:
            self.guard.discard()
        self._last_start, self._last_profiled = t0, profiled

        # The draft-length policy on the gathered rows: last step's outcome, then this step's k.
        policy = self._policy(prev, emitted)
        room = torch.from_numpy(s.max_model_len - 1 - lengths).clamp(min=0)    # verify k + 1 tokens, in bounds
        uncached = self._uncached(prev, lengths)                                 # [R]
        view = RoundView(active=torch.ones(len(rows), dtype=torch.bool), room=room.clamp(max=s.num_speculative_tokens),
                         start_cost=None if self.costs is None else torch.from_numpy(self.costs.start_costs(uncached)))
        try:  # the cost policy may profile the drafter here (once per batch size): guarded alike
            k = policy.next_k(view)                                              # [R] int64
        except Exception:
            self._failure("the drafter failed while the draft lengths were chosen (cost profiling); this step proposes no drafts", exc_info=True)
            k = torch.zeros(len(rows), dtype=torch.int64)
        guarded = ThroughputGuard.applies(s.config)
        if int(k.max()) > 0 and guarded and not self.guard.drafter.allow(len(rows)):
            k = torch.zeros_like(k)  # drafter steps measured slower than steps without its pass at this batch size
        # Copies from the context, for the rows the drafter skips and those whose copy promises
        # at least their draft (they then leave the drafter's pass)
        copies = self._copies(token_ids_cpu, rows, lengths, view.room, k)
        if copies is not None:
            k = k.masked_fill(torch.tensor([len(c) > 0 for c in copies]), 0)
            if int(k.max()) == 0 and guarded and not self.guard.copies.allow(len(rows)):  # a step that only copies
                copies = None
        self.guard.started(len(rows), drafter=int(k.max()) > 0, copies=copies is not None)
        if self.costs is not None and not self.costs.ready:
            self.guard.discard()  # steps while the step cost is learnt draft little (one row, short copies): not samples

        path_len = torch.zeros(len(rows), dtype=torch.int64)
        new_gen_len = torch.zeros(len(rows), dtype=torch.int64)
        kv = [(p.drafter_kv, p.ngrams) if p else (None, None) for p in prev]  # rows that draft now replace theirs
        out = self._guarded_draft(token_ids_cpu, rows, lengths, k, kv, uncached) if int(k.max()) > 0 else None
        if out is None:
            k = torch.zeros_like(k)
        else:
            paths, path_len, new_gen_len, kv = out
            for j, i in enumerate(rows):
                drafts[i] = self._valid(paths[j][: int(path_len[j])])
                path_len[j] = len(drafts[i])
        copied = [0] * len(rows)
        for j, i in enumerate(rows):  # (their rows' states keep k = 0: the drafter's policy learns nothing from them)
            if copies is not None and copies[j]:
                drafts[i] = self._valid(copies[j])
                copied[j] = len(drafts[i])
        self.stats.copied_rows += sum(1 for n in copied if n)
        for j, (key, row) in enumerate(zip(keys, policy.export_rows())):
            self.states.put(key, RequestState(policy=row, k=int(k[j]), path_len=int(path_len[j]),
                                              gen_len=int(new_gen_len[j]), drafter_kv=kv[j][0], ngrams=kv[j][1],
                                              copied=copied[j]))
        nothing = int(k.max()) == 0 and copies is None
        # A re-check after held steps that again finds nothing to draft or copy holds twice as
        # long next time (up to max_recheck): a full step costs ~40% more than a held one
        # (server at one request, T = 0.7: ~8 ms against ~5.8 ms). A draft or copy resets it.
        if not nothing:
            self.acceptance.recheck = CostAwareDraftLength.recheck_every
        elif self._held is not None:
            self.acceptance.recheck = min(2 * self.acceptance.recheck, self.max_recheck)
        self._held = 0 if nothing else None  # nothing drafted: the next steps may be held
        self._count(drafts, rows, time.perf_counter() - t0)
        self._last_step = (sum(len(drafts[i]) + 1 for i in rows), time.perf_counter())
        return drafts

    def _held_step(self, drafts: list[list[int]], rows: list[int], t0: float) -> list[list[int]]:
        """A step of plain decoding decided in advance: the last step drafted nothing and the
        policy does not decide again yet (:meth:`CostAwareDraftLength.skip_round`). Nothing is
        looked up or stored, so such a step costs what a plain one does; each row gains one
        token, and the next full step finds a request's state by its context that many tokens
        back (a request that came or moved meanwhile is not found: it starts afresh). Nor is
        the step timed, except the last before a full step, which that step's guard sample
        measures as a plain one; the step-cost model learns from full steps only."""
        self._held += 1
        self.guard.discard()
        self.guard.started(len(rows), drafter=False, copies=False)
        self._last_start = t0
        self._count(drafts, rows, time.perf_counter() - t0)
        self._last_step = (len(rows), time.perf_counter())
        return drafts

    def _copies(self, token_ids_cpu: np.ndarray, rows: list[int], lengths: np.ndarray, room: torch.Tensor,
                k: torch.Tensor) -> list[list[int]] | None:
        """Drafts copied from each row's own context: per row, what followed the latest
        earlier occurrence of its last 5..3 tokens (:func:`~diffuspec.lattice.copied_drafts`),
        at most ``room``. They cost a search of each row's context (compiled), not a pass,
        and vLLM verifies them like any draft; the throughput guard measures steps that copy
        as it measures drafting steps. A row the policy gave a drafter draft (``k > 0``) in a
        step of several rows copies instead only where its copy is expected to be accepted
        at least as far (:meth:`_copy_wins`); each copy is then cut to what pays
        (:meth:`_cost_copies`).
        None when retrieval is off, the drafter runs on Ray, or no row keeps a copy."""
        if not self.settings.config.retrieval.enabled or self.path_proposer is None:
            return None
        # (one row keeps its drafter draft: the drafter's lattice holds the copy's tokens too,
        # and measured at one request, copying instead cost ~10%: 2.51x of plain against 2.72x)
        if len(rows) == 1 and int(k[0]) > 0:
            return None
        t0 = time.perf_counter()
        host = token_ids_cpu[rows, : int(lengths.max())]
        candidates = self.path_proposer.continuations(host, lengths, self.settings.num_speculative_tokens)
        copies = copied_drafts(candidates, room.numpy())
        wins = self._copy_wins(np.array([len(c) for c in copies]), k.numpy())
        copies = self._cost_copies([c if win else [] for c, win in zip(copies, wins.tolist())])
        self.stats.time_search += time.perf_counter() - t0
        return copies if any(copies) else None

    def _copy_wins(self, copy_len: np.ndarray, k: np.ndarray) -> np.ndarray:  # [R] bool
        """Rows whose copy of ``copy_len`` tokens is expected to have at least as many tokens
        accepted as a drafter draft of ``k`` (each from its own pooled acceptance; any copy
        where k is 0). Such a row leaves the drafter's pass, which then costs less."""
        def expected(rates: np.ndarray, n: np.ndarray) -> np.ndarray:  # E(n) tokens emitted, n drafted
            return expected_tokens(rates[None, :])[0][np.minimum(n, len(rates))]

        return (copy_len > 0) & (expected(self.copy_acceptance.rates(), copy_len) >=
                                 expected(self.acceptance.rates(), k))

    @property
    def copy_acceptance(self) -> AcceptanceModel:
        """The copies' pooled acceptance per position (apart from the drafter's)."""
        return self.copy_lengths.acceptance

    def _cost_copies(self, copies: list[list[int]]) -> list[list[int]]:
        """Each row's copy cut to the length that maximises the step's expected tokens per
        second (:class:`~diffuspec.scheduler.CopyLengths` over vLLM's learnt step cost, which
        a copy adds to by its tokens and nothing else: no pass). On a busy compute-bound step
        a token costs about what it would emit, so prose's copies, kept less often than
        code's, are cut there. Before the step cost is learnt, each copy is cut to
        ``explore_k`` tokens."""
        if self.costs is None or not any(copies):
            return copies
        if not self.costs.ready:  # nothing measured yet: little, for every row (in 16 steps the cost is learnt)
            return [c[: CostAwareDraftLength.explore_k] for c in copies]

        def times(tokens, kmax, drafting):  # a step of that many tokens, no proposal
            return self.costs.step_times(tokens, np.zeros_like(kmax), np.zeros_like(drafting))

        keep = self.copy_lengths.cut(np.array([len(c) for c in copies]), times, packed=True)
        return [c[:n] for c, n in zip(copies, keep.tolist())]

    def _observe_copies(self, prev: list[RequestState | None], emitted: np.ndarray) -> None:
        """Last step's copies and how many of their tokens vLLM accepted (``emitted - 1``),
        into the copies' pooled acceptance."""
        self.copy_lengths.observe(np.array([p.copied if p is not None else 0 for p in prev]), emitted - 1)

    def _uncached(self, prev: list[RequestState | None], lengths: np.ndarray) -> np.ndarray:  # [R] int64
        """Context tokens each row's drafter pass would encode beyond its prefix cache (the
        whole context for a request that has not drafted yet, or whose cache was dropped);
        0 where the drafter keeps no prefix cache (its profiled cost already encodes a context)."""
        if self.path_proposer is None or not self.path_proposer.caches_prefixes:
            return np.zeros(len(prev), np.int64)
        cached = [p.drafter_kv.length if p is not None and p.drafter_kv is not None else 0 for p in prev]
        return np.maximum(lengths - np.array(cached, dtype=np.int64), 0)

    def _guarded_draft(self, token_ids_cpu, rows, lengths, k, kv, uncached):
        """:meth:`_draft`, but a failure costs this step's drafts, never the server: an
        exception, or (with ``drafter_timeout_s``) a proposal still running at the limit,
        which is then left to finish on its own thread while the next steps draft nothing."""
        timeout = self.settings.config.drafter_timeout_s
        try:
            if timeout is None:
                return self._draft(token_ids_cpu, rows, lengths, k, kv, uncached)
            if self._late is not None and not self._late.done():
                self._failure("a proposal that timed out is still running; this step drafts nothing")
                return None
            self._late = None
            if self._pool is None:
                from concurrent.futures import ThreadPoolExecutor
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="diffuspec-drafter")
            future = self._pool.submit(self._draft, token_ids_cpu.copy(), rows, lengths.copy(), k, kv, uncached)
            try:
                return future.result(timeout=timeout)
            except TimeoutError:
                self._late = future
                self._failure(f"the drafter took longer than drafter_timeout_s={timeout}; this step drafts nothing")
                return None
        except Exception:
            self._failure("the drafter failed; this step proposes no drafts", exc_info=True)
            return None

    def _failure(self, message: str, exc_info: bool = False) -> None:
        self.stats.failures += 1
        if self.stats.failures == 1:
            logger.error("diffuspec: %s (further failures are counted in DiffuSpecProposer.stats.failures, not "
                         "logged)", message, exc_info=exc_info)

    def _valid(self, draft: list[int]) -> list[int]:
        """The draft up to its first id the target cannot take (a faulty drafter must not hand
        vLLM an id outside the vocabulary)."""
        limit = self.settings.emit_vocab
        for i, token in enumerate(draft):
            if not 0 <= token < limit:
                self.stats.invalid_drafts += 1
                return draft[:i]
        return draft

    def _observe_step(self, now: float, clean: bool) -> None:
        """Tell the step-cost model how long vLLM's last step took: the time since our last
        proposal, for the tokens that proposal asked it to verify. Only steps without
        prefills (no new request, no partial prompt chunk) count: their size is known."""
        if self.costs is not None and self._last_step is not None and clean:
            tokens, since = self._last_step
            was_ready = self.costs.ready
            self.costs.observe_step(tokens, now - since)
            if self.costs.ready and (not was_ready or self.costs.step.samples % 1000 == 0):
                a, b = self.costs.step.w
                logger.info("diffuspec: vLLM step cost %.2f ms + %.3f ms per token (%d steps seen)", 1e3 * a,
                            1e3 * b, self.costs.step.samples)

    def _policy(self, prev: list[RequestState | None], emitted: np.ndarray) -> DraftLengthPolicy:
        """A policy over this step's rows, loaded with each request's row state and told the
        outcome of its last step's draft: ``emitted - 1`` tokens accepted of those proposed."""
        policy = make_policy(len(prev), self.settings.config.adl, self.device, costs=self.costs,
                             acceptance=self.acceptance)
        policy.load_rows([p.policy if p is not None else None for p in prev])

        def last(name: str) -> torch.Tensor:  # [R] int64: last step's value (0 for a new request: k = 0)
            return torch.tensor([getattr(p, name) if p is not None else 0 for p in prev], dtype=torch.int64)

        proposed = last("path_len")
        accepted = torch.minimum(torch.from_numpy(emitted - 1).to(torch.int64), proposed)
        policy.observe(RoundOutcome(k=last("k"), generated=last("gen_len"), drafted=proposed, accepted=accepted))
        return policy

    def _draft(self, token_ids_cpu: np.ndarray, rows: list[int], lengths: np.ndarray, k: torch.Tensor,
               kv: list[tuple], uncached: np.ndarray):
        """One batched drafter pass + lattice + CPS for the rows with k > 0. ``kv``: each
        row's (drafter prefix cache, online proxy counts) from its previous step (None:
        none). Returns per row the path, its length, L_gen and that pair after this pass."""
        sel = torch.nonzero(k > 0).flatten()                                     # [D] indices into rows
        sel_rows = [rows[j] for j in sel.tolist()]
        contexts = [token_ids_cpu[i, : int(lengths[j])] for i, j in zip(sel_rows, sel.tolist())]
        carried = [kv[j] for j in sel.tolist()]
        if self.remote is not None:
            prop, after = self._draft_remote(contexts, k[sel], carried)
        else:
            assert self.path_proposer is not None
            self.stats.cached_tokens += sum(c[0].length for c, ctx in zip(carried, contexts)
                                            if c[0] is not None and c[0].length < len(ctx))
            prop, after = self.path_proposer.propose_contexts(contexts, k[sel], carried)
        host = torch.cat([prop.path_len[:, None], prop.gen_len[:, None], prop.path], dim=1).cpu()  # one sync
        self.stats.time_draft += prop.time_draft
        self.stats.time_search += prop.time_search
        if self.costs is not None:
            self.costs.observe_proposal(len(sel_rows), int(k.max()), int(uncached[sel.numpy()].sum()),
                                        prop.time_draft + prop.time_search)
        path_len = torch.zeros(len(rows), dtype=torch.int64)
        gen_len = torch.zeros(len(rows), dtype=torch.int64)
        path_len[sel], gen_len[sel] = host[:, 0], host[:, 1]
        paths: list[list[int]] = [[] for _ in rows]
        for j, row in zip(sel.tolist(), host[:, 2:].tolist()):
            paths[j] = row
        kv = list(kv)
        for d, j in enumerate(sel.tolist()):
            kv[j] = after[d]
        return paths, path_len, gen_len, kv

    def _draft_remote(self, contexts: list[np.ndarray], k: torch.Tensor, carried: list[tuple]):
        """:meth:`_draft`'s proposal from the drafter actor: each request's handle there
        (its key, and how many of its tokens the actor holds) rides in its state's carry."""
        from diffuspec.remote import RemoteHandle, RemoteState

        state = RemoteState(len(contexts))
        for j, (handle, _) in enumerate(carried):
            if isinstance(handle, RemoteHandle):
                state.keys[j], state.sent[j] = handle.key, handle.sent
        tokens, lengths = pad_contexts(contexts)
        prop = self.remote.propose(tokens, lengths, k, state)
        return prop, [(RemoteHandle(state.keys[j], state.sent[j]), None) for j in range(len(contexts))]

    def _count(self, drafts: list[list[int]], rows: list[int], elapsed: float) -> None:
        st = self.stats
        st.steps += 1
        if st.steps % 1000 == 0:  # what a long-running server's operator wants to see now and then
            logger.info("diffuspec: %d steps, %d request states, drafter caches %.1f MB of %.0f MB, %d failures, "
                        "%d drafts cut at an invalid id, %d steps kept plain by the throughput guard, %d rows drafted "
                        "(%d of them copied from their context; copies' pooled acceptance by position %s)",
                        st.steps, len(self.states), self.states.held_bytes / 2**20, self.states.cache_bytes / 2**20,
                        st.failures, st.invalid_drafts, self.guard.forced_plain, st.rows_drafted, st.copied_rows,
                        np.round(self.copy_acceptance.rates()[:4], 2).tolist())
        st.time_total += elapsed
        for i in rows:
            n = len(drafts[i])
            st.rows_drafted += n > 0
            st.draft_tokens += n
            st.draft_lengths[min(n, len(st.draft_lengths) - 1)] += 1
