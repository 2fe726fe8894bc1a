"""Diffusion-LM drafters: the contract, the native transformer, and checkpoint formats
(Dream / DiffuCoder, LLaDA, Fast-dLLM v2, SDAR)."""

from .base import (DiffusionDrafter, DrafterState, RowCache, TransformerDrafter, build_masked_input, draft_attention_mask,
                   quantize_int8, set_prefix_cache)
from .formats import (FAMILIES, MASK_STRINGS, detect_format, dream_config, inspect_drafter_folder, load_drafter,
                      save_dream)
from .model import BidirectionalTransformer, TransformerSpec

__all__ = [
    "BidirectionalTransformer", "DiffusionDrafter", "TransformerDrafter", "TransformerSpec",
    "DrafterState", "RowCache", "quantize_int8", "set_prefix_cache", "build_masked_input", "draft_attention_mask", "detect_format", "dream_config", "inspect_drafter_folder", "load_drafter", "save_dream",
    "FAMILIES", "MASK_STRINGS",
]
