"""Checkpoint formats: Dream and LLaDA folders (config.json + safetensors), no remote code.

- **Dream** (``"model_type": "Dream"``): Qwen2 weight names, q/k/v biases, shifted prediction,
  ``mask_token_id`` in the config (151666 for Dream-v0-7B).
- **LLaDA** (``"model_type": "llada"``): OLMo-style names under ``model.transformer``
  (``wte``, ``blocks.N.q_proj``, ``attn_out``, ``ff_proj``/``up_proj``/``ff_out``,
  ``attn_norm``/``ff_norm``, ``ln_f``), unshifted, mask id from the config (126336).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .base import TransformerDrafter
from .model import BidirectionalTransformer, TransformerSpec

# model_type values of common causal LMs: given as a drafter they get a pointed error.
_CAUSAL_HINT = re.compile(r"ForCausalLM$|LMHeadModel$")


def _spec_from_dream(cfg: dict) -> TransformerSpec:
    return TransformerSpec(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads", cfg["num_attention_heads"]),
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=cfg.get("rope_theta", 10000.0),
        qkv_bias=True,
        tie_embeddings=cfg.get("tie_word_embeddings", False),
        max_position_embeddings=cfg.get("max_position_embeddings", 32768),
        prefix_causal=cfg.get("prefix_attention", "bidirectional") == "causal",
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


def _read_config(path: Path) -> dict:
    if not path.is_dir():
        raise ValueError(f"drafter path {str(path)!r} is not a directory (or does not exist); pass a local folder "
                         "holding config.json and *.safetensors (Dream or LLaDA format)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"drafter folder {str(path)!r} has no config.json; a Dream/LLaDA checkpoint folder needs "
                         "config.json and *.safetensors")
    return json.loads(cfg_file.read_text())


def detect_format(cfg: dict, where: str = "drafter") -> str:
    """'dream' or 'llada'; a clear error for causal LMs and anything else."""
    model_type = str(cfg.get("model_type", "")).lower()
    archs = cfg.get("architectures") or []
    if model_type == "dream" or "DreamModel" in archs:
        return "dream"
    if model_type == "llada" or any("LLaDA" in a for a in archs):
        return "llada"
    if any(_CAUSAL_HINT.search(a) for a in archs) or model_type in {"qwen2", "llama", "mistral", "gpt2", "qwen3"}:
        raise TypeError(f"{where} config has model_type={cfg.get('model_type')!r}, architectures={archs}: that is a "
                        "causal (autoregressive) LM. The drafter must be a diffusion LM in Dream format "
                        "(model_type 'Dream') or LLaDA format (model_type 'llada'); pass the AR model as the target.")
    raise ValueError(f"{where} config has model_type={cfg.get('model_type')!r}; supported drafter formats are "
                     "Dream ('Dream') and LLaDA ('llada')")


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
    """Load a Dream- or LLaDA-format folder into a :class:`TransformerDrafter`."""
    path = Path(path)
    cfg, fmt, files = inspect_drafter_folder(path)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    if fmt == "dream":
        spec = _spec_from_dream(cfg)
        mask_id = cfg.get("mask_token_id")
        shifted = True
    else:
        spec = _spec_from_llada(cfg)
        state = {_rename_llada(name): t for name, t in state.items()}
        mask_id = cfg.get("mask_token_id")
        shifted = False
    if mask_id is None:
        raise ValueError(f"drafter config in {str(path)!r} has no mask_token_id; add it to config.json "
                         "(Dream-v0: 151666, LLaDA: 126336)")
    net = BidirectionalTransformer(spec)
    if spec.tie_embeddings:
        state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))
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
    drafter = TransformerDrafter(net, mask_token_id=mask_id, pad_token_id=pad, shifted=shifted, format=fmt, config=cfg)
    return drafter.to(device=device, dtype=dtype).eval()


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
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    spec = drafter.net.spec
    state = {name: t.detach().to(dtype or t.dtype).contiguous().cpu() for name, t in drafter.net.state_dict().items()}
    if spec.tie_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    cfg = dream_config(spec, mask_token_id=drafter.mask_token_id, pad_token_id=drafter.pad_token_id,
                       eos_token_id=drafter.config.get("eos_token_id", drafter.pad_token_id),
                       bos_token_id=drafter.config.get("bos_token_id"),
                       dtype=str(dtype or next(drafter.parameters()).dtype).replace("torch.", ""))
    (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
