"""Public API: wrap a transformers causal LM (the target) with a diffusion drafter.

    from diffuspec import DiffuSpec
    ds = DiffuSpec.from_pretrained(target="path/to/qwen2", drafter="path/to/dream")
    [result] = ds.generate("def fibonacci(n):", max_new_tokens=128)
    print(result.text, result.stats.tau)

Every input is checked here, at the boundary; errors name the bad value and the fix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, Union

import torch

from . import loading
from .config import DiffuSpecConfig, SamplingParams
from .detokenize import TextStream
from .drafters import DiffusionDrafter, load_drafter
from .engine import SpeculativeEngine
from .stats import GenerationStats


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]     # generated ids (EOS included when generation ended on it)
    finish_reason: str       # "eos", "length" or "stop"
    stats: GenerationStats


@dataclass
class StreamDelta:
    """What one round added to a streamed request."""

    token_ids: list[int]       # new ids (several per round is the point of speculation)
    text: str                  # new text: whole characters, nothing a stop string could still cut
    finish_reason: str | None  # set on the request's last delta: "eos", "length" or "stop"
    stats: GenerationStats | None  # the request's statistics, on its last delta


PromptInput = Union[str, Sequence[str], Sequence[int], Sequence[Sequence[int]], torch.Tensor, Sequence[dict],
                    Sequence[Sequence[dict]]]


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
        placement: str = "local",
        ray_address: str | None = None,
        drafter_resources: dict | None = None,
        pipelined: bool = False,
        max_restarts: int = 3,
        _drafter_path: str | Path | None = None,
        **config_kwargs: Any,
    ) -> None:
        """``placement="ray"`` runs the drafter side in a Ray actor (diffuspec.remote):
        ``ray_address`` (None: a local Ray), ``drafter_resources`` (Ray actor options; default
        one GPU on CUDA, one CPU otherwise), ``pipelined`` (pre-draft the next round while the
        target verifies), ``max_restarts`` (times Ray restarts a dead actor). The target stays
        in this process."""
        if isinstance(config, dict):
            config = DiffuSpecConfig.from_kwargs(**config)
        config = (config or DiffuSpecConfig()).replace(**config_kwargs) if config_kwargs else (config or DiffuSpecConfig())
        if not isinstance(config, DiffuSpecConfig):
            raise TypeError(f"config must be a DiffuSpecConfig or a dict, got {type(config).__name__}")
        if not (isinstance(target_model, torch.nn.Module) and hasattr(target_model, "config")):
            raise TypeError(f"target_model must be a loaded transformers causal LM, got {type(target_model).__name__}")
        loading.check_drafter_object(drafter_model)
        if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
            raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
        if drafter_tokenizer is not None:
            loading.check_shared_tokenizer(tokenizer, drafter_tokenizer)
        from .remote import check_placement
        check_placement(placement, drafter_resources)
        remote = placement == "ray" and (drafter_model is not None or _drafter_path is not None)
        if remote:
            from .remote import remote_config
            config = remote_config(config)
        self.drafter_int8 = False  # whether the drafter's linear layers run in int8
        if drafter_model is not None and not remote:
            self.drafter_int8 = loading.prepare_drafter(drafter_model, config, tokenizer).int8
        self.target = target_model.eval()
        self.drafter = drafter_model
        self.tokenizer = tokenizer
        self.config = config
        emit_vocab = loading.emit_vocab(target_model.get_output_embeddings().weight.shape[0], tokenizer)
        self.eos_token_id = loading.resolve_eos(tokenizer, getattr(target_model, "generation_config", None))
        self.max_context = loading.target_context(target_model.config)
        self.remote = None  # the RemoteProposer with placement="ray"
        if remote:
            from . import remote as ray_placement
            spec = {"config": dataclasses.asdict(config), "eos_token_id": self.eos_token_id, "emit_vocab": emit_vocab,
                    "device": "cuda" if self.device.type == "cuda" else "cpu",
                    "dtype": str(next(target_model.parameters()).dtype).removeprefix("torch."),
                    "drafter_path": str(_drafter_path) if _drafter_path is not None else None,
                    "drafter_module": drafter_model.cpu() if drafter_model is not None else None}
            actor = ray_placement.start_drafter_actor(spec, ray_address, drafter_resources, max_restarts)
            self.remote = ray_placement.RemoteProposer(actor, config, emit_vocab, pipelined, self.device)
            self.drafter = None
        proxy_table = loading.load_proxy_table(config, self.device) if not remote else None
        self.engine = SpeculativeEngine(self.target, self.drafter, config, self.eos_token_id, emit_vocab, proxy_table,
                                        proposer=self.remote)
        self._engines: dict[bool, SpeculativeEngine] = {config.speculate: self.engine}

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
        placement: str = "local",
        ray_address: str | None = None,
        drafter_resources: dict | None = None,
        pipelined: bool = False,
        max_restarts: int = 3,
        **config: Any,
    ) -> "DiffuSpec":
        """Load a target (transformers causal LM folder or id) and a drafter (Dream/LLaDA
        folder) that share a tokenizer. With neither, the embedded default pair (and its
        corpus proxy table). ``drafter=None`` with a target gives plain AR decoding.
        ``placement="ray"`` and its options: see ``__init__`` (the drafter is then loaded by the
        actor, from the folder). Other keyword arguments are configuration keys (see
        DiffuSpecConfig)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        cfg = DiffuSpecConfig.from_kwargs(**config)  # reject unknown keys before loading anything
        if target is None:
            if drafter is not None:
                raise ValueError("a drafter was given without a target; pass target= too (or neither, for the "
                                 "embedded default pair)")
            target, drafter, table = loading.embedded_pair()
            cfg = loading.with_default_table(cfg, table, config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        target = loading.resolve_checkpoint(target, "target")
        tokenizer = AutoTokenizer.from_pretrained(str(target))
        # safetensors only (no unpickling), and never code from the checkpoint (trust_remote_code stays off)
        target_model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype, use_safetensors=True,
                                                            trust_remote_code=False).to(device)
        drafter_model = drafter_tok = None
        if drafter is not None:
            drafter = loading.resolve_drafter_folder(drafter)
            if placement != "ray":
                drafter_model = load_drafter(drafter, dtype=dtype, device=device)
            drafter_tok = loading.drafter_tokenizer(drafter)
        return cls(target_model, drafter_model, tokenizer, cfg, drafter_tokenizer=drafter_tok, placement=placement,
                   ray_address=ray_address, drafter_resources=drafter_resources, pipelined=pipelined,
                   max_restarts=max_restarts, _drafter_path=drafter if placement == "ray" else None)

    # --------------------------------------------------------------- generation
    def generate(
        self,
        prompts: PromptInput,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        speculate: bool | None = None,
        chat: bool = False,
    ) -> list[GenerationResult]:
        """Generate for one prompt or a batch; returns one result per prompt, in order.

        ``prompts``: a string, a list of strings, a list of token ids (one prompt), a list
        of token-id lists, or a 1-D/2-D tensor of ids; with ``chat=True`` each string is a
        user message (or pass conversations, lists of ``{"role", "content"}`` dicts) and the
        target tokenizer's chat template is applied. ``temperature=0`` is greedy.
        ``speculate=False`` decodes with the target alone through the same engine."""
        ids, params, engine = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                            speculate, chat)
        return [self._result(o) for o in engine.generate(ids, params, decode=self._decode)]

    def stream(self, prompt: str | Sequence[int] | Sequence[dict], **kwargs: Any) -> Iterator[StreamDelta]:
        """Generate for one prompt, yielding what each round adds as it finishes.

        A round verifies a whole draft at once, so a delta usually carries several tokens:
        ``delta.token_ids`` the new ids, ``delta.text`` the new text. Text is held back
        while it ends in an incomplete character (bytes of one character split over
        tokens) or could still grow into a stop string, so it never shows what a stop string
        will cut. The last delta has ``finish_reason`` ("eos", "length", "stop") and the
        request's ``stats``. The deltas' text joined is exactly ``generate()``'s text, and
        their ids its token ids. Keyword arguments are ``generate()``'s."""
        if isinstance(prompt, (list, tuple)) and prompt and not all(isinstance(t, int) for t in prompt) and \
                not all(isinstance(m, dict) for m in prompt):
            raise TypeError("stream() takes one prompt (a string, a list of token ids, or with chat=True one "
                            "conversation); for several prompts use stream_batch(prompts)")
        if kwargs.get("chat") and isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], dict):
            prompt = [prompt]  # one conversation
        for _, delta in self.stream_batch(prompt, **kwargs):
            yield delta

    def stream_batch(self, prompts: PromptInput, max_new_tokens: int = 128, temperature: float = 0.0,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     stop: str | Sequence[str] | None = None, speculate: bool | None = None,
                     chat: bool = False) -> Iterator[tuple[int, StreamDelta]]:
        """:meth:`stream` for a batch: yields ``(prompt index, delta)`` as rounds finish."""
        ids, params, engine = self._prepare(prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                                            speculate, chat)
        texts = [TextStream(self._decode, params.stop) for _ in ids]
        sent = [0] * len(ids)  # token ids already yielded per prompt
        for outputs, grew in engine.rounds(ids, params, decode=self._decode):
            for i in grew:
                o = outputs[i]
                new_ids = o.token_ids[sent[i]:]
                sent[i] = len(o.token_ids)
                if o.finish_reason is None:
                    text = texts[i].update(o.token_ids)
                    if new_ids or text:
                        yield i, StreamDelta(new_ids, text, None, None)
                else:
                    yield i, StreamDelta(new_ids, texts[i].finish(self._result(o).text), o.finish_reason, o.stats)

    def chat(self, messages: Sequence[dict] | Sequence[Sequence[dict]], **kwargs: Any
             ) -> GenerationResult | list[GenerationResult]:
        """Answer a conversation (a list of ``{"role": ..., "content": ...}`` dicts) with the
        target tokenizer's chat template, generation prompt added; a list of conversations
        gives a list of results. Keyword arguments are ``generate()``'s."""
        single = isinstance(messages, (list, tuple)) and bool(messages) and isinstance(messages[0], dict)
        results = self.generate([messages] if single else messages, chat=True, **kwargs)
        return results[0] if single else results

    def _prepare(self, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, speculate, chat):
        """Check every argument (errors name the value and the fix), encode the prompts, and
        pick the engine: ``(token ids per prompt, SamplingParams, engine)``."""
        if isinstance(stop, str):
            stop = (stop,)
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                top_p=top_p, seed=seed, stop=tuple(stop or ()))
        ids = self._chat_ids(prompts) if chat else self._encode(prompts)
        for i, p in enumerate(ids):
            if self.max_context is not None and len(p) + max_new_tokens > self.max_context:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                 f"the target's context of {self.max_context} tokens. Shorten the prompt or lower "
                                 "max_new_tokens.")
        return ids, params, self._engine(self.config.speculate if speculate is None else bool(speculate))

    def _engine(self, speculate: bool) -> SpeculativeEngine:
        """The engine drafting or not (each kept, with what its draft-length policy learnt)."""
        if speculate not in self._engines:
            base = self.engine
            self._engines[speculate] = SpeculativeEngine(self.target, self.drafter,
                                                         self.config.replace(speculate=speculate), self.eos_token_id,
                                                         base.emit_vocab, base.proxy_table, proposer=self.remote)
        return self._engines[speculate]

    def _result(self, o) -> GenerationResult:
        text = self._decode(o.token_ids)
        if o.stop_text_end is not None:
            text = text[: o.stop_text_end]
        return GenerationResult(text=text, token_ids=o.token_ids, finish_reason=o.finish_reason, stats=o.stats)

    def _chat_ids(self, prompts) -> list[list[int]]:
        """Token ids of each conversation with the chat template applied (a string prompt is
        one user message)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat=True, but the target's tokenizer has no chat template. Give it one "
                             "(tokenizer.chat_template = '<a Jinja template>', or a chat_template entry in its "
                             "tokenizer_config.json), or pass plain prompts without chat=True.")
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict)):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise TypeError(f"with chat=True, prompts must be a string, a conversation (list of "
                            f"{{'role', 'content'}} dicts) or a list of them, got {type(prompts).__name__}")
        ids = []
        for i, conv in enumerate(prompts):
            if isinstance(conv, str):
                conv = [{"role": "user", "content": conv}]
            if not (isinstance(conv, (list, tuple)) and conv and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                                        and isinstance(m.get("content"), str)
                                                                        for m in conv)):
                raise TypeError(f"conversation {i} must be a non-empty list of {{'role': str, 'content': str}} dicts, "
                                f"got {conv!r:.200}")
            encoded = self.tokenizer.apply_chat_template(list(conv), add_generation_prompt=True, tokenize=True)
            ids.append(list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded))
        return ids

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

