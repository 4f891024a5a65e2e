"""FlexLoRA: the spec (`spec.py`), the adapter layer (`layer.py`) and its
schedule and callback (`scheduler.py`)."""

from keras_adaptive_lora.methods.flexlora.layer import INIT_STDDEV, FlexLoRAAdapter  # noqa: F401
from keras_adaptive_lora.methods.flexlora.scheduler import (  # noqa: F401
    FlexLoRAScheduler,
    budget_schedule,
    find_flexlora_adapters,
    flexlora_schedule,
    rank_pattern,
)
from keras_adaptive_lora.methods.flexlora.spec import FlexLoRA  # noqa: F401
