"""Drafter placement on Ray: the proposal half in an actor, the target where it is.

``DiffuSpec.from_pretrained(..., placement="ray")`` puts the drafter side — the drafter,
the lattice, CPS and its proxy, each request's drafter prefix cache and online n-gram
counts — in a Ray actor on its own device (or its own cores), and keeps the target and its
KV cache in the calling process. The engine sees a :class:`RemoteProposer`, which has the
:class:`diffuspec.propose.PathProposer` interface.

What crosses the wire per round (token ids and small metadata, never logits or caches)::

    driver → actor   per drafting row: (request key, start, new token ids, k)
                     start = how many of the request's tokens the actor already holds
    actor → driver   paths [R, kmax] int64, path_len [R], gen_len [R], per-row pre-draft
                     hits, the actor's draft and search seconds, rows it needs resent

The actor appends each row's new tokens to the context it keeps for the request; a row
whose ``start`` is not what the actor holds (a restarted actor, a call that timed out
half-way) is answered "resend", and the driver sends that row's whole context once.

**Pipelining** (``pipelined=True``). While the target verifies round t, the actor pre-drafts
round t+1 for the most likely outcome: every drafted token accepted, followed by the bonus
token the drafter itself predicts (it drafts one position more than asked, and that
position's path token is its guess of the bonus). When the next call brings exactly those
tokens, the pre-drafted path is returned at once (cut to the k asked for); otherwise the
row is drafted anew. Drafts never change outputs, only speed; stats count the hits and
misses and the draft time hidden behind the target.

**Faults.** A call that raises (the actor died) or outlasts ``drafter_timeout_s`` costs that
round its drafts: the engine decodes the round plainly (one log line, then counted). Until
the actor answers again — Ray restarts it up to ``max_restarts`` times — rounds decode
plainly without calling it; then rows are resent and drafting resumes.
"""

from __future__ import annotations

import logging
import socket
from collections import OrderedDict
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import DiffuSpecConfig
from .propose import Proposal
from .proxy import columns_between

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 120.0   # a proposal call with no drafter_timeout_s set
START_TIMEOUT_S = 300.0     # the actor must load its drafter within this
MAX_REQUESTS = 4096         # requests an actor keeps; the least recently used beyond are resent when seen again


class DrafterUnavailable(RuntimeError):
    """The drafter actor is down or restarting: this round decodes plainly."""


# ---------------------------------------------------------------------------- actor side
@dataclass
class _Request:
    tokens: list[int] = field(default_factory=list)   # the request's context as the actor holds it
    carry: tuple = (None, None)                       # (drafter prefix cache rows, online proxy row)
    pre: dict | None = None                           # a pre-draft for the most likely next call


class DrafterWorker:
    """The drafter side of placement="ray" (runs inside the actor; usable in-process too)."""

    def __init__(self, spec: dict) -> None:
        from . import loading
        from .drafters import load_drafter
        from .propose import PathProposer

        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        config = DiffuSpecConfig.from_kwargs(**spec["config"])
        drafter = spec.get("drafter_module")
        if drafter is not None:
            drafter = drafter.to(torch.device(spec["device"]))
        else:
            drafter = load_drafter(spec["drafter_path"], dtype=getattr(torch, spec["dtype"]),
                                   device=torch.device(spec["device"]))
        drafter = loading.prepare_drafter(drafter, config, where="drafter").drafter
        table = loading.load_proxy_table(config, spec["device"])
        self.proposer = PathProposer(drafter, config, spec["eos_token_id"], spec["emit_vocab"], table)
        self.grow = config.adl.delta
        self.k_max = config.adl.k_max
        self.requests: OrderedDict[str, _Request] = OrderedDict()  # least recently used first
        self.incarnation = uuid.uuid4().hex  # changes when Ray restarts the actor

    def ready(self) -> str:
        return self.incarnation

    def forget(self, keys: list[str]) -> None:
        for key in keys:
            self.requests.pop(key, None)

    def propose(self, rows: list[tuple[str, int, np.ndarray, int]], pipelined: bool, forget: list[str] = ()
                ) -> dict:
        """Paths for ``rows`` = [(key, start, new tokens, k)] (see the module docstring);
        ``forget``: requests that have finished."""
        self.forget(list(forget))
        resend = [j for j, (key, start, _, _) in enumerate(rows)
                  if len(self.requests.get(key, _Request()).tokens) != start]
        if resend:
            for j in resend:
                self.requests.pop(rows[j][0], None)
            return {"resend": resend, "incarnation": self.incarnation}
        k = torch.tensor([r[3] for r in rows], dtype=torch.int64)
        kmax = int(k.max())
        paths = np.zeros((len(rows), kmax), np.int64)
        path_len = np.zeros(len(rows), np.int64)
        gen_len = np.zeros(len(rows), np.int64)
        hit = np.zeros(len(rows), bool)
        todo = []
        for j, (key, start, new, kj) in enumerate(rows):
            req = self.requests.setdefault(key, _Request())
            self.requests.move_to_end(key)
            pre, req.pre = req.pre, None
            req.tokens.extend(np.asarray(new).tolist())
            if pre is not None and np.array_equal(pre["expect"], new) and kj <= pre["k"]:
                hit[j] = True
                n = min(kj, pre["path_len"])
                paths[j, :kj] = pre["path"][:kj]
                path_len[j], gen_len[j] = n, min(kj, pre["gen_len"])
                req.carry = pre["carry"]
                if pipelined and len(pre["full"]) > kj:  # the pre-draft's next token guesses this bonus
                    req.pre = {"guess": pre["full"][: kj + 1], "k": kj}
            else:
                todo.append(j)
        while len(self.requests) > MAX_REQUESTS:  # callers that never say a request ended (vLLM): bounded
            self.requests.popitem(last=False)
        t_draft = t_search = 0.0
        if todo:
            # pipelined: one position more than asked, whose path token guesses the bonus
            extra = 1 if pipelined else 0
            ask = torch.tensor([int(k[j]) + extra for j in todo], dtype=torch.int64)
            keys = [rows[j][0] for j in todo]
            prop, after = self.proposer.propose_contexts(
                [np.asarray(self.requests[key].tokens, np.int64) for key in keys], ask,
                [self.requests[key].carry for key in keys])
            host = torch.cat([prop.path_len[:, None], prop.gen_len[:, None], prop.path], dim=1).cpu().numpy()
            for d, j in enumerate(todo):
                kj = int(k[j])
                req = self.requests[keys[d]]
                req.carry = after[d]
                paths[j, :kj] = host[d, 2: 2 + kj]
                path_len[j], gen_len[j] = min(int(host[d, 0]), kj), min(int(host[d, 1]), kj)
                if pipelined and int(host[d, 0]) > kj:  # no EOS inside: the guess of the bonus exists
                    req.pre = {"guess": host[d, 2: 3 + kj].copy(), "k": kj}
            t_draft, t_search = prop.time_draft, prop.time_search
        return {"paths": paths, "path_len": path_len, "gen_len": gen_len, "hit": hit, "time_draft": t_draft,
                "time_search": t_search, "incarnation": self.incarnation}

    def predraft(self) -> float:
        """Draft, for every request with a guess from the last call, the round after it as if
        every drafted token and the guessed bonus were accepted. Returns the seconds spent
        (hidden behind the target's verify pass when the driver calls this right away)."""
        t0 = time.perf_counter()
        keys = [key for key, req in self.requests.items() if req.pre is not None and "guess" in req.pre]
        if not keys:
            return 0.0
        ks = [min(self.k_max, self.requests[key].pre["k"] + self.grow) for key in keys]
        contexts = [np.asarray(self.requests[key].tokens + self.requests[key].pre["guess"].tolist(), np.int64)
                    for key in keys]
        # on copies of the rows' carry: a pre-draft that misses must leave the request as it was
        carry = [(kv, ngrams.copy() if ngrams is not None else None)
                 for kv, ngrams in (self.requests[key].carry for key in keys)]
        prop, after = self.proposer.propose_contexts(contexts, torch.tensor([kk + 1 for kk in ks]), carry)
        host = torch.cat([prop.path_len[:, None], prop.gen_len[:, None], prop.path], dim=1).cpu().numpy()
        for d, key in enumerate(keys):
            req = self.requests[key]
            kk, n = ks[d], int(host[d, 0])
            req.pre = {"expect": req.pre["guess"], "k": kk, "path": host[d, 2: 2 + kk].copy(),
                       "full": host[d, 2: 2 + min(n, kk + 1)].copy(),  # with the guess of its bonus when no EOS
                       "path_len": min(n, kk), "gen_len": min(int(host[d, 1]), kk), "carry": after[d]}
        return time.perf_counter() - t0


# ---------------------------------------------------------------------------- driver side
class RemoteState:
    """The driver's view of one generation's rows: a request key per row and how many of
    its tokens the actor holds (the engine selects and extends rows as for a local state)."""

    def __init__(self, rows: int) -> None:
        self.keys = [uuid.uuid4().hex for _ in range(rows)]
        self.sent = [0] * rows
        self.dropped: list[str] = []  # rows that left: the actor forgets them with the next call

    def select(self, index: torch.Tensor) -> None:
        idx = index.tolist()
        kept = set(idx)
        self.dropped += [key for i, key in enumerate(self.keys) if i not in kept]
        self.keys = [self.keys[i] for i in idx]
        self.sent = [self.sent[i] for i in idx]

    def extend(self, rows: int) -> None:
        self.keys += [uuid.uuid4().hex for _ in range(rows)]
        self.sent += [0] * rows


@dataclass
class RemoteHandle:
    """A request's place on the drafter actor, kept by callers that hold no RemoteState
    across calls (the vLLM proposer keeps it in the request's state)."""
    key: str
    sent: int
    nbytes: int = 0  # (counted against the proposer's cache budget: nothing)


@dataclass
class RemoteStats:
    """The driver's counters of one RemoteProposer (what crossed the wire, what failed)."""
    calls: int = 0
    resends: int = 0
    failures: int = 0
    predraft_hits: int = 0
    predraft_misses: int = 0
    time_hidden: float = 0.0      # pre-draft seconds spent while the target verified
    time_roundtrip: float = 0.0   # driver-side seconds of propose calls, minus the actor's own work
    bytes_sent: int = 0
    bytes_received: int = 0


class RemoteProposer:
    """The engine's proposer when the drafter lives in a Ray actor (module docstring)."""

    drafter = None  # no drafter in this process

    def __init__(self, actor, config: DiffuSpecConfig, emit_vocab: int, pipelined: bool, device: torch.device
                 ) -> None:
        import ray

        self._ray = ray
        self.actor = actor
        self.config = config
        self.emit_vocab = emit_vocab
        self.pipelined = pipelined
        self.device = device
        self.timeout = config.drafter_timeout_s or DEFAULT_TIMEOUT_S
        self.stats = RemoteStats()
        self.proxy_table = None
        self._down: object | None = None     # the ready() call to wait for while the actor is down
        self._predraft: object | None = None  # the pre-draft call in flight
        self.incarnation = ray.get(actor.ready.remote(), timeout=START_TIMEOUT_S)

    def new_state(self, rows: int, capacity: int) -> RemoteState:
        return RemoteState(rows)

    def _available(self) -> bool:
        if self._down is None:
            return True
        done, _ = self._ray.wait([self._down], timeout=0)
        if not done:
            return False
        try:
            self.incarnation = self._ray.get(self._down)
        except Exception:  # still failing: ask again next round
            self._down = self.actor.ready.remote()
            return False
        self._down = None
        logger.warning("diffuspec: the drafter actor answers again; drafting resumes")
        return True

    def _fail(self) -> None:
        self.stats.failures += 1
        self._predraft = None
        self._down = self.actor.ready.remote()

    def propose(self, tokens: torch.Tensor, lengths_cpu: torch.Tensor, k_cpu: torch.Tensor,
                state: RemoteState | None = None) -> Proposal:
        if not self._available():
            raise DrafterUnavailable("the drafter actor is restarting")
        if state is None:  # a one-off call: nothing kept
            state = RemoteState(tokens.shape[0])
        if self._predraft is not None:  # its seconds were hidden behind the verify pass just done
            ref, self._predraft = self._predraft, None
            try:
                done, _ = self._ray.wait([ref], timeout=0)
                if done:
                    self.stats.time_hidden += self._ray.get(ref)
            except Exception:
                pass
        b, kmax = tokens.shape[0], int(k_cpu.max())
        rows = [j for j in range(b) if int(k_cpu[j]) > 0]
        lengths = lengths_cpu.tolist()
        t0 = time.perf_counter()
        answer = self._call(tokens, lengths, k_cpu, state, rows)
        if "resend" in answer:  # the actor lost those rows (restarted, or a call timed out half-way)
            self.stats.resends += len(answer["resend"])
            for j in answer["resend"]:
                state.sent[rows[j]] = 0
            answer = self._call(tokens, lengths, k_cpu, state, rows)
            if "resend" in answer:
                raise DrafterUnavailable("the drafter actor lost its rows twice in one round")
        for j in rows:
            state.sent[j] = lengths[j]
        elapsed = time.perf_counter() - t0
        if self.pipelined:  # runs on the actor while the target verifies this round
            self._predraft = self.actor.predraft.remote()
        st = self.stats
        st.calls += 1
        st.time_roundtrip += max(0.0, elapsed - answer["time_draft"] - answer["time_search"])
        hits = int(answer["hit"].sum())
        st.predraft_hits += hits
        st.predraft_misses += len(rows) - hits if self.pipelined else 0
        path = torch.zeros(b, kmax, dtype=torch.int64)
        path_len = torch.zeros(b, dtype=torch.int64)
        gen_len = torch.zeros(b, dtype=torch.int64)
        sel = torch.tensor(rows, dtype=torch.int64)
        path[sel, : answer["paths"].shape[1]] = torch.tensor(answer["paths"])
        path_len[sel] = torch.tensor(answer["path_len"])
        gen_len[sel] = torch.tensor(answer["gen_len"])
        hit = torch.zeros(b, dtype=torch.bool)
        hit[sel] = torch.tensor(answer["hit"])
        return Proposal(path.clamp(0, self.emit_vocab - 1).to(self.device), path_len.to(self.device),
                        gen_len.to(self.device), answer["time_draft"], answer["time_search"],
                        predraft_hit=hit if self.pipelined else None)

    def _call(self, tokens: torch.Tensor, lengths: list[int], k_cpu: torch.Tensor, state: RemoteState,
              rows: list[int]) -> dict:
        """One propose call: each drafting row's tokens since what the actor holds."""
        new = columns_between(tokens[torch.tensor(rows, device=tokens.device)], [state.sent[j] for j in rows],
                              [lengths[j] for j in rows])
        message = [(state.keys[j], state.sent[j], new[d, : lengths[j] - state.sent[j]], int(k_cpu[j]))
                   for d, j in enumerate(rows)]
        self.stats.bytes_sent += sum(m[2].nbytes + 64 for m in message)
        try:
            forget, state.dropped = state.dropped, []
            answer = self._ray.get(self.actor.propose.remote(message, self.pipelined, forget), timeout=self.timeout)
        except Exception as exc:
            self._fail()
            raise DrafterUnavailable(f"the drafter actor failed ({type(exc).__name__}): this round decodes "
                                     "plainly until it answers again") from exc
        if "paths" in answer:
            self.stats.bytes_received += answer["paths"].nbytes + 4 * 8 * len(rows)
        return answer



def pipelined_speedup(draft: float, verify: float, roundtrip: float, hit_rate: float) -> float:
    """Predicted round-time ratio, not pipelined / pipelined, for a drafter and a target on
    separate devices (times per round in any unit). Not pipelined a round costs
    draft + roundtrip + verify. Pipelined, the pre-draft runs during verify: a hit waits
    only for what of it outlasts verify, a miss also drafts anew:
    verify + roundtrip + max(0, draft - verify) + (1 - hit_rate) * draft."""
    plain = draft + roundtrip + verify
    piped = verify + roundtrip + max(0.0, draft - verify) + (1.0 - hit_rate) * draft
    return plain / piped


# ---------------------------------------------------------------------------- start-up
def remote_config(config: DiffuSpecConfig) -> DiffuSpecConfig:
    """The config of a remote drafter: the cost-aware policy profiles the drafter in the
    calling process, which does not hold it, so "auto" runs the paper's ADL and "cost" is
    refused."""
    if config.adl.policy == "cost":
        raise ValueError("adl='cost' profiles the drafter in this process; with the drafter on Ray use adl='paper' "
                         "(what 'auto' becomes there) or 'fixed'")
    return config.replace(adl={"policy": "paper"}) if config.adl.policy == "auto" else config


def check_placement(placement: str, drafter_resources) -> None:
    if placement not in ("local", "ray"):
        raise ValueError(f"placement={placement!r} must be 'local' (one process) or 'ray' (the drafter in a Ray "
                         "actor)")
    if drafter_resources is not None and not (isinstance(drafter_resources, dict) and all(
            isinstance(v, (int, float, dict)) and not isinstance(v, bool) for v in drafter_resources.values())):
        raise ValueError(f"drafter_resources={drafter_resources!r} must be a dict of Ray actor options, e.g. "
                         "{'num_gpus': 1} or {'num_cpus': 2}")



def _check_address(address: str | None) -> None:
    """An unreachable address fails here, in seconds, naming the fix (ray.init would wait)."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"ray_address={address!r} is not HOST:PORT (or ray://HOST:PORT, 'auto', None for a local "
                         "Ray)")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        raise ValueError(f"ray_address={address!r} cannot be reached ({exc}); start the cluster (`ray start --head`) "
                         "or pass its address, or ray_address=None for a local Ray") from None


def start_drafter_actor(spec: dict, ray_address: str | None, resources: dict | None, max_restarts: int):
    """The drafter actor, started and loaded; every start-up failure is an error naming the fix."""
    try:
        import ray
    except ImportError:
        raise ImportError("placement='ray' needs Ray: pip install 'diffuspec[ray]' (or pip install ray)") from None
    _check_address(ray_address)
    if not ray.is_initialized():
        ray.init(address=ray_address or None, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True, configure_logging=False)
    resources = dict(resources or ({"num_gpus": 1} if spec["device"].startswith("cuda") else {"num_cpus": 1}))
    cluster = ray.cluster_resources()
    names = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}
    for key, amount in resources.items():
        if key == "resources":
            continue
        have = cluster.get(names.get(key, key), 0)
        if amount > have:
            raise ValueError(f"drafter_resources asks for {key}={amount}, but the Ray cluster has {have}; lower it or "
                             "add nodes that have it (a CPU-only cluster has no GPU: drafter_resources={'num_cpus': 1})")
    spec = dict(spec, threads=spec.get("threads") or int(resources.get("num_cpus", 0) or 0) or None)
    actor_cls = ray.remote(max_restarts=max_restarts, max_task_retries=0)(DrafterWorker)
    options = {k: v for k, v in resources.items() if k in ("num_cpus", "num_gpus", "memory", "resources")}
    actor = actor_cls.options(**options).remote(spec)
    try:
        ray.get(actor.ready.remote(), timeout=START_TIMEOUT_S)
    except Exception as exc:
        ray.kill(actor)
        raise RuntimeError(f"the drafter actor did not start within {START_TIMEOUT_S:.0f} s ({type(exc).__name__}: "
                           f"{exc}); check that the cluster can give {resources} and that every node can read the "
                           "drafter folder") from None
    return actor
