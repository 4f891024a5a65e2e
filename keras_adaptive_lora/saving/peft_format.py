"""The PEFT LoRA adapter folder: its files, key names and config, read and
checked without a model (`read_peft_adapter`); the model side is `peft.py`.

A PEFT LoRA adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors` whose tensors are keyed by the transformers module
path, `base_model.model.<module>.lora_A.weight` `(r, in)` and
`...lora_B.weight` `(out, r)`: `ΔW = s · lora_B lora_A` on the module's
weight `W (out, in)`, `s = alpha / r` (`alpha / sqrt(r)` with `use_rslora`),
`r` and `alpha` per module from `rank_pattern`/`alpha_pattern` when they match.
"""

import json
import os
import re

from keras_adaptive_lora.saving._safetensors import read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
_KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
#: Config entries that change what a LoRA adapter computes beyond `s · B A`
#: on a weight: `(key, what it means)`; a file setting any is refused.
_UNSUPPORTED = (
    ("use_dora", "DoRA (a learned magnitude per output, not a low-rank update)"),
    ("lora_bias", "trained LoRA biases"),
    ("fan_in_fan_out", "transposed (Conv1D) base weights"),
    ("modules_to_save", "fully trained modules besides the LoRA factors"),
    ("layer_replication", "replicated layers"),
    ("target_parameters", "LoRA on parameters instead of modules"),
    ("trainable_token_indices", "trained token embeddings"),
    ("alora_invocation_tokens", "activated LoRA (aLoRA)"),
    ("use_qalora", "QA-LoRA"),
)


def peft_config(*, rank, pattern, target_modules, task_type, base_model_name_or_path):
    """The `adapter_config.json` of a written adapter: global `r` and
    `lora_alpha = r` (scale 1), `rank_pattern` = `alpha_pattern` = `pattern`
    (`{module: rank}` of the layers of another rank; scale 1 too)."""
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": rank,
        "rank_pattern": dict(pattern),
        "alpha_pattern": dict(pattern),
        "target_modules": list(target_modules),
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "revision": None,
    }


def _pattern_value(patterns, module, default):
    """PEFT's `get_pattern_key`: the first pattern `p` (in file order) with
    `re.match(rf"(.*\\.)?({p})$", module)`; its value, else `default`."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def read_peft_adapter(directory):
    """`(config, {module: (lora_A (r, in), lora_B (out, r), rank, alpha)})`
    of a PEFT LoRA adapter folder, checked (no model involved): each
    module's rank and `lora_alpha` after `rank_pattern`/`alpha_pattern`.

    Raises a `ValueError` that says what is wrong for a folder that is not a
    PEFT adapter, another PEFT type, DoRA or another LoRA variant this
    library cannot represent, a pickle-only (`adapter_model.bin`) file, or
    tensors that do not form `lora_A`/`lora_B` pairs of the configured ranks.
    """
    directory = os.fspath(directory)
    config_path, weights_path = (os.path.join(directory, f) for f in (CONFIG_FILE, WEIGHTS_FILE))
    if not os.path.isfile(config_path):
        raise ValueError(
            f"{directory!r} is not a PEFT adapter folder: it has no {CONFIG_FILE} "
            "(written by PEFT's `save_pretrained` or `save_peft_adapters`)."
        )
    with open(config_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{config_path!r} is not valid JSON ({error}).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path!r} does not hold a JSON object.")
    kind = config.get("peft_type")
    if kind != "LORA":
        raise ValueError(
            f"{directory!r} holds a PEFT {kind} adapter; only LoRA adapters "
            "(peft_type LORA) can be loaded as this library's LoRA adapters. Merge "
            "it with PEFT (`merge_and_unload`) and load the merged model instead."
        )
    for key, what in _UNSUPPORTED:
        if config.get(key):
            raise ValueError(
                f"{directory!r}: the adapter uses {what} ({key}={config[key]!r}), which "
                "this library's LoRA adapters cannot represent. Merge it with PEFT "
                "(`merge_and_unload`) and load the merged model instead."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"{directory!r}: the adapter trained biases (bias={config['bias']!r}), "
            "which this library's LoRA adapters cannot represent. Merge it with PEFT "
            "(`merge_and_unload`) and load the merged model instead."
        )
    if not os.path.isfile(weights_path):
        found = ", ".join(sorted(os.listdir(directory)))
        raise ValueError(
            f"{directory!r} has no {WEIGHTS_FILE} (it holds: {found}); only "
            "safetensors adapters are read (a pickled adapter_model.bin is not). "
            "Save it again with PEFT's `save_pretrained(..., safe_serialization=True)`."
        )
    tensors, _ = read_safetensors(weights_path)
    pairs, other = {}, []
    for key, value in tensors.items():
        match = _KEY.match(key)
        if match is None:
            other.append(key)
        else:
            pairs.setdefault(match.group(1), {})[match.group(2)] = value
    if other:
        raise ValueError(
            f"{weights_path!r} holds tensors that are not LoRA factors of a module "
            f"(e.g. {', '.join(sorted(other)[:3])}); this library's LoRA adapters "
            "cannot represent them. Nothing was changed."
        )
    if not pairs:
        raise ValueError(f"{weights_path!r} holds no LoRA factors.")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    factors = {}
    for module, pair in sorted(pairs.items()):
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            shapes = {f"lora_{k}": tuple(v.shape) for k, v in sorted(pair.items())}
            raise ValueError(
                f"{weights_path!r}: module '{module}' needs lora_A (r, in) and "
                f"lora_B (out, r) with the same r; it has {shapes}."
            )
        rank = _pattern_value(config.get("rank_pattern"), module, r)
        if a.shape[0] != rank:
            raise ValueError(
                f"{weights_path!r}: module '{module}' has rank {a.shape[0]} but "
                f"adapter_config.json gives it r={rank} (r, rank_pattern); the folder "
                "is inconsistent."
            )
        module_alpha = float(_pattern_value(config.get("alpha_pattern"), module, alpha))
        factors[module] = (a, b, int(rank), module_alpha)
    return config, factors
