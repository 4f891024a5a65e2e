"""Quantized bases (Keras's own int8): which modes adapters support, the
dequantized kernel, and the float policy of an adapter or merged layer."""

import keras
from keras import ops

from keras_adaptive_lora.core.kernel_view import base_layer, is_projection, kernel_view

# --------------------------------------------------------------------------
#: Quantization modes of a wrapped layer that adapters support.
SUPPORTED_QUANTIZATION = ("int8",)


def check_quantization(layer):
    """The layer's quantization mode (`None` or `"int8"`); raise for others.

    Adapters support float layers and layers quantized with Keras's own int8
    (`model.quantize("int8")`, `layer.quantize("int8")`).
    """
    mode = getattr(layer, "quantization_mode", None)
    if mode is not None and mode not in SUPPORTED_QUANTIZATION:
        raise ValueError(
            f"Layer '{layer.name}' is quantized with mode '{mode}'; adapters "
            "support float layers and Keras's int8 quantization only "
            "(`model.quantize(\"int8\")`). Quantize with 'int8', or wrap the "
            "float layer."
        )
    return mode


def dequantized_kernel(layer):
    """A `Dense`/`EinsumDense` kernel in float32, in the kernel's own shape.

    For a float layer, its kernel cast to float32. For a layer quantized with
    Keras's int8 (`layer.quantize("int8")`), the dequantized kernel
    `W = kernel / kernel_scale`: Keras stores an int8 `kernel` and a float
    `kernel_scale` per output feature that maps floats *to* int8
    (`kernel = round(W * kernel_scale)`, abs-max over the contracted axes),
    so dequantizing divides. A `Dense` scale has shape `(units,)` and
    broadcasts over the kernel's last axis; an `EinsumDense` scale is stored
    in the layout of the layer's output and is brought back to the kernel's
    layout with the layer's own `_adjust_scale_for_dequant` (what Keras uses
    for the int8 gradient). Stable ranks (`kernel_matrix`) and `merge` use
    it; the forward pass never does (the base runs its own int8 kernel).

    Args:
        layer: a built `Dense`/`EinsumDense`, or an adapter (its wrapped
            layer is used).

    Returns:
        A float32 tensor of the kernel's shape.
    """
    base = base_layer(layer)
    if not is_projection(base):
        raise ValueError(
            f"Layer '{getattr(base, 'name', base)}' is a {type(base).__name__}; "
            "only keras.layers.Dense and keras.layers.EinsumDense have a kernel "
            "to dequantize."
        )
    mode = check_quantization(base)
    kernel = ops.cast(base.kernel, "float32")
    if mode is None:
        return kernel
    scale = ops.cast(base.kernel_scale, "float32")
    if isinstance(base, keras.layers.EinsumDense):
        scale = base._adjust_scale_for_dequant(scale)
    return ops.divide(kernel, scale)


def float_policy(layer):
    """The layer's dtype policy as a plain float policy.

    A quantized layer's policy (`"int8_from_float32"`) would make an adapter
    or a merged layer quantized too; its source policy is used instead. A
    `DTypePolicyMap` is resolved at the layer's path.
    """
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        policy = policy[layer.path]
    if policy.quantization_mode is not None:
        policy = keras.DTypePolicy(policy.get_config()["source_name"])
    return policy



def kernel_matrix(layer):
    """The `(d_in, d_out)` matrix view of a layer's (base) kernel, float32.

    For an int8-quantized layer, the matrix view of the dequantized kernel
    (see `dequantized_kernel`).
    """
    base = base_layer(layer)
    return kernel_view(base).to_matrix(dequantized_kernel(base))
