"""Diffusion-LM drafters: the contract, the native transformer, and checkpoint formats."""

from .base import DiffusionDrafter, TransformerDrafter, build_masked_input
from .formats import detect_format, dream_config, load_drafter, save_dream
from .model import BidirectionalTransformer, TransformerSpec

__all__ = [
    "BidirectionalTransformer", "DiffusionDrafter", "TransformerDrafter", "TransformerSpec",
    "build_masked_input", "detect_format", "dream_config", "load_drafter", "save_dream",
]
