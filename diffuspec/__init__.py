"""diffuspec: lossless speculative decoding with a diffusion language model as the drafter.

The round, module by module: ``policy`` / ``adl`` (each row's draft length) → ``drafters``
(DLM forward over [prefix, MASK × k]) → ``lattice`` (per-position top sets) → ``proxy`` +
``cps`` (causal path search), composed by ``propose`` → ``target`` (KV-cached AR pass over
the path, on ``kvcache``) → ``verify`` (acceptance rules) → ``engine`` (the batched loop,
recording ``stats`` and stop strings through ``detokenize``) → ``api`` (``DiffuSpec``), with
``loading`` shared by the API and the vLLM adapter. Tooling (the training recipe, random
pairs) lives in ``diffuspec.recipe``. Design notes: ``docs/architecture.md``.
"""

import logging

from .api import DiffuSpec, GenerationResult, StreamDelta
from .config import ADLConfig, CPSConfig, DiffuSpecConfig, LatticeConfig, ProxyConfig, SamplingParams
from .stats import GenerationStats

__all__ = [
    "ADLConfig", "CPSConfig", "DiffuSpec", "DiffuSpecConfig", "GenerationResult", "GenerationStats",
    "LatticeConfig", "ProxyConfig", "SamplingParams", "StreamDelta",
]
__version__ = "0.1.0"

# The library reports through the "diffuspec" logger only (and progress bars in tooling);
# applications decide where records go.
logging.getLogger(__name__).addHandler(logging.NullHandler())
