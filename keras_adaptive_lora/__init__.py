"""keras-adaptive-lora: adaptive-rank LoRA adapters for Keras 3 and keras-hub."""

__version__ = "0.1.0"

from keras_adaptive_lora.adapters import (
    AdapterLayer,
    AdapterMethod,
    KernelView,
    LoRA,
    LoRAAdapter,
    kernel_matrix,
    kernel_view,
)
from keras_adaptive_lora.adapters.base import dequantized_kernel
from keras_adaptive_lora.adapters.flexlora import (
    FlexLoRA,
    FlexLoRAAdapter,
    budget_schedule,
    spectral_entropy_importance,
)
from keras_adaptive_lora.adapters.sinc import SincLoRA, SincLoRAAdapter
from keras_adaptive_lora.adapters.stable_rank import (
    RankPlan,
    StableRankLoRA,
    StableRankLoRAAdapter,
    allocate_ranks,
    plan_ranks,
)
from keras_adaptive_lora.callbacks import FlexLoRAScheduler
from keras_adaptive_lora.diagnostics import update_stable_ranks
from keras_adaptive_lora.distribution import distribute_adapters, layout_map_for
from keras_adaptive_lora.io import export_merged, load_adapters, save_adapters, save_merged
from keras_adaptive_lora.spectral import stable_rank
from keras_adaptive_lora.surgery import AdapterReport, apply_adapters, find_adapters, merge_adapters

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
    "dequantized_kernel",
    "kernel_matrix",
    "kernel_view",
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
