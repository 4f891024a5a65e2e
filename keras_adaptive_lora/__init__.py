"""keras-adaptive-lora: adaptive-rank LoRA adapters for Keras 3 and keras-hub.

Layers, from the floor up (no module imports one above it):
`backend`, `_validation` -> `core/` (matrix view, quantization, the
`AdapterLayer` base, the method registry, the layer tree) -> `spectral`,
`targets` -> `methods/` (one place per method) -> `reports`, `surgery`,
`inspection`, `saving/`, `distribution`, `data/` -> `cli` and `apps/` (the
transfer job). See docs/architecture.md.

The public names below are loaded lazily (`__getattr__`), so importing the
package is cheap; `import keras_adaptive_lora as kal; kal.LoRA` works as
usual.
"""

import importlib

from keras_adaptive_lora.version import __version__  # noqa: F401

# Public name -> the module defining it, imported on first use (PEP 562):
# `import keras_adaptive_lora` imports no backend, so the command line answers
# `--help` at once. The first public name used also imports `methods`, which
# registers the built-in methods (and their Keras-serializable layers).
_PUBLIC = {
    "keras_adaptive_lora.core.adapter": (
        "AdapterLayer",
    ),
    "keras_adaptive_lora.core.kernel_view": (
        "KernelView",
        "kernel_view",
    ),
    "keras_adaptive_lora.core.method": (
        "AdapterMethod",
        "LayerPlan",
        "get_method",
        "method_names",
        "register_method",
    ),
    "keras_adaptive_lora.core.quantization": (
        "dequantized_kernel",
        "kernel_matrix",
    ),
    "keras_adaptive_lora.core.tree": (
        "find_adapters",
    ),
    "keras_adaptive_lora.distribution": (
        "distribute_adapters",
        "layout_map_for",
    ),
    "keras_adaptive_lora.inspection": (
        "RankPlan",
        "plan_ranks",
        "update_stable_ranks",
    ),
    "keras_adaptive_lora.methods.flexlora": (
        "FlexLoRA",
        "FlexLoRAAdapter",
        "FlexLoRAScheduler",
        "budget_schedule",
    ),
    "keras_adaptive_lora.methods.lora": (
        "LoRA",
        "LoRAAdapter",
    ),
    "keras_adaptive_lora.methods.sinc": (
        "SincLoRA",
        "SincLoRAAdapter",
    ),
    "keras_adaptive_lora.methods.sr_lora": (
        "StableRankLoRA",
        "StableRankLoRAAdapter",
        "allocate_ranks",
    ),
    "keras_adaptive_lora.reports": (
        "AdapterReport",
    ),
    "keras_adaptive_lora.saving": (
        "export_merged",
        "load_adapters",
        "load_peft_adapters",
        "save_adapters",
        "save_merged",
        "save_peft_adapters",
    ),
    "keras_adaptive_lora.spectral": (
        "spectral_entropy_importance",
        "stable_rank",
    ),
    "keras_adaptive_lora.surgery": (
        "apply_adapters",
        "merge_adapters",
    ),
}
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}


__all__ = [
    # Method specs and their layers
    "LoRA",
    "LoRAAdapter",
    "StableRankLoRA",
    "StableRankLoRAAdapter",
    "FlexLoRA",
    "FlexLoRAAdapter",
    "SincLoRA",
    "SincLoRAAdapter",
    # Core
    "AdapterLayer",
    "AdapterMethod",
    "KernelView",
    "LayerPlan",
    "dequantized_kernel",
    "kernel_matrix",
    "kernel_view",
    # The method registry
    "get_method",
    "method_names",
    "register_method",
    # Surgery
    "AdapterReport",
    "apply_adapters",
    "find_adapters",
    "merge_adapters",
    # SR-LoRA planning and spectra
    "RankPlan",
    "allocate_ranks",
    "plan_ranks",
    "stable_rank",
    "update_stable_ranks",
    # FlexLoRA schedule
    "FlexLoRAScheduler",
    "budget_schedule",
    "spectral_entropy_importance",
    # Multi-device
    "distribute_adapters",
    "layout_map_for",
    # Persistence
    "export_merged",
    "load_adapters",
    "save_adapters",
    "save_merged",
    # Hugging Face PEFT adapters
    "load_peft_adapters",
    "save_peft_adapters",
]


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'keras_adaptive_lora' has no attribute {name!r}")
    importlib.import_module("keras_adaptive_lora.methods")  # registers the built-in methods
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
