"""Saving: adapter-only files (`save_adapters`, `load_adapters`,
`read_adapter_file`), PEFT LoRA adapters (`save_peft_adapters`,
`load_peft_adapters`, `read_peft_adapter`) and merged models (`save_merged`,
`export_merged`)."""

from keras_adaptive_lora.saving.adapter_file import read_adapter_file
from keras_adaptive_lora.saving.adapters import load_adapters, save_adapters
from keras_adaptive_lora.saving.export import export_merged, save_merged
from keras_adaptive_lora.saving.peft import load_peft_adapters, save_peft_adapters
from keras_adaptive_lora.saving.peft_format import read_peft_adapter

__all__ = [
    "export_merged",
    "load_adapters",
    "load_peft_adapters",
    "read_adapter_file",
    "read_peft_adapter",
    "save_adapters",
    "save_merged",
    "save_peft_adapters",
]
