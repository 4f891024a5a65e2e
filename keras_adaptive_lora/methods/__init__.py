"""The adapter methods, one place each. Importing this package registers
every built-in method (`keras_adaptive_lora.core.method`)."""

from keras_adaptive_lora.methods.lora import LoRA, LoRAAdapter  # noqa: F401
from keras_adaptive_lora.methods.sr_lora import StableRankLoRA, StableRankLoRAAdapter  # noqa: F401
from keras_adaptive_lora.methods.flexlora import FlexLoRA, FlexLoRAAdapter  # noqa: F401
from keras_adaptive_lora.methods.sinc import SincLoRA, SincLoRAAdapter  # noqa: F401
