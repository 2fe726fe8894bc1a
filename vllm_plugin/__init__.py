"""vLLM adapter for diffuspec (import name ``diffuspec_vllm``): a thin translation layer.

- :class:`DiffuSpecProposer` (``diffuspec_vllm.proposer``): vLLM's ``custom_class``
  speculative proposer, drafting with a diffusion LM through :mod:`diffuspec`.
- :func:`register` (``diffuspec_vllm.plugin``): the ``vllm.general_plugins`` entry point that
  adds the short form ``--speculative-config '{"method": "diffuspec", "model": DRAFTER, ...}'``.

The algorithm itself lives once, in :mod:`diffuspec`. Importing this package does not import
vLLM.
"""

from .plugin import register
from .proposer import DiffuSpecProposer

__all__ = ["DiffuSpecProposer", "register"]
