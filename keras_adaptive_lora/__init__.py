"""keras-adaptive-lora: adaptive-rank LoRA adapters for Keras 3 and keras-hub.

Layers, from the floor up (no module imports one above it):
`backend`, `_validation` -> `core/` (matrix view, quantization, the
`AdapterLayer` base, the method registry, the layer tree) -> `spectral`,
`targets` -> `methods/` (one place per method) -> `reports`, `surgery`,
`inspection`, `saving/`, `distribution`, `data/` -> `cli` and `apps/` (the
transfer job). See docs/architecture.md.
"""

from keras_adaptive_lora.version import __version__  # noqa: F401

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.kernel_view import KernelView, kernel_view
from keras_adaptive_lora.core.method import (
    AdapterMethod,
    LayerPlan,
    get_method,
    method_names,
    register_method,
)
from keras_adaptive_lora.core.quantization import dequantized_kernel, kernel_matrix
from keras_adaptive_lora.core.tree import find_adapters
from keras_adaptive_lora.distribution import distribute_adapters, layout_map_for
from keras_adaptive_lora.inspection import RankPlan, plan_ranks, update_stable_ranks
from keras_adaptive_lora.methods.flexlora import FlexLoRA, FlexLoRAAdapter, FlexLoRAScheduler, budget_schedule
from keras_adaptive_lora.methods.lora import LoRA, LoRAAdapter
from keras_adaptive_lora.methods.sinc import SincLoRA, SincLoRAAdapter
from keras_adaptive_lora.methods.sr_lora import StableRankLoRA, StableRankLoRAAdapter, allocate_ranks
from keras_adaptive_lora.reports import AdapterReport
from keras_adaptive_lora.saving import export_merged, load_adapters, save_adapters, save_merged
from keras_adaptive_lora.spectral import spectral_entropy_importance, stable_rank
from keras_adaptive_lora.surgery import apply_adapters, merge_adapters

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
]
