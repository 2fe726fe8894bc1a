"""One loading path for the Python API and the vLLM proposer.

Everything between "the user named some folders" and "a drafter ready to draft" happens
here, once: resolving folders (or hub ids already in the local cache), the embedded default
pair, checking that target and drafter share a tokenizer, the EOS id and the emittable
vocabulary, preparing the drafter (mask id, prefix cache, int8 layers) and loading the
corpus proxy table. Every check of user input raises ``ValueError`` / ``TypeError`` naming
the bad value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import assets
from .config import DiffuSpecConfig
from .drafters import DiffusionDrafter, inspect_drafter_folder, quantize_int8, set_prefix_cache
from .proxy import NGramModel


# --------------------------------------------------------------------------- folders
def resolve_checkpoint(path_or_id: str | Path, role: str) -> Path:
    """A local checkpoint folder for a path, or for a hub id already in the local cache."""
    p = Path(path_or_id).expanduser()
    if not p.exists():
        name = str(path_or_id)
        if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
            try:
                from huggingface_hub import snapshot_download
                p = Path(snapshot_download(name))
            except Exception as exc:  # offline, unknown id, no access: all the same to the user
                raise ValueError(f"{role} {name!r} is not a local folder and could not be fetched as a model id "
                                 f"({type(exc).__name__}: {exc}). Pass a local checkpoint folder.") from None
        else:
            raise ValueError(f"{role} path {name!r} does not exist; pass a local checkpoint folder "
                             "(config.json, *.safetensors, tokenizer files)")
    if not p.is_dir():
        raise ValueError(f"{role} path {str(p)!r} is not a folder; pass the checkpoint folder that holds config.json")
    missing = [f for f in ("config.json",) if not (p / f).is_file()]
    if not list(p.glob("*.safetensors")):
        pickles = sorted(f.name for f in p.iterdir() if f.suffix in {".bin", ".pt", ".pth", ".ckpt"})
        if pickles:
            raise ValueError(f"{role} folder {str(p)!r} holds only pickled weights ({pickles[:3]}); diffuspec loads "
                             "safetensors only, since unpickling runs code from the file. Convert them first, e.g. "
                             "transformers' `model.save_pretrained(dir, safe_serialization=True)` or safetensors' "
                             "convert script.")
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{role} folder {str(p)!r} is missing {missing}; a checkpoint folder needs config.json, "
                         "weights (*.safetensors) and tokenizer files")
    return p


def resolve_drafter_folder(path_or_id: str | Path) -> Path:
    """A Dream/LLaDA checkpoint folder: exists, has weights, names a diffusion model type
    (a causal LM given as the drafter is a ``TypeError`` saying so)."""
    path = resolve_checkpoint(path_or_id, "drafter")
    inspect_drafter_folder(path)
    return path.resolve()


def embedded_pair() -> tuple[Path, Path, Path | None]:
    """(target, drafter, proxy table) of the embedded default pair, or a ValueError naming
    what to pass instead."""
    pair = assets.embedded_pair()
    if pair is None:
        raise ValueError("this install has no embedded model pair (diffuspec/pair/); pass target= and "
                         "drafter= folders, or build a pair with `diffuspec train --out DIR`")
    return pair[0], pair[1], assets.embedded_proxy_table()


def embedded_drafter_for(target: str | Path) -> tuple[Path, Path | None] | None:
    """The embedded drafter and proxy table when ``target`` is the embedded target, else None."""
    pair = assets.embedded_pair()
    target = Path(str(target))
    if pair is not None and target.exists() and target.resolve() == pair[0].resolve():
        return pair[1], assets.embedded_proxy_table()
    return None


def with_default_table(config: DiffuSpecConfig, table: Path | None, user_keys) -> DiffuSpecConfig:
    """The embedded corpus table, unless the user chose a table (or none) themselves."""
    if table is None or config.proxy_table is not None or "proxy_table" in user_keys:
        return config
    return config.replace(proxy_table=str(table))


def check_proxy_table(config: DiffuSpecConfig) -> None:
    if config.proxy_table is not None and not Path(config.proxy_table).is_file():
        raise ValueError(f"proxy_table={config.proxy_table!r} is not a file; build a table with "
                         "`diffuspec build-proxy` or drop the key")


def load_proxy_table(config: DiffuSpecConfig, device: str | torch.device) -> NGramModel | None:
    """The corpus n-gram table named by the config, on ``device`` (None when not configured)."""
    if config.proxy_table is None:
        return None
    check_proxy_table(config)
    return NGramModel.load(config.proxy_table, device=device)


# --------------------------------------------------------------------------- tokenizers
def vocab_mismatch(target: dict[str, int], drafter: dict[str, int]) -> str | None:
    """None when every target token has the same id in the drafter's map and the drafter's
    extra tokens (e.g. Dream's <|mask|>) take ids the target does not use."""
    missing = sorted(t for t in target if t not in drafter)
    moved = sorted(t for t in target if t in drafter and drafter[t] != target[t])
    used = set(target.values())
    clashing = sorted(t for t in drafter if t not in target and drafter[t] in used)
    if not (missing or moved or clashing):
        return None
    return (f"target has {len(target)} tokens, drafter {len(drafter)}; target tokens missing from the drafter's: "
            f"{missing[:3]}; tokens with different ids: {[(t, target[t], drafter[t]) for t in moved[:3]]}; "
            f"drafter tokens on ids the target uses for other tokens: {clashing[:3]}")


def drafter_tokenizer(drafter_dir: Path):
    """The drafter folder's ``tokenizer.json`` as a fast tokenizer, or None without one.
    (tokenizer.json alone: Dream folders name remote tokenizer code we do not run.)"""
    file = Path(drafter_dir) / "tokenizer.json"
    if not file.is_file():
        return None
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(file))


def check_shared_tokenizer(target_tokenizer, drafter_tok, names: str = "") -> None:
    """Raise ValueError when the two tokenizers' token → id maps disagree."""
    diff = vocab_mismatch(target_tokenizer.get_vocab(), drafter_tok.get_vocab())
    if diff:
        raise ValueError(f"the drafter's tokenizer disagrees with the target's{names}: token → id maps differ "
                         f"({diff}). Drafter and target must share one tokenizer; pick a drafter trained with the "
                         "target's tokenizer (e.g. Dream-v0 with Qwen2.5).")


def resolve_eos(tokenizer, *configs: Any) -> int | None:
    """The tokenizer's EOS id, else the first ``eos_token_id`` found on ``configs``
    (generation or model configs; a list takes its first id)."""
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    for cfg in configs:
        if eos is not None:
            break
        eos = getattr(cfg, "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
    return None if eos is None else int(eos)


def emit_vocab(target_vocab: int, tokenizer=None) -> int:
    """Ids the target can emit: its output rows, cut to the tokenizer's size (checkpoints pad
    their embedding, e.g. Qwen2.5's 152064 rows for 151665 tokens). The drafter never
    proposes ids at or above this."""
    return min(target_vocab, len(tokenizer)) if tokenizer is not None else target_vocab


# --------------------------------------------------------------------------- the drafter
@dataclass(frozen=True)
class PreparedDrafter:
    drafter: DiffusionDrafter
    int8: bool  # its linear layers run in int8


def prepare_drafter(drafter: DiffusionDrafter, config: DiffuSpecConfig, tokenizer=None,
                    where: str = "the drafter") -> PreparedDrafter:
    """Make a loaded drafter ready to draft, in place: its mask id (from the tokenizer when
    the drafter names none), the prefix-cache and int8 settings, eval mode."""
    mask_id = getattr(drafter, "mask_token_id", None)
    if mask_id is None:
        mask_id = getattr(tokenizer, "mask_token_id", None)
        if mask_id is None:
            raise ValueError("the tokenizer has no mask token and the drafter names no mask_token_id: a "
                             "diffusion drafter needs one. Add a mask token to the tokenizer "
                             "(tokenizer.add_special_tokens({'mask_token': '<|mask|>'})) or mask_token_id "
                             "to the drafter's config.json.")
        drafter.mask_token_id = mask_id
    if not 0 <= mask_id < drafter.vocab_size:
        raise ValueError(f"{where}: mask_token_id={mask_id} is outside the drafter's {drafter.vocab_size} "
                         "embedding rows; fix mask_token_id in the drafter's config.json")
    set_prefix_cache(drafter, config.drafter_cache)
    int8 = quantize_int8(drafter, config.drafter_int8)
    return PreparedDrafter(drafter.eval(), int8)


def check_drafter_object(drafter: Any) -> None:
    """A ``TypeError`` naming the fix when ``drafter`` is not a :class:`DiffusionDrafter`."""
    if drafter is None or isinstance(drafter, DiffusionDrafter):
        return
    hint = " Load one with diffuspec.drafters.load_drafter(path)."
    if hasattr(drafter, "config") and hasattr(drafter, "generate"):
        hint = (f" {type(drafter).__name__} is a causal (autoregressive) LM; it belongs in `target_model`. "
                "The drafter must be a diffusion LM: load a Dream, DiffuCoder, LLaDA, Fast-dLLM v2 or SDAR "
                "folder with diffuspec.drafters.load_drafter(path).")
    raise TypeError(f"drafter_model must be a diffuspec DiffusionDrafter, got {type(drafter).__name__}.{hint}")


def target_context(model_config: Any) -> int | None:
    """The target's context length from its config, if it states one."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
