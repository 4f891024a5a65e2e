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
from keras_adaptive_lora.surgery import AdapterReport, apply_adapters, find_adapters, merge_adapters

__all__ = [
    "AdapterLayer",
    "AdapterMethod",
    "AdapterReport",
    "KernelView",
    "LoRA",
    "LoRAAdapter",
    "apply_adapters",
    "find_adapters",
    "merge_adapters",
    "kernel_matrix",
    "kernel_view",
]
