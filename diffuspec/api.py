"""Public API: wrap a transformers causal LM (the target) with a diffusion drafter.

    from diffuspec import DiffuSpec
    ds = DiffuSpec.from_pretrained(target="path/to/qwen2", drafter="path/to/dream")
    [result] = ds.generate("def fibonacci(n):", max_new_tokens=128)
    print(result.text, result.stats.tau)

Every input is checked here, at the boundary; errors name the bad value and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import DiffuSpecConfig, SamplingParams
from .drafters import DiffusionDrafter, load_drafter, quantize_int8, set_prefix_cache
from .engine import GenerationStats, SpeculativeEngine
from .proxy import NGramModel


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]     # generated ids (EOS included when generation ended on it)
    finish_reason: str       # "eos", "length" or "stop"
    stats: GenerationStats


def _vocab_mismatch(target: dict[str, int], drafter: dict[str, int]) -> str | None:
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


def _target_context(model) -> int | None:
    cfg = model.config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


class DiffuSpec:
    """Lossless speculative decoding: a DLM drafts, the AR target verifies."""

    def __init__(
        self,
        target_model,
        drafter_model: DiffusionDrafter | None,
        tokenizer,
        config: DiffuSpecConfig | dict | None = None,
        *,
        drafter_tokenizer=None,
        **config_kwargs: Any,
    ) -> None:
        if isinstance(config, dict):
            config = DiffuSpecConfig.from_kwargs(**config)
        config = (config or DiffuSpecConfig()).replace(**config_kwargs) if config_kwargs else (config or DiffuSpecConfig())
        if not isinstance(config, DiffuSpecConfig):
            raise TypeError(f"config must be a DiffuSpecConfig or a dict, got {type(config).__name__}")
        if not (isinstance(target_model, torch.nn.Module) and hasattr(target_model, "config")):
            raise TypeError(f"target_model must be a loaded transformers causal LM, got {type(target_model).__name__}")
        if drafter_model is not None and not isinstance(drafter_model, DiffusionDrafter):
            hint = ""
            if hasattr(drafter_model, "config") and hasattr(drafter_model, "generate"):
                hint = (f" {type(drafter_model).__name__} is a causal (autoregressive) LM; it belongs in `target_model`. "
                        "The drafter must be a diffusion LM: load a Dream- or LLaDA-format folder with "
                        "diffuspec.drafters.load_drafter(path).")
            raise TypeError(f"drafter_model must be a diffuspec DiffusionDrafter, got {type(drafter_model).__name__}."
                            f"{hint or ' Load one with diffuspec.drafters.load_drafter(path).'}")
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if drafter_tokenizer is not None:
            diff = _vocab_mismatch(tokenizer.get_vocab(), drafter_tokenizer.get_vocab())
            if diff:
                raise ValueError("the drafter's tokenizer disagrees with the target's (token → id maps differ: "
                                 f"{diff}). Drafter and target must share one tokenizer; pick a drafter trained "
                                 "with the target's tokenizer (e.g. Dream-v0 with Qwen2.5).")
        if drafter_model is not None:
            mask_id = getattr(drafter_model, "mask_token_id", None)
            if mask_id is None:
                mask_id = getattr(tokenizer, "mask_token_id", None)
                if mask_id is None:
                    raise ValueError("the tokenizer has no mask token and the drafter names no mask_token_id: a "
                                     "diffusion drafter needs one. Add a mask token to the tokenizer "
                                     "(tokenizer.add_special_tokens({'mask_token': '<|mask|>'})) or mask_token_id "
                                     "to the drafter's config.json.")
                drafter_model.mask_token_id = mask_id
            if not 0 <= mask_id < drafter_model.vocab_size:
                raise ValueError(f"mask_token_id={mask_id} is outside the drafter's {drafter_model.vocab_size} "
                                 "embedding rows; fix mask_token_id in the drafter's config.json")
        self.drafter_int8 = False  # whether the drafter's linear layers run in int8
        if drafter_model is not None:
            set_prefix_cache(drafter_model, config.drafter_cache)
            self.drafter_int8 = quantize_int8(drafter_model, config.drafter_int8)
        self.target = target_model.eval()
        self.drafter = drafter_model.eval() if drafter_model is not None else None
        self.tokenizer = tokenizer
        self.config = config
        emit_vocab = min(len(tokenizer), target_model.get_output_embeddings().weight.shape[0])
        eos = tokenizer.eos_token_id
        if eos is None:
            eos = getattr(getattr(target_model, "generation_config", None), "eos_token_id", None)
            eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        self.eos_token_id = eos
        self.max_context = _target_context(target_model)
        proxy_table = NGramModel.load(config.proxy_table, device=self.device) if config.proxy_table else None
        self.engine = SpeculativeEngine(self.target, self.drafter, config, eos, emit_vocab, proxy_table)

    @property
    def device(self) -> torch.device:
        return next(self.target.parameters()).device

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        target: str | Path | None = None,
        drafter: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        **config: Any,
    ) -> "DiffuSpec":
        """Load a target (transformers causal LM folder or id) and a drafter (Dream/LLaDA
        folder) that share a tokenizer. With neither, the embedded default pair (and its
        corpus proxy table). ``drafter=None`` with a target gives plain AR decoding.
        Keyword arguments beyond device/dtype are configuration keys (see DiffuSpecConfig)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from . import assets

        cfg = DiffuSpecConfig.from_kwargs(**config)  # reject unknown keys before loading anything
        if target is None:
            if drafter is not None:
                raise ValueError("a drafter was given without a target; pass target= too (or neither, for the "
                                 "embedded default pair)")
            pair = assets.embedded_pair()
            if pair is None:
                raise ValueError("this install has no embedded model pair (diffuspec/pair/); pass target= and "
                                 "drafter= folders, or build a pair with `diffuspec train --out DIR`")
            target, drafter = pair
            table = assets.embedded_proxy_table()
            if cfg.proxy_table is None and table is not None and "proxy_table" not in config:
                cfg = cfg.replace(proxy_table=str(table))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        target = _resolve(target, "target")
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        target_model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype).to(device)
        drafter_model = drafter_tok = None
        if drafter is not None:
            drafter = _resolve(drafter, "drafter")
            drafter_model = load_drafter(drafter, dtype=dtype, device=device)
            if (drafter / "tokenizer.json").is_file():
                # tokenizer.json alone: Dream folders name remote tokenizer code we do not run.
                from transformers import PreTrainedTokenizerFast
                drafter_tok = PreTrainedTokenizerFast(tokenizer_file=str(drafter / "tokenizer.json"))
        return cls(target_model, drafter_model, tokenizer, cfg, drafter_tokenizer=drafter_tok)

    # --------------------------------------------------------------- generation
    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        speculate: bool | None = None,
    ) -> list[GenerationResult]:
        """Generate for one prompt or a batch; returns one result per prompt, in order.

        ``prompts``: a string, a list of strings, a list of token ids (one prompt), a list
        of token-id lists, or a 1-D/2-D tensor of ids. ``temperature=0`` is greedy.
        ``speculate=False`` decodes with the target alone through the same engine."""
        if isinstance(stop, str):
            stop = (stop,)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop=tuple(stop or ()))
        ids = self._encode(prompts)
        for i, p in enumerate(ids):
            if self.max_context is not None and len(p) + max_new_tokens > self.max_context:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                 f"the target's context of {self.max_context} tokens. Shorten the prompt or lower "
                                 "max_new_tokens.")
        engine = self.engine
        if speculate is not None and speculate != self.config.speculate:
            engine = SpeculativeEngine(self.target, self.drafter, self.config.replace(speculate=speculate),
                                       self.eos_token_id, engine.emit_vocab, engine.proxy_table)
        outs = engine.generate(ids, params, decode=self._decode)
        results = []
        for o in outs:
            text = self._decode(o.token_ids)
            if o.stop_text_end is not None:
                text = text[: o.stop_text_end]
            results.append(GenerationResult(text=text, token_ids=o.token_ids, finish_reason=o.finish_reason,
                                             stats=o.stats))
        return results

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _encode(self, prompts) -> list[list[int]]:
        if isinstance(prompts, torch.Tensor):
            if prompts.dim() not in (1, 2) or prompts.dtype.is_floating_point:
                raise TypeError(f"a prompt tensor must be 1-D or 2-D integer ids, got shape {tuple(prompts.shape)} "
                                f"dtype {prompts.dtype}")
            prompts = prompts.tolist()
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts must be a string, a list of strings or token ids, got {type(prompts).__name__}")
        if len(prompts) == 0:
            raise ValueError("prompts is empty; pass at least one prompt")
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
            prompts = [list(prompts)]
        vocab = len(self.tokenizer)
        ids = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt {i} is an empty string; give at least one character")
                enc = self.tokenizer(p, add_special_tokens=True)["input_ids"]
                if not enc:
                    raise ValueError(f"prompt {i} ({p!r}) encodes to no tokens")
                ids.append(list(enc))
            elif isinstance(p, (list, tuple)):
                if not p:
                    raise ValueError(f"prompt {i} is an empty token list; give at least one token id")
                bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
                if bad:
                    raise ValueError(f"prompt {i} has token ids outside the tokenizer's range [0, {vocab}): {bad[:5]}")
                ids.append(list(p))
            else:
                raise TypeError(f"prompt {i} must be a string or a list of token ids, got {type(p).__name__}")
        return ids


def _resolve(path_or_id, role: str) -> Path:
    """A local checkpoint folder for a path, or for a hub id already in the local cache."""
    p = Path(path_or_id)
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
    if not list(p.glob("*.safetensors")) and not list(p.glob("*.bin")):
        missing.append("*.safetensors")
    if missing:
        raise ValueError(f"{role} folder {str(p)!r} is missing {missing}; a checkpoint folder needs config.json, "
                         "weights (*.safetensors) and tokenizer files")
    return p
