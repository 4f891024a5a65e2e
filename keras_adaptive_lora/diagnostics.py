"""Diagnostics of trained adapters, for every method."""

from keras_adaptive_lora.adapters.base import AdapterLayer
from keras_adaptive_lora.spectral import stable_rank
from keras_adaptive_lora.surgery import find_adapters


def update_stable_ranks(model):
    """The stable rank of each adapter's update `ΔW`, per adapted layer.

    `srank(ΔW) = ||ΔW||_F^2 / sigma_1(ΔW)^2` of the `(d_in, d_out)` update
    (`adapter.delta_kernel()`, scaling included) of every adapter in `model`,
    whatever its method. For LoRA-style adapters it is at most the rank; for
    `SincLoRA` it is learned and may exceed it (LR-LoRA paper, section 3.3).
    A zero update (e.g. at initialization) reports `0.0`.

    Args:
        model: a Keras model (or layer) holding adapters, or one adapter.

    Returns:
        A dict `{layer path: stable rank (float)}`, in the model's layer order.

    Example:
    ```python
    apply_adapters(backbone, SincLoRA(rank=8))
    backbone.fit(...)  # or a task model holding the backbone
    for path, srank in update_stable_ranks(backbone).items():
        print(f"{path}: {srank:.2f}")
    ```
    """
    adapters = [model] if isinstance(model, AdapterLayer) else find_adapters(model)
    return {
        (adapter.path or adapter.name): float(stable_rank(adapter.delta_kernel()))
        for adapter in adapters
    }
