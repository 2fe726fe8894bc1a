"""Test-only vLLM proposers (loaded by dotted path inside vLLM's engine processes)."""

from __future__ import annotations

from diffuspec_vllm.proposer import DiffuSpecProposer


class RaggedDraftsProposer(DiffuSpecProposer):
    """DiffuSpec's drafts, but every third row gets none and every other row at most one
    token: vLLM must keep outputs exact with drafts of any length per row, [] included."""

    def propose(self, sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings=None):
        drafts = super().propose(sampled_token_ids, num_tokens_no_spec, token_ids_cpu, slot_mappings)
        return [[] if i % 3 == 0 else d[:1] if i % 3 == 1 else d for i, d in enumerate(drafts)]
