"""The shared adapter machinery: the matrix view of a projection kernel, the
`AdapterLayer` base class that every method's layer derives from, and the
`AdapterMethod` base class of the small method spec objects.

An `AdapterLayer` wraps one built `keras.layers.Dense` or
`keras.layers.EinsumDense`, freezes it, and adds a low-rank update of the
kernel's *matrix view* (see `KernelView`). Subclasses define the update in one
place, `delta_kernel()` (the full `(d_in, d_out)` matrix, used by `merge()` and
diagnostics) and, when they can do better than forming it, `delta_output()`
(the update of the output computed in factored form).
"""

import abc
import inspect
import string

import keras
import numpy as np
from keras import ops

PACKAGE = "keras_adaptive_lora"


# --------------------------------------------------------------------------
# Matrix view of a projection kernel
# --------------------------------------------------------------------------
class KernelView:
    """How a projection kernel maps to a `(d_in, d_out)` matrix.

    For an `EinsumDense` with equation `lhs,ker->out`, kernel axes whose letter
    is in `lhs` but not in `out` are contracted: together they form `d_in`.
    Kernel axes whose letter is in `out` but not in `lhs` are produced: they
    form `d_out`. A `Dense` kernel is already `(d_in, d_out)`. The matrix view
    is the kernel transposed to (contracted axes, produced axes) and reshaped.

    Args:
        equation: the einsum equation, or `None` for a `Dense` kernel.
        kernel_shape: the kernel's shape.
        layer_name: used in error messages.
    """

    def __init__(self, equation, kernel_shape, layer_name="layer"):
        self.equation = equation
        self.kernel_shape = tuple(int(d) for d in kernel_shape)
        if equation is None:
            if len(self.kernel_shape) != 2:
                raise ValueError(
                    f"Layer '{layer_name}': a Dense kernel must be 2-D, got "
                    f"shape {self.kernel_shape}."
                )
            self.in_axes, self.out_axes = (0,), (1,)
        else:
            self._parse(equation, layer_name)
        self.in_dims = tuple(self.kernel_shape[i] for i in self.in_axes)
        self.out_dims = tuple(self.kernel_shape[i] for i in self.out_axes)
        self.d_in = int(np.prod(self.in_dims))
        self.d_out = int(np.prod(self.out_dims))
        self.perm = self.in_axes + self.out_axes
        self.inverse_perm = tuple(int(i) for i in np.argsort(self.perm))

    def _parse(self, equation, layer_name):
        eq = equation.replace(" ", "")
        try:
            inputs, out = eq.split("->")
            lhs, ker = inputs.split(",")
        except ValueError:
            raise ValueError(
                f"Layer '{layer_name}': cannot parse einsum equation "
                f"'{equation}'; expected the form 'lhs,kernel->output'."
            ) from None
        if "." in ker:
            raise ValueError(
                f"Layer '{layer_name}': equation '{equation}' has an ellipsis "
                "in the kernel spec; an adapter needs named kernel axes."
            )
        if len(ker) != len(self.kernel_shape):
            raise ValueError(
                f"Layer '{layer_name}': kernel spec '{ker}' of equation "
                f"'{equation}' does not match kernel shape {self.kernel_shape}."
            )
        in_axes, out_axes = [], []
        for axis, letter in enumerate(ker):
            in_lhs, in_out = letter in lhs, letter in out
            if in_lhs and not in_out:
                in_axes.append(axis)
            elif in_out and not in_lhs:
                out_axes.append(axis)
            else:
                where = "both the input and the output" if in_lhs else (
                    "neither the input nor the output"
                )
                raise ValueError(
                    f"Layer '{layer_name}': kernel axis '{letter}' of equation "
                    f"'{equation}' appears in {where}, so the kernel is not a "
                    "single linear map from input features to output "
                    "features and cannot be viewed as a (d_in, d_out) matrix. "
                    "Exclude this layer from the adapter targets."
                )
        if not in_axes or not out_axes:
            raise ValueError(
                f"Layer '{layer_name}': equation '{equation}' has no "
                f"{'contracted' if not in_axes else 'produced'} kernel axis; "
                "it cannot be viewed as a (d_in, d_out) matrix."
            )
        self.in_axes, self.out_axes = tuple(in_axes), tuple(out_axes)
        used = set(eq)
        z = next(c for c in string.ascii_letters if c not in used)
        in_letters = "".join(ker[i] for i in in_axes)
        out_letters = "".join(ker[i] for i in out_axes)
        # Letters of the input kept in the output (batch, sequence, ...).
        mid = "".join(c for c in lhs if c == "." or c in out)
        self.down_equation = f"{lhs},{in_letters}{z}->{mid}{z}"
        self.up_equation = f"{mid}{z},{z}{out_letters}->{out}"
        # Plain matmuls (plus reshapes of trailing axes) where the einsum is
        # one: true for every keras-hub projection, and faster on torch.
        self._down_is_matmul = mid + in_letters == lhs
        self._up_is_matmul = mid + out_letters == out

    # Factored products -----------------------------------------------------
    def down(self, x, a):
        """`x` (layer input) times `a` of shape `(d_in, r)`."""
        if self.equation is None:
            return ops.matmul(x, a)
        if self._down_is_matmul:
            if len(self.in_axes) > 1:
                x = ops.reshape(x, tuple(ops.shape(x)[: -len(self.in_axes)]) + (self.d_in,))
            return ops.matmul(x, a)
        a = ops.reshape(a, self.in_dims + (a.shape[-1],))
        return ops.einsum(self.down_equation, x, a)

    def up(self, h, b):
        """`h` (output of `down`) times `b` of shape `(r, d_out)`."""
        if self.equation is None:
            return ops.matmul(h, b)
        if self._up_is_matmul:
            y = ops.matmul(h, b)
            if len(self.out_axes) > 1:
                y = ops.reshape(y, tuple(ops.shape(h)[:-1]) + self.out_dims)
            return y
        b = ops.reshape(b, (b.shape[0],) + self.out_dims)
        return ops.einsum(self.up_equation, h, b)

    def project(self, x, kernel):
        """`x` times a full kernel in the layer's own shape (no bias)."""
        if self.equation is None:
            return ops.matmul(x, kernel)
        return ops.einsum(self.equation, x, kernel)

    # Conversions -------------------------------------------------------------
    def to_matrix(self, kernel):
        """Kernel (layer shape) -> `(d_in, d_out)` matrix."""
        return ops.reshape(ops.transpose(kernel, self.perm), (self.d_in, self.d_out))

    def from_matrix(self, matrix):
        """`(d_in, d_out)` matrix -> kernel in the layer's own shape."""
        shaped = ops.reshape(matrix, self.in_dims + self.out_dims)
        return ops.transpose(shaped, self.inverse_perm)


def _inside_keras_hub_preset_saver():
    """True when called (indirectly) by keras-hub's preset saver
    (`Backbone.save_to_preset`, `Task.save_to_preset`)."""
    frame = inspect.currentframe()
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if frame.f_code.co_name in ("save_backbone", "save_task") and module.startswith("keras_hub"):
            return True
        frame = frame.f_back
    return False


def _is_projection(layer):
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))


def kernel_view(layer):
    """The `KernelView` of a `Dense`/`EinsumDense` layer or adapter."""
    if isinstance(layer, AdapterLayer):
        return layer.view
    if not _is_projection(layer):
        raise ValueError(
            f"Layer '{getattr(layer, 'name', layer)}' is a "
            f"{type(layer).__name__}; only keras.layers.Dense and "
            "keras.layers.EinsumDense projections can be adapted."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{layer.name}' is not built yet, so its kernel shape is "
            "unknown. Build it first (call the model on an example batch or "
            "`layer.build(input_shape)`), then wrap it."
        )
    equation = layer.equation if isinstance(layer, keras.layers.EinsumDense) else None
    return KernelView(equation, layer.kernel.shape, layer.name)


def kernel_matrix(layer):
    """The `(d_in, d_out)` matrix view of a layer's (base) kernel, float32.

    For an int8-quantized layer, the matrix view of the dequantized kernel
    (see `dequantized_kernel`).
    """
    base = layer.wrapped if isinstance(layer, AdapterLayer) else layer
    view = kernel_view(base)
    return view.to_matrix(dequantized_kernel(base))


# --------------------------------------------------------------------------
# Quantized bases (Keras's own int8)
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
    base = layer.wrapped if isinstance(layer, AdapterLayer) else layer
    if not _is_projection(base):
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


def _float_policy(layer):
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


# --------------------------------------------------------------------------
# The adapter layer
# --------------------------------------------------------------------------
class AdapterLayer(keras.layers.Layer):
    """Base class: a frozen `Dense`/`EinsumDense` plus a low-rank update.

    The wrapped layer is frozen (kernel and bias) and called as it is, with any
    extra call arguments passed through; its activation is moved to the
    adapter so the update is added before it. Adapter variables are float32
    under any mixed-precision policy; compute runs in the wrapped layer's
    compute dtype.

    The wrapped layer may be quantized with Keras's int8
    (`model.quantize("int8")`, before or after wrapping): it then runs its
    own int8 call for `x W` and the update stays a float path; the adapter
    itself takes the float source policy (e.g. `float32` for
    `int8_from_float32`). Stable ranks and `merge` use the dequantized kernel
    (`dequantized_kernel`). Other quantization modes raise a `ValueError`.

    Subclasses implement `build_adapter()` (create variables with
    `add_weight`), `delta_kernel()` (the update as a `(d_in, d_out)` matrix,
    scaling included) and may override `delta_output(x, training)` to compute
    the update of the output without forming the full matrix.

    Args:
        layer: a built `keras.layers.Dense` or `keras.layers.EinsumDense`.
        activation: the activation applied after the update. Defaults to the
            wrapped layer's activation (set by `from_config` on reload).
        **kwargs: base `keras.layers.Layer` arguments (`name` defaults to the
            wrapped layer's name, `dtype` to its dtype policy).
    """

    _ABSTRACT = ("build_adapter", "delta_kernel", "rank")

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        missing = [m for m in cls._ABSTRACT if getattr(cls, m) is getattr(AdapterLayer, m)]
        if missing:
            raise TypeError(
                f"{cls.__name__} subclasses AdapterLayer but does not define "
                f"{', '.join(missing)}."
            )

    def __init__(self, layer, *, activation=None, **kwargs):
        if isinstance(layer, AdapterLayer):
            raise ValueError(
                f"Layer '{layer.name}' is already wrapped by a "
                f"{type(layer).__name__}; adapters cannot be stacked. Merge it "
                "first (`layer.merge()` or `merge_adapters(model)`) if you want "
                "to adapt the merged weights."
            )
        view = kernel_view(layer)  # raises for bad types and unbuilt layers
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer '{layer.name}' has Keras's built-in LoRA enabled "
                "(`enable_lora`); it cannot also be wrapped by an adapter. Use "
                "a layer without built-in LoRA."
            )
        check_quantization(layer)  # float or Keras int8
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", _float_policy(layer))
        super().__init__(**kwargs)
        self.view = view
        self.wrapped = layer
        layer.trainable = False
        if activation is None:
            activation = layer.activation
        self.activation = keras.activations.get(activation)
        layer.activation = keras.activations.get("linear")
        # Variables live under the wrapped layer's path: `<parent>/<name>/...`.
        self._parent_path = layer._parent_path
        self.build(layer.get_build_config()["input_shape"])

    @property
    def trainable(self):
        return keras.layers.Layer.trainable.fget(self)

    @trainable.setter
    def trainable(self, value):
        # Toggling an adapter (e.g. `model.trainable = True`) never unfreezes
        # the wrapped base layer.
        keras.layers.Layer.trainable.fset(self, value)
        wrapped = self.__dict__.get("wrapped") or getattr(self, "_modules", {}).get("wrapped")
        if wrapped is not None:
            wrapped.trainable = False

    # Shape facts ---------------------------------------------------------------
    @property
    def d_in(self):
        return self.view.d_in

    @property
    def d_out(self):
        return self.view.d_out

    def build(self, input_shape):
        self.build_adapter()

    def build_adapter(self):
        """Create the adapter's variables (float32). Subclasses define it."""

    def add_adapter_weight(self, name, shape, initializer, trainable=True, autocast=True):
        """`add_weight` in float32, whatever the dtype policy.

        With `autocast=False` the variable is read in float32 inside `call`
        under a mixed-precision policy too (the layer then casts explicitly).
        """
        return self.add_weight(
            name=name,
            shape=shape,
            initializer=initializer,
            dtype="float32",
            trainable=trainable,
            autocast=autocast,
        )

    # The update ---------------------------------------------------------------
    def delta_kernel(self):
        """The update as a float32 `(d_in, d_out)` matrix, scaling included.

        Subclasses define it.
        """

    def delta_output(self, inputs, training=None):
        """The update of the output for `inputs` (before bias/activation).

        Default: form the full update and project with it. Subclasses that
        have a factored form override this.
        """
        delta = ops.cast(self.view.from_matrix(self.delta_kernel()), self.compute_dtype)
        return self.view.project(inputs, delta)

    def call(self, inputs, training=None, **kwargs):
        # An int8 base runs its own quantized kernel; the update stays float.
        check_quantization(self.wrapped)  # the base may be quantized after wrapping
        y = self.wrapped(inputs, training=training, **kwargs)
        y = ops.add(y, ops.cast(self.delta_output(inputs, training), y.dtype))
        return self.activation(y)

    def compute_output_shape(self, input_shape):
        return self.wrapped.compute_output_shape(input_shape)

    # Merge ----------------------------------------------------------------------
    def merged_kernel(self):
        """The wrapped kernel plus the update, in the kernel's shape.

        In the kernel's dtype for a float base; for an int8 base, the
        dequantized kernel plus the update in the layer's float variable dtype.
        """
        base = self.wrapped
        delta = self.view.from_matrix(self.delta_kernel())
        merged = ops.add(dequantized_kernel(base), delta)
        dtype = base.kernel.dtype if base.quantization_mode is None else base.variable_dtype
        return ops.cast(merged, dtype)

    def merge(self, *, quantize=None):
        """A plain `Dense`/`EinsumDense` with the update folded into its kernel.

        Same class, name, config (activation included) and bias as the wrapped
        layer; its outputs equal this adapter's inference outputs. The adapter
        itself is left unchanged.

        On an int8-quantized base the merged layer is a float layer by
        default: kernel `W_dequantized + ΔW` in the layer's float variable
        dtype. Its outputs differ from the adapter's by the base's int8
        rounding of the activations only (the merged layer does not quantize
        its input). Pass `quantize="int8"` to re-quantize the merged kernel
        with Keras's own `layer.quantize("int8")` (using the base's
        quantization config when it had one), for int8 deployment.

        Args:
            quantize: `None` (a float layer) or `"int8"` (quantize the merged
                layer, from a float or an int8 base). Defaults to None.
        """
        if quantize not in (None, *SUPPORTED_QUANTIZATION):
            raise ValueError(
                f"Layer '{self.name}': `quantize` must be None (a float merged "
                f"layer) or 'int8', got {quantize!r}."
            )
        base = self.wrapped
        config = base.get_config()
        config["activation"] = keras.activations.serialize(self.activation)
        for key in ("lora_rank", "lora_alpha", "quantization_config"):
            config.pop(key, None)
        if base.quantization_mode is not None:
            config["dtype"] = keras.dtype_policies.serialize(_float_policy(base))
        merged = type(base).from_config(config)
        merged._parent_path = base._parent_path
        merged.build_from_config(base.get_build_config())
        merged.kernel.assign(self.merged_kernel())
        if base.bias is not None:
            merged.bias.assign(base.bias)
        if quantize is not None:
            same_mode = base.quantization_mode == quantize
            try:
                merged.quantize(
                    quantize, config=getattr(base, "quantization_config", None) if same_mode else None
                )
            except NotImplementedError as error:
                raise ValueError(
                    f"Layer '{self.name}': its {type(base).__name__} cannot be "
                    f"quantized by Keras ({error}); merge with `quantize=None`."
                ) from None
        return merged

    # Config -----------------------------------------------------------------------
    def adapter_config(self):
        """The method's own arguments (rank, alpha, ...)."""
        return {}

    def get_config(self):
        config = super().get_config()
        config.update(self.adapter_config())
        config["layer"] = keras.saving.serialize_keras_object(self.wrapped)
        config["activation"] = keras.activations.serialize(self.activation)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        layer = keras.saving.deserialize_keras_object(config.pop("layer"))
        return cls(layer, **config)

    # Saving -------------------------------------------------------------------------
    def save_assets(self, dir_path):
        """Refuse whole-model saving (`model.save("x.keras")`).

        Keras calls `save_assets` only when it saves a whole model (config +
        weights), never for weights-only files (`save_weights`,
        `ModelCheckpoint(save_weights_only=True)`, `BackupAndRestore`), which
        keep working. A `.keras` file would store a config without adapters
        (keras-hub `Backbone.get_config` knows nothing of them), so a reload
        would silently rebuild plain layers: raise instead.
        """
        raise ValueError(
            f"Layer '{self.path}' has an unmerged {type(self).__name__}; a "
            "whole-model `.keras` file cannot hold adapters (the model's config "
            "knows nothing of them, so a reload would silently rebuild plain "
            "layers). Either merge first (`keras_adaptive_lora.merge_adapters"
            "(model)`, then `model.save(...)`), or save the adapters alone with "
            "`keras_adaptive_lora.save_adapters(model, path)` and re-apply them "
            "with `load_adapters` on the base model. Weights-only checkpoints "
            "(`model.save_weights`, `ModelCheckpoint(save_weights_only=True)`) "
            "work with adapters in place. The file written so far is incomplete: "
            "delete it."
        )

    def _seed_states(self):
        """State variables of the adapter's own seed generators (SR-LoRA's SPU
        sampler, an adapter dropout), not the wrapped layer's."""
        wrapped = {id(layer) for layer in self.wrapped._flatten_layers()}
        return [
            generator.state
            for layer in self._flatten_layers()
            if id(layer) not in wrapped
            for generator in layer._seed_generators
        ]

    def save_own_variables(self, store):
        """Save the variables plus the seed-generator states (weights files).

        Keras's weights files (`save_weights`, `ModelCheckpoint`,
        `BackupAndRestore`) store no `SeedGenerator` state, so a resumed run
        would restart the adapter's random draws: they are stored after the
        layer's own variables. Refuses to be saved into a keras-hub preset
        (`save_to_preset`), whose config cannot hold adapters.
        """
        if _inside_keras_hub_preset_saver():
            raise ValueError(
                f"Layer '{self.path}' has an unmerged {type(self).__name__}; a "
                "keras-hub preset (`save_to_preset`) cannot hold adapters (its "
                "config.json knows nothing of them, so `from_preset` would build "
                "plain layers that do not match the weights file). Either merge "
                "first (`keras_adaptive_lora.merge_adapters(model)`, then "
                "`save_to_preset(...)`), or save the adapters alone with "
                "`keras_adaptive_lora.save_adapters(model, path)` and re-apply "
                "them with `load_adapters` on `from_preset(base_preset)`. The "
                "preset folder written so far is incomplete: delete it."
            )
        super().save_own_variables(store)
        offset = len(self._trainable_variables) + len(self._non_trainable_variables)
        for i, state in enumerate(self._seed_states()):
            store[f"{offset + i}"] = state

    def load_own_variables(self, store):
        """Load what `save_own_variables` saved (a file without the seed
        states, written before they were stored, loads too)."""
        variables = self._trainable_variables + self._non_trainable_variables
        states = self._seed_states()
        count = len(store.keys())
        if count not in (len(variables), len(variables) + len(states)):
            self._check_load_own_variables(store)  # Keras's own error
        for i, variable in enumerate((variables + states)[:count]):
            variable.assign(store[f"{i}"])

    # Introspection ----------------------------------------------------------------
    def rank(self):
        """The number of rank components in use (for reports).

        Subclasses define it.
        """

    def trainable_parameter_count(self):
        return int(sum(np.prod(v.shape) for v in self.trainable_weights))


# --------------------------------------------------------------------------
# Method specs
# --------------------------------------------------------------------------
class AdapterMethod(abc.ABC):
    """Base class of the small, validated method spec objects.

    A spec holds a method's hyper-parameters and knows how to wrap one layer
    (`wrap`) and which layers it targets by default per architecture
    (`default_targets`, a dict from architecture name to layer names).
    """

    #: Short method name, used in reports and adapter files.
    name = "adapter"
    #: Architecture name -> list of projection layer names targeted by default.
    default_targets = {}

    @abc.abstractmethod
    def wrap(self, layer):
        """Return an `AdapterLayer` wrapping the built `layer`."""

    def wrap_all(self, layers):
        """Wrap every layer of one `apply_adapters` call; returns the adapters.

        Methods whose per-layer choices depend on all targeted layers at once
        (e.g. a global parameter budget) override this; the default wraps
        each layer on its own.
        """
        return [self.wrap(layer) for layer in layers]

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash((type(self), tuple(sorted(self.get_config().items()))))
