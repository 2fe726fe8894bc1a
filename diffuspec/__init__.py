"""diffuspec: lossless speculative decoding with a diffusion language model as the drafter.

The round, module by module: ``drafters`` (DLM forward over [prefix, MASK × k]) →
``lattice`` (per-position top sets) → ``proxy`` + ``cps`` (causal path search) → ``adl``
(next draft length) → ``verify`` (acceptance rules) → ``target`` (KV-cached AR pass) →
``engine`` (the batched loop) → ``api`` (``DiffuSpec``).
"""

from .api import DiffuSpec, GenerationResult
from .config import ADLConfig, CPSConfig, DiffuSpecConfig, LatticeConfig, ProxyConfig, SamplingParams
from .engine import GenerationStats

__all__ = [
    "ADLConfig", "CPSConfig", "DiffuSpec", "DiffuSpecConfig", "GenerationResult", "GenerationStats",
    "LatticeConfig", "ProxyConfig", "SamplingParams",
]
__version__ = "0.1.0"
