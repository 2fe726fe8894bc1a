"""Test-only vLLM proposers (loaded by dotted path inside vLLM's engine processes)."""

from __future__ import annotations

from diffuspec_vllm.proposer import DiffuSpecProposer, logger


class RaggedDraftsProposer(DiffuSpecProposer):
    """DiffuSpec's drafts, but every third row gets none and every other row at most one
    token: vLLM must keep outputs exact with drafts of any length per row, [] included."""

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        drafts = super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        return [[] if i % 3 == 0 else d[:1] if i % 3 == 1 else d for i, d in enumerate(drafts)]


class AlternateStepsProposer(DiffuSpecProposer):
    """DiffuSpec's drafts on odd steps, none for any row on even ones: vLLM runs steps with
    and without drafts in turn (the step patches of diffuspec_vllm.steps take both paths)."""

    steps = 0

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        drafts = super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        self.steps += 1
        return drafts if self.steps % 2 else [[] for _ in drafts]


class FaultyProposer(DiffuSpecProposer):
    """DiffuSpec with faults injected at chosen drafter calls, for the soak test: the
    environment variable DIFFUSPEC_TEST_FAULTS lists ``kind@call`` (comma-separated; counted
    over the steps that draft at all; a fault repeats every ``every`` calls when written
    ``kind@call/every``). Kinds: ``exception`` (the drafter
    raises), ``hang`` (a proposal sleeps past drafter_timeout_s), ``nan`` (NaN drafter
    logits), ``range`` (draft ids past the vocabulary)."""

    def __init__(self, vllm_config):
        import os

        super().__init__(vllm_config)
        self.faults = []
        for item in filter(None, os.environ.get("DIFFUSPEC_TEST_FAULTS", "").split(",")):
            kind, when = item.split("@")
            start, _, every = when.partition("/")
            self.faults.append((kind, int(start), int(every or 0)))
        self.injected = {kind: 0 for kind, _, _ in self.faults}
        self.calls = 0

    def _due(self, kind: str) -> bool:
        step = self.calls
        return any(k == kind and (step == s or (e and step > s and (step - s) % e == 0)) for k, s, e in self.faults)

    def _draft(self, token_ids_cpu, rows, lengths, k, kv, *rest):
        import time

        import torch

        self.calls += 1
        for kind in ("exception", "hang", "nan", "range"):
            if self._due(kind):
                self.injected[kind] += 1
                logger.warning("diffuspec test: injected fault %s at drafter call %d", kind, self.calls)
                if kind == "exception":
                    raise RuntimeError("injected drafter fault")
                if kind == "hang":
                    time.sleep(3 * (self.settings.config.drafter_timeout_s or 1.0))
                if kind == "nan":
                    drafter = self.path_proposer.drafter
                    real = drafter.draft
                    drafter.draft = lambda *a, **kw: real(*a, **kw) * float("nan")
                    try:
                        return super()._draft(token_ids_cpu, rows, lengths, k, kv, *rest)
                    finally:
                        drafter.draft = real
                if kind == "range":
                    paths, path_len, gen_len, kv = super()._draft(token_ids_cpu, rows, lengths, k, kv, *rest)
                    paths = [[t + 10**6 for t in p] for p in paths]
                    return paths, torch.maximum(path_len, torch.ones_like(path_len)), gen_len, kv
        return super()._draft(token_ids_cpu, rows, lengths, k, kv, *rest)
