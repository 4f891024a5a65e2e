"""PEFT LoRA adapters out and in: `save_peft_adapters` and `load_peft_adapters`.

A PEFT LoRA adapter is a folder with `adapter_config.json` and
`adapter_model.safetensors`, keyed by the transformers module path:
`base_model.model.<module>.lora_A.weight` `(r, in)` and `...lora_B.weight`
`(out, r)`, with `ΔW = scale · lora_B lora_A` on the transformers weight
`W (out, in)`. keras-hub loads `W` so that a layer's `(d_in, d_out)` matrix
view is `Wᵀ`, hence an update `a b` of the matrix view (`a (d_in, k)`,
`b (k, d_out)`) is `lora_A = aᵀ`, `lora_B = bᵀ`. The keras-hub layer ->
module table is `targets.HF_MODULES` (Llama, Gemma, ViT).

Writing (vLLM-compatible): vLLM, TGI and SGLang apply one global
`lora_alpha / r` and ignore `rank_pattern`/`alpha_pattern`. Each layer's
factors come from its method's `low_rank_factors()` with the scaling already
folded into `b`, so the file has `r` = the largest rank and `lora_alpha = r`
(global scale 1), and, for layers of another rank `k`, `rank_pattern[module]
= k` with `alpha_pattern[module] = k` (scale 1 in PEFT too). Per-layer ranks
(SR-LoRA) and FlexLoRA's active components are exact.

Reading: any PEFT LoRA adapter (per-layer ranks, `use_rslora`,
`rank_pattern`/`alpha_pattern`) becomes this library's `LoRAAdapter`s with the
file's ranks and scalings; everything is checked before the model changes.
"""

import json
import os

import numpy as np
from keras import ops

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.kernel_view import PROJECTION_TYPES, kernel_view
from keras_adaptive_lora.core.tree import find_adapters, layer_path, walk
from keras_adaptive_lora.methods.lora import LoRA, LoRAAdapter
from keras_adaptive_lora.reports import build_report
from keras_adaptive_lora.saving._atomic import replacing_folder
from keras_adaptive_lora.saving._safetensors import write_safetensors
from keras_adaptive_lora.saving.peft_format import (
    CONFIG_FILE,
    KEY_PREFIX,
    WEIGHTS_FILE,
    peft_config,
    read_peft_adapter,
)
from keras_adaptive_lora.surgery import install_adapters, method_spec
from keras_adaptive_lora.targets import HF_MODULES, detect_architecture, hf_modules
from keras_adaptive_lora.version import __version__

def _architecture(model, action):
    arch = detect_architecture(model)
    if arch not in HF_MODULES:
        raise ValueError(
            f"{action} maps keras-hub layers to Hugging Face transformers modules, "
            f"known for {', '.join(sorted(HF_MODULES))} (keras-hub Llama 2/3, Gemma "
            f"1/2/3 and ViT backbones and their task models); {type(model).__name__} "
            "is none of them. Merge the adapters into the model instead "
            "(`merge_adapters`) and save it, or keep this library's adapter files "
            "(`save_adapters`)."
        )
    return arch


def _projection_sites(model, arch):
    """`[(parent, layer, module names without prefix)]` of every projection
    (or adapter) of `model` the table maps."""
    sites = []
    for parent, layer in walk(model):
        if isinstance(layer, PROJECTION_TYPES + (AdapterLayer,)):
            names = hf_modules(arch, layer_path(layer))
            if names:
                sites.append((parent, layer, names))
    return sites


# --------------------------------------------------------------------------
# Out
# --------------------------------------------------------------------------
def save_peft_adapters(model, directory, *, svd_rank=None, base_model_name_or_path=None,
                       module_prefix=None):
    """Write the adapters of `model` as a PEFT LoRA adapter folder.

    `directory` gets `adapter_config.json` and `adapter_model.safetensors`
    (float32) that `peft.PeftModel.from_pretrained` loads onto the matching
    transformers model (`LlamaForCausalLM`, `GemmaForCausalLM`,
    `Gemma3ForCausalLM`, `ViTForImageClassification`, e.g. the folder the
    keras-hub model was loaded from) and that vLLM serves (`--enable-lora
    --lora-modules name=directory`). Every adapter is written as LoRA
    factors from its method's `low_rank_factors()`: exact for LoRA, SR-LoRA
    (per-layer ranks) and FlexLoRA (active components, `A diag(s·λ) B`
    folded into two factors); LR-LoRA's update is not low-rank and is
    refused unless `svd_rank` truncates it (the relative error is
    returned). One global `lora_alpha = r` (the largest rank) with each
    scaling folded into `lora_B`, plus `rank_pattern`/`alpha_pattern` for
    layers of other ranks: what vLLM and PEFT read alike (module docstring).

    Everything is checked before anything is written; the folder is written
    under a temporary name and swapped in when complete (an existing folder
    may hold only a previous PEFT adapter).

    Args:
        model: a keras-hub Llama, Gemma or ViT backbone or task model with
            adapters on its mapped projections (`targets.HF_MODULES`).
        directory: the folder to write.
        svd_rank: truncate updates that are not low-rank (LR-LoRA) to their
            best rank-`svd_rank` approximation. Defaults to None (refuse them).
        base_model_name_or_path: recorded in the config (a hub id or the
            transformers folder). Defaults to None.
        module_prefix: the transformers module prefix, e.g.
            `"model.language_model."` for `Gemma3ForConditionalGeneration`.
            Defaults to None: the table's (`"model."` for Llama and Gemma,
            `"vit."` for ViT).

    Returns:
        A dict: `directory`, `r`, and `layers`, one `{"path", "module",
        "rank", "relative_error"}` per adapter (0.0 for exact factors).

    Example:
    ```python
    backbone = keras_hub.models.Backbone.from_preset("./llama_hf")  # save_pretrained
    kal.apply_adapters(backbone, kal.StableRankLoRA())
    ...  # fit
    kal.save_peft_adapters(backbone, "./peft_adapter")
    # torch: PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(
    #     "./llama_hf"), "./peft_adapter")
    ```
    """
    arch = _architecture(model, "save_peft_adapters")
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model {model.name!r} has no adapters to save; apply them first "
            "(`apply_adapters(model, method)`)."
        )
    inside = {id(v) for a in adapters for v in a.variables}
    extra = [v.path for v in model.trainable_variables if id(v) not in inside]
    if extra:
        raise ValueError(
            f"Model {model.name!r} has {len(extra)} trainable variables outside its "
            f"adapters (e.g. '{extra[0]}', from `train_also`), which a PEFT LoRA "
            "adapter cannot hold. Keep them with `save_adapters` (this library's "
            "adapter file), or freeze them to write the adapters alone."
        )
    entry = HF_MODULES[arch]
    prefix = entry["prefix"] if module_prefix is None else str(module_prefix)
    if prefix and not prefix.endswith("."):
        prefix += "."
    sites = _projection_sites(model, arch)
    names = {id(layer): names[0] for _, layer, names in sites}
    tensors, layers = {}, []
    for adapter in adapters:
        if id(adapter) not in names:
            mapped = sorted({layer_path(layer).rsplit("/", 1)[-1] for _, layer, _ in sites})
            raise ValueError(
                f"Layer '{adapter.path}' has no Hugging Face transformers module in "
                f"the {arch} table (its projection layers: {', '.join(mapped)}); a "
                "PEFT adapter can only hold those. Nothing was written."
            )
        factors = getattr(adapter, "low_rank_factors", None)
        if factors is None:
            raise ValueError(
                f"Layer '{adapter.path}': a {type(adapter).__name__} defines no "
                "`low_rank_factors()`, so it cannot be written as LoRA factors. Merge "
                "it instead (`merge_adapters`). Nothing was written."
            )
        a, b, error = factors(svd_rank=svd_rank)
        module = prefix + names[id(adapter)]
        if a.shape != (adapter.d_in, a.shape[1]) or b.shape != (a.shape[1], adapter.d_out):
            raise ValueError(
                f"Layer '{adapter.path}': low_rank_factors() returned shapes "
                f"{a.shape} and {b.shape} for a ({adapter.d_in}, {adapter.d_out}) "
                "update. Nothing was written."
            )
        tensors[f"{KEY_PREFIX}{module}.lora_A.weight"] = a.T
        tensors[f"{KEY_PREFIX}{module}.lora_B.weight"] = b.T
        layers.append({"path": adapter.path, "module": module, "rank": int(a.shape[1]),
                       "relative_error": float(error)})
    rank = max(layer["rank"] for layer in layers)
    pattern = {layer["module"]: layer["rank"] for layer in layers if layer["rank"] != rank}
    config = peft_config(
        rank=rank, pattern=pattern, target_modules=_target_modules(sites, adapters, layers),
        task_type=entry["task_type"], base_model_name_or_path=base_model_name_or_path,
    )
    directory = os.fspath(directory)
    with replacing_folder(directory, replaceable=(CONFIG_FILE, WEIGHTS_FILE, "README.md")) as temp:
        os.makedirs(temp)
        metadata = {"format": "pt", "writer": f"keras_adaptive_lora {__version__}"}
        write_safetensors(os.path.join(temp, WEIGHTS_FILE), tensors, metadata)
        with open(os.path.join(temp, CONFIG_FILE), "x") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    return {"directory": directory, "r": rank, "layers": layers}


def _target_modules(sites, adapters, layers):
    """The short module names (`q_proj`, what vLLM checks) when every module
    of those names is adapted, else the full module paths (PEFT then adapts
    exactly the written modules)."""
    adapted = {id(a) for a in adapters}
    short = sorted({layer["module"].rsplit(".", 1)[-1] for layer in layers})
    for _, layer, names in sites:
        if names[0].rsplit(".", 1)[-1] in short and id(layer) not in adapted:
            return sorted(layer["module"] for layer in layers)
    return short




# --------------------------------------------------------------------------
# In
# --------------------------------------------------------------------------
def load_peft_adapters(model, directory):
    """Put a PEFT LoRA adapter onto `model` as `LoRAAdapter`s, in place.

    Each module of the adapter (per-layer ranks, `use_rslora`,
    `rank_pattern`/`alpha_pattern`, `lora_dropout` for further training)
    becomes a `LoRAAdapter` on the keras-hub layer the table maps it to
    (`targets.HF_MODULES`; transformers 4 ViT names are read too), with
    `A = lora_Aᵀ`, `B = lora_Bᵀ` and the module's scaling, so the model's
    outputs equal the PEFT model's. The model is then frozen as
    `apply_adapters` leaves it: train on, `merge_adapters`, `save_adapters`
    or `save_peft_adapters` as usual.

    Everything is checked first and the model is left unchanged on any
    error: a folder that is not a PEFT LoRA adapter, DoRA or another LoRA
    variant (`read_peft_adapter`), an unsupported architecture, a module
    with no layer in `model`, a layer that already has an adapter, or
    factors whose shapes belong to another base model.

    Args:
        model: a built keras-hub Llama, Gemma or ViT backbone or task model,
            loaded from the transformers model the adapter was trained on
            (`from_preset(folder)` on its `save_pretrained` folder).
        directory: the PEFT adapter folder (`adapter_config.json`,
            `adapter_model.safetensors`).

    Returns:
        An `AdapterReport` of the loaded adapters.

    Example:
    ```python
    lm = keras_hub.models.CausalLM.from_preset("./llama_hf", preprocessor=None)
    print(kal.load_peft_adapters(lm, "./peft_adapter"))
    ```
    """
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on a batch (or build it) "
            "before loading adapters."
        )
    config, factors = read_peft_adapter(directory)
    arch = _architecture(model, "load_peft_adapters")
    by_name = {}
    for parent, layer, names in _projection_sites(model, arch):
        for name in names:
            by_name.setdefault(name, (parent, layer))
    plan, missing, seen = [], [], {}
    for module, (a, b, rank, alpha) in factors.items():
        parts = module.split(".")
        suffixes = (".".join(parts[i:]) for i in range(len(parts)))
        site = next((by_name[n] for n in suffixes if n in by_name), None)
        if site is None:
            missing.append(module)
            continue
        parent, layer = site
        path = layer_path(layer)
        if id(layer) in seen:
            raise ValueError(
                f"{os.fspath(directory)!r}: modules '{seen[id(layer)]}' and '{module}' "
                f"both map to layer '{path}'; nothing was changed."
            )
        seen[id(layer)] = module
        if isinstance(layer, AdapterLayer):
            raise ValueError(
                f"Layer '{path}' already has an adapter ({type(layer).__name__}); load "
                "PEFT adapters into a model without adapters (or `merge_adapters` "
                "first). Nothing was changed."
            )
        view = kernel_view(layer)
        if a.shape[1] != view.d_in or b.shape[0] != view.d_out:
            raise ValueError(
                f"Module '{module}' (layer '{path}'): the adapter's factors update a "
                f"({b.shape[0]}, {a.shape[1]}) weight (out, in) but the model's layer is "
                f"({view.d_out}, {view.d_in}). The adapter was trained on another base "
                "model; load it onto the model it was trained on. Nothing was changed."
            )
        if rank > min(view.d_in, view.d_out):
            raise ValueError(
                f"Module '{module}' (layer '{path}'): rank {rank} exceeds min(d_in, "
                f"d_out) = {min(view.d_in, view.d_out)}, which a LoRAAdapter cannot "
                "hold. Nothing was changed."
            )
        plan.append((parent, layer, a, b, rank, alpha))
    if missing:
        known = sorted(by_name)[:4]
        raise ValueError(
            f"{os.fspath(directory)!r}: {len(missing)} adapted modules have no layer in "
            f"{type(model).__name__} {model.name!r} (e.g. '{missing[0]}'; this model's "
            f"modules are named like {', '.join(known)}). The adapter was trained on "
            "another architecture or model size; nothing was changed."
        )
    try:
        spec = LoRA(rank=int(config.get("r", 8)), alpha=float(config.get("lora_alpha", 8)),
                    dropout=float(config.get("lora_dropout") or 0.0),
                    rslora=bool(config.get("use_rslora")))
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{os.fspath(directory)!r}: adapter_config.json has values a LoRA adapter "
            f"cannot take ({error}); nothing was changed."
        ) from None
    touched, swaps = [], []
    try:
        for parent, layer, a, b, rank, alpha in plan:
            touched.append((layer, layer.activation, layer.trainable))
            adapter = LoRAAdapter(layer, rank=rank, alpha=alpha, dropout=spec.dropout,
                                  rslora=spec.rslora)
            swaps.append((parent, layer, adapter, a, b))
    except BaseException:
        for layer, activation, trainable in touched:
            layer.activation = activation
            layer.trainable = trainable
        raise
    description = method_spec(spec, sorted(layer_path(layer) for _, layer, *_ in plan))
    for _, _, adapter, a, b in swaps:
        adapter.lora_a.assign(ops.cast(np.ascontiguousarray(a.T), adapter.lora_a.dtype))
        adapter.lora_b.assign(ops.cast(np.ascontiguousarray(b.T), adapter.lora_b.dtype))
        adapter.method_spec = description
    install_adapters(model, [(parent, layer, adapter) for parent, layer, adapter, _, _ in swaps])
    return build_report(model, spec, [adapter for _, _, adapter, _, _ in swaps])
