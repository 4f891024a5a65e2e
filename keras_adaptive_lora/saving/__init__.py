"""Saving: adapter-only files (`save_adapters`, `load_adapters`,
`read_adapter_file`) and merged models (`save_merged`, `export_merged`)."""

from keras_adaptive_lora.saving.adapter_file import read_adapter_file
from keras_adaptive_lora.saving.adapters import load_adapters, save_adapters
from keras_adaptive_lora.saving.export import export_merged, save_merged

__all__ = ["export_merged", "load_adapters", "read_adapter_file", "save_adapters", "save_merged"]
