"""Checkpoint formats: diffusion-LM folders (config.json + safetensors), loaded natively, no remote code.

The family is read from config.json (``model_type`` first, then ``architectures``) and names
the drafter's ``format``:

- **dream** (``"model_type": "Dream"``): Dream-v0 and DiffuCoder (apple/DiffuCoder-7B-*, the
  same format). Qwen2 weight names, q/k/v biases, shifted prediction, bidirectional
  attention, ``mask_token_id`` in the config (151666).
- **llada** (``"model_type": "llada"``): OLMo-style names under ``model.transformer``
  (``wte``, ``blocks.N.q_proj``, ``attn_out``, ``ff_proj``/``up_proj``/``ff_out``,
  ``attn_norm``/``ff_norm``, ``ln_f``), unshifted, bidirectional, mask id from the config (126336).
- **fast_dllm_v2** (``"model_type": "Fast_dLLM_Qwen"``, Efficient-Large-Model/Fast_dLLM_v2_7B):
  Qwen2 names with q/k/v biases, shifted, block-causal with block size ``bd_size`` (32). The
  config has no mask id: the mask ``|<MASK>|`` (151665) is in added_tokens.json.
- **sdar** (``"model_type": "sdar"``, JetLM/SDAR-*-Chat): Qwen3 names (per-head
  ``self_attn.q_norm``/``k_norm``, no q/k/v biases, an explicit ``head_dim``), unshifted,
  block-causal with ``block_size`` (4 when absent). ``mask_token_id`` (151669, ``<|MASK|>``)
  is in some published configs and only in the tokenizer files of others.

Mask ids come from each drafter's own files (config.json, else its tokenizer files), never
from a family default: one id means different tokens in different families (151665 is
Dream's ``<|beginoftext|>`` and Fast-dLLM v2's mask).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import TransformerDrafter
from .model import BidirectionalTransformer, TransformerSpec

# model_type values of common causal LMs: given as a drafter they get a pointed error.
_CAUSAL_HINT = re.compile(r"ForCausalLM$|LMHeadModel$")


@dataclass(frozen=True)
class Family:
    """A supported drafter family: how config.json marks it, and how its outputs are read."""

    title: str         # for messages
    model_type: str    # config.json "model_type" (compared case-insensitively)
    architecture: str  # a substring of an "architectures" entry that marks it
    shifted: bool      # the output at j scores the token at j + 1 (read mask j at j - 1)
    mask_note: str     # the published mask token, quoted in errors only (never used as a default)


FAMILIES = {
    "dream": Family("Dream / DiffuCoder", "Dream", "DreamModel", True, "Dream-v0 and DiffuCoder: <|mask|> = 151666"),
    "llada": Family("LLaDA", "llada", "LLaDA", False, "LLaDA-8B: 126336"),
    "fast_dllm_v2": Family("Fast-dLLM v2", "Fast_dLLM_Qwen", "Fast_dLLM_QwenForCausalLM", True,
                           "Fast-dLLM v2: |<MASK>| = 151665"),
    "sdar": Family("SDAR", "sdar", "SDARForCausalLM", False, "SDAR: <|MASK|> = 151669"),
}

# Mask token strings of the families' tokenizers: Dream/DiffuCoder, Fast-dLLM v2, SDAR's
# tokenizer_config.json and SDAR's added_tokens.json (the published SDAR files disagree).
MASK_STRINGS = ("<|mask|>", "|<MASK>|", "<|MASK|>", "<MASK>")


def _supported_families() -> str:
    """The families for error messages: title and model_type of each."""
    return ", ".join(f"{f.title} (model_type {f.model_type!r})" for f in FAMILIES.values())


def _spec_from_qwen(cfg: dict, **family) -> TransformerSpec:
    """The Qwen2/Qwen3 config keys (Dream, DiffuCoder, Fast-dLLM v2, SDAR); ``family`` adds
    what the family fixes (biases, q/k norms, attention rule)."""
    return TransformerSpec(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0),
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        head_dim=cfg.get("head_dim"),
        **family,
    )


def _spec_from_llada(cfg: dict) -> TransformerSpec:
    return TransformerSpec(
        vocab_size=cfg.get("embedding_size") or cfg["vocab_size"],
        hidden_size=cfg["d_model"],
        intermediate_size=cfg["mlp_hidden_size"],
        num_layers=cfg["n_layers"],
        num_heads=cfg["n_heads"],
        num_kv_heads=cfg.get("n_kv_heads") or cfg["n_heads"],
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
        rope_theta=cfg.get("rope_theta", 10000.0),
        qkv_bias=bool(cfg.get("include_qkv_bias", cfg.get("include_bias", False))),
        tie_embeddings=bool(cfg.get("weight_tying", False)),
        max_position_embeddings=cfg.get("max_sequence_length", 4096),
    )


def _spec_from_config(cfg: dict, fmt: str) -> TransformerSpec:
    """The native transformer's shape and attention rule for a config of family ``fmt``."""
    if fmt == "dream":
        return _spec_from_qwen(cfg, qkv_bias=True,
                               prefix_causal=cfg.get("prefix_attention", "bidirectional") == "causal")
    if fmt == "fast_dllm_v2":
        # Its modeling code reads config.layer_types[i]; a sliding-window layer would need a rule we lack.
        other = sorted({t for t in cfg.get("layer_types") or [] if t != "full_attention"})
        if other:
            raise ValueError(f"Fast-dLLM v2 config has layer_types {other}; only 'full_attention' layers are supported")
        # bd_size is in the published config; 32 is the block size its generate() defaults to.
        return _spec_from_qwen(cfg, qkv_bias=True, block_size=cfg.get("bd_size", 32))
    if fmt == "sdar":
        # block_size is missing from some published SDAR configs; SDAR-*-Chat use 4 (its generate.py default).
        return _spec_from_qwen(cfg, qkv_bias=bool(cfg.get("attention_bias", False)), qk_norm=True,
                               block_size=cfg.get("block_size", 4))
    return _spec_from_llada(cfg)


# LLaDA name → native (Qwen2-layout) name.
_LLADA_BLOCK = {
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj", "ff_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj", "attn_norm": "input_layernorm", "ff_norm": "post_attention_layernorm",
}
_LLADA_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
              "model.transformer.ln_f.weight": "model.norm.weight",
              "model.transformer.ff_out.weight": "lm_head.weight"}


def _rename_llada(name: str) -> str:
    if name in _LLADA_TOP:
        return _LLADA_TOP[name]
    m = re.fullmatch(r"model\.transformer\.blocks\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LLADA_BLOCK:
        return f"model.layers.{m.group(1)}.{_LLADA_BLOCK[m.group(2)]}.{m.group(3)}"
    raise ValueError(f"unexpected weight {name!r} in a LLaDA-format checkpoint")


def _read_json(file: Path) -> dict:
    return json.loads(file.read_text()) if file.is_file() else {}


def _token_text(entry) -> str | None:
    """A tokenizer file's token entry, a string or ``{"content": ...}``, as its string."""
    return entry.get("content") if isinstance(entry, dict) else entry


def _mask_token_id(cfg: dict, path: Path, fmt: str) -> int:
    """The drafter's mask id: config.json ``mask_token_id``; else from the folder's tokenizer
    files, the token the tokenizer declares as ``mask_token`` (tokenizer_config.json,
    special_tokens_map.json) or else one of :data:`MASK_STRINGS`, with its id from
    added_tokens.json or tokenizer_config.json's ``added_tokens_decoder``."""
    if cfg.get("mask_token_id") is not None:
        return int(cfg["mask_token_id"])
    tok_cfg = _read_json(path / "tokenizer_config.json")
    ids = {_token_text(e): int(i) for i, e in (tok_cfg.get("added_tokens_decoder") or {}).items()}
    ids.update(_read_json(path / "added_tokens.json"))
    declared = [_token_text(tok_cfg.get("mask_token")),
                _token_text(_read_json(path / "special_tokens_map.json").get("mask_token"))]
    for name in (*declared, *MASK_STRINGS):
        if name is not None and name in ids:
            return int(ids[name])
    raise ValueError(f"drafter {str(path)!r} ({FAMILIES[fmt].title}) names no mask token: config.json has no "
                     "mask_token_id, and neither added_tokens.json, tokenizer_config.json (mask_token, "
                     f"added_tokens_decoder) nor special_tokens_map.json gives an id for one of {list(MASK_STRINGS)}. "
                     f"Add \"mask_token_id\": <id> to {str(path / 'config.json')!r} "
                     f"(published {FAMILIES[fmt].mask_note}).")


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"drafter path {str(path)!r} is not a directory (or does not exist); pass a local folder "
                         "holding config.json and *.safetensors of a diffusion LM")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"drafter folder {str(path)!r} has no config.json; a diffusion-LM checkpoint folder needs "
                         "config.json and *.safetensors")
    return json.loads(cfg_file.read_text())


def detect_format(cfg: dict, where: str = "drafter") -> str:
    """The family's key in :data:`FAMILIES`; a clear error for causal LMs and anything else.
    Families are matched before the causal-LM check: Fast-dLLM v2's and SDAR's architectures
    end in ``ForCausalLM`` too."""
    model_type = str(cfg.get("model_type", "")).lower()
    archs = cfg.get("architectures") or []
    for name, family in FAMILIES.items():
        if model_type == family.model_type.lower() or any(family.architecture in a for a in archs):
            return name
    if any(_CAUSAL_HINT.search(a) for a in archs) or model_type in {"qwen2", "llama", "mistral", "gpt2", "qwen3"}:
        raise TypeError(f"{where} config has model_type={cfg.get('model_type')!r}, architectures={archs}: that is a "
                        "causal (autoregressive) LM; pass it as the target. The drafter must be a diffusion LM of a "
                        f"supported family: {_supported_families()}.")
    raise ValueError(f"{where} config has model_type={cfg.get('model_type')!r}, architectures={archs}; supported "
                     f"drafter families: {_supported_families()}")


def inspect_drafter_folder(path: str | Path) -> tuple[dict, str, list[Path]]:
    """Check a drafter folder without loading weights: (config, format, weight files).
    Clear errors for a missing folder, config or weights, and for a causal LM."""
    path = Path(path).expanduser()
    cfg = _read_config(path)
    fmt = detect_format(cfg, where=f"drafter {str(path)!r}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"drafter folder {str(path)!r} has config.json but no *.safetensors weights")
    return cfg, fmt, files


def load_drafter(path: str | Path, *, dtype: torch.dtype | None = None,
                 device: str | torch.device = "cpu") -> TransformerDrafter:
    """Load a drafter folder of any family in :data:`FAMILIES` into a :class:`TransformerDrafter`."""
    path = Path(path)
    cfg, fmt, files = inspect_drafter_folder(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(_read_weights(f))
    if fmt == "llada":
        state = {_rename_llada(name): t for name, t in state.items()}
    spec = _spec_from_config(cfg, fmt)
    mask_id = _mask_token_id(cfg, path, fmt)
    net = BidirectionalTransformer(spec)
    if spec.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
    _check_shapes(net, state, path)
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (spec.tie_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"drafter weights in {str(path)!r} do not match its config.json ({fmt} format): "
                         f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    pad = cfg.get("pad_token_id")
    if pad is None:
        pad = cfg.get("eos_token_id", mask_id)
    if isinstance(pad, list):
        pad = pad[0]
    dtype = dtype or _config_dtype(cfg)
    drafter = TransformerDrafter(net, mask_token_id=mask_id, pad_token_id=pad, shifted=FAMILIES[fmt].shifted,
                                 format=fmt, config=cfg)
    return drafter.to(device=device, dtype=dtype).eval()


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (never a pickle), floating point only; a truncated or
    corrupt file fails naming it."""
    try:
        state = load_file(str(file))
    except Exception as exc:  # safetensors reports a bad header or short file as SafetensorError
        raise ValueError(f"drafter weights {str(file)!r} cannot be read ({type(exc).__name__}: {exc}); the file is "
                         "truncated or not safetensors. Download or convert it again.") from None
    for name, t in state.items():
        if not t.is_floating_point():
            raise ValueError(f"drafter weights {str(file)!r}: tensor {name!r} has dtype {t.dtype}; weights must be "
                             "floating point")
    return state


def _check_shapes(net: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor present must have the shape its config implies; the error names it."""
    own = net.state_dict()
    for name, t in state.items():
        if name in own and tuple(own[name].shape) != tuple(t.shape):
            raise ValueError(f"drafter weights in {str(path)!r}: tensor {name!r} has shape {tuple(t.shape)}, but its "
                             f"config.json implies {tuple(own[name].shape)}; the weights and config.json do not belong "
                             "together")


def _config_dtype(cfg: dict) -> torch.dtype:
    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    dtype = getattr(torch, str(name), torch.float32)
    # bf16/fp16 matmuls are slow or unsupported on many CPUs: compute in float32 there.
    return dtype if torch.cuda.is_available() else torch.float32


def dream_config(spec: TransformerSpec, *, mask_token_id: int, eos_token_id: int, pad_token_id: int,
                 bos_token_id: int | None = None, dtype: str = "float32") -> dict:
    """config.json content of a Dream-format checkpoint for ``spec``."""
    return {
        "architectures": ["DreamModel"], "model_type": "Dream",
        "vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size, "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads, "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": spec.rms_norm_eps, "rope_theta": spec.rope_theta, "hidden_act": "silu",
        "tie_word_embeddings": spec.tie_embeddings, "max_position_embeddings": spec.max_position_embeddings,
        "mask_token_id": mask_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id,
        "bos_token_id": bos_token_id, "torch_dtype": dtype,
        # diffuspec extension (other Dream loaders ignore it): prefix tokens attend causally.
        "prefix_attention": "causal" if spec.prefix_causal else "bidirectional",
    }


def save_dream(drafter: TransformerDrafter, path: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write a Dream-format folder (config.json + model.safetensors)."""
    spec = drafter.net.spec
    if spec.qk_norm or spec.block_size is not None or spec.head_dim * spec.num_heads != spec.hidden_size:
        raise ValueError(f"save_dream: a {drafter.format} drafter (q/k norms, block-causal attention or an explicit "
                         "head_dim) has no Dream-format equivalent; keep its original folder")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {name: t.detach().to(dtype or t.dtype).contiguous().cpu() for name, t in drafter.net.state_dict().items()}
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = dream_config(spec, mask_token_id=drafter.mask_token_id, pad_token_id=drafter.pad_token_id,
                       eos_token_id=drafter.config.get("eos_token_id", drafter.pad_token_id),
                       bos_token_id=drafter.config.get("bos_token_id"),
                       dtype=str(dtype or next(drafter.parameters()).dtype).replace("torch.", ""))
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
