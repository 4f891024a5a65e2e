"""Zeroing the optimizer state of single rank components (used when a method
re-initializes a component, e.g. FlexLoRA's prune and expand)."""

import keras
import numpy as np
from keras import ops

# Optimizer attributes holding per-variable state that must *not* be zeroed
# (an EMA of the weights is not a statistic of the gradients).
_SLOTS_NOT_RESET = ("_model_variables_moving_average",)


def _inner_optimizer(optimizer):
    while hasattr(optimizer, "inner_optimizer"):  # LossScaleOptimizer
        optimizer = optimizer.inner_optimizer
    return optimizer


def reset_optimizer_slots(optimizer, components):
    """Zero the optimizer state of the given rank components, in place.

    Works with any Keras optimizer that keeps per-variable state in lists
    aligned with its trainable variables (`Adam`'s `_momentums` and
    `_velocities`, `SGD`'s `momentums`, `RMSprop`, `Adagrad`, `Lion`, the
    gradient accumulators, ...): a slot is reset when it has its variable's
    shape. Factored slots (`Adafactor`) and weight EMAs are left alone.

    Args:
        optimizer: a Keras optimizer (a `LossScaleOptimizer` is unwrapped).
        components: iterable of `(variable, axis, index)`: the slice
            `index` along `axis` of `variable`'s slots is zeroed.

    Returns:
        The number of slot slices zeroed.
    """
    opt = _inner_optimizer(optimizer)
    if not getattr(opt, "built", False):
        return 0
    tracked = getattr(opt, "_trainable_variables", None) or []
    slot_lists = [
        value
        for attr, value in vars(opt).items()
        if attr not in _SLOTS_NOT_RESET
        and isinstance(value, list)
        and len(value) == len(tracked)
        and value
        and all(v is None or isinstance(v, keras.Variable) for v in value)
        and any(v is not None for v in value)
        and value is not tracked
    ]
    grouped = {}
    for variable, axis, index in components:
        grouped.setdefault(id(variable), (variable, []))[1].append((axis, index))
    count = 0
    for variable, slices in grouped.values():
        try:
            k = opt._get_variable_index(variable)
        except (KeyError, AttributeError):
            continue
        for slots in slot_lists:
            slot = slots[k]
            if slot is None or tuple(slot.shape) != tuple(variable.shape):
                continue
            value = np.array(ops.convert_to_numpy(slot))
            for axis, index in slices:
                value[(slice(None),) * axis + (index,)] = 0
                count += 1
            slot.assign(value)
    return count
