"""Adapter layers and method specs, one file per method."""

from keras_adaptive_lora.adapters.base import (  # noqa: F401
    AdapterLayer,
    AdapterMethod,
    KernelView,
    kernel_matrix,
    kernel_view,
)
from keras_adaptive_lora.adapters.lora import LoRA, LoRAAdapter  # noqa: F401
