"""The `AdapterLayer` base class that every method's layer derives from.

An `AdapterLayer` wraps one built `keras.layers.Dense` or
`keras.layers.EinsumDense`, freezes it, and adds a low-rank update of the
kernel's *matrix view* (see `KernelView`). The forward pass is written once,
here: `activation(base(x) + update(x))`; a method defines its update through
hooks (`build_adapter`, `delta_kernel`, `delta_output`, `adapter_losses`,
`merged_output`, `rank`, `capacity`; see docs/architecture.md) and never
re-implements bias or activation.
"""

import inspect
import sys

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.core.kernel_view import kernel_view
from keras_adaptive_lora.core.quantization import (
    SUPPORTED_QUANTIZATION,
    check_quantization,
    dequantized_kernel,
    float_policy,
)

PACKAGE = "keras_adaptive_lora"


def check_wrappable(layer):
    """Raise a `ValueError` naming the layer unless an adapter can wrap it: a
    built `Dense`/`EinsumDense`, float or Keras int8, without an adapter or
    Keras's built-in LoRA. Changes nothing; returns its `KernelView`."""
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
    return view


def unmerged_save_error(adapter, written=False):
    """The `ValueError` for `model.save` of a model holding `adapter`."""
    return ValueError(
        f"Layer '{adapter.path}' has an unmerged {type(adapter).__name__}; a "
        "whole-model `.keras` file cannot hold adapters (the model's config "
        "knows nothing of them, so a reload would silently rebuild plain "
        "layers). Either merge first (`keras_adaptive_lora.merge_adapters"
        "(model)`, then `model.save(...)`), or save the adapters alone with "
        "`keras_adaptive_lora.save_adapters(model, path)` and re-apply them "
        "with `load_adapters` on the base model. Weights-only checkpoints "
        "(`model.save_weights`, `ModelCheckpoint(save_weights_only=True)`) "
        "work with adapters in place."
        + (" Keras had already opened the file: what it wrote is incomplete, delete it "
           "(`model.save` on the model given to `apply_adapters` refuses before "
           "touching the file)." if written else " Nothing was written.")
    )

_PRESET = ("save_to_preset", ("save_backbone", "save_task"), "keras_hub")
_EXPORTER = "keras_hub.src.utils.transformers.export.hf_exporter"
_TRANSFORMERS = ("export_to_transformers", ("export_backbone",), _EXPORTER)


def refuse_inside_keras_hub(adapter, writer, functions, module):
    """Raise a `ValueError` inside keras-hub's `functions` of `writer` (unaware of adapters)."""
    frame = inspect.currentframe() if module in sys.modules else None
    while frame is not None:
        name = frame.f_code.co_name
        if name in functions and frame.f_globals.get("__name__", "").startswith("keras_hub"):
            raise ValueError(
                f"Layer '{adapter.path}' has an unmerged {type(adapter).__name__}; keras-hub's "
                f"`{writer}` cannot hold adapters. Either merge first (`keras_adaptive_lora."
                f"merge_adapters(model)`, then `{writer}(...)`), or save the adapters alone "
                "(`keras_adaptive_lora.save_adapters`; `save_peft_adapters` for PEFT, vLLM) "
                "and `load_adapters` on `from_preset(base)`. Anything it wrote is incomplete."
            )
        frame = frame.f_back


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

    Constructing one changes the wrapped layer (frozen, activation linear):
    `apply_adapters` and `load_adapters` undo that when any target fails.

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
        view = check_wrappable(layer)
        kwargs.setdefault("name", layer.name)
        kwargs.setdefault("dtype", float_policy(layer))
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
    def weights(self):  # keras-hub's `export_to_transformers` reads `weights[0]`...
        refuse_inside_keras_hub(self, *_TRANSFORMERS)
        return super().weights

    @property
    def kernel(self):  # ... or `kernel` (Llama): refused there; an adapter has none
        refuse_inside_keras_hub(self, *_TRANSFORMERS)
        raise AttributeError(f"'{type(self).__name__}' has no `kernel`; see `.wrapped.kernel`.")

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
            name=name, shape=shape, initializer=initializer, dtype="float32", trainable=trainable, autocast=autocast
        )

    # The update ---------------------------------------------------------------
    def delta_kernel(self):
        """The update as a float32 `(d_in, d_out)` matrix, scaling included;
        subclasses define it."""

    def delta_output(self, inputs, training=None):
        """The update of the output for `inputs` (before bias/activation).

        Default: form the full update and project with it. Subclasses that
        have a factored form override this.
        """
        delta = ops.cast(self.view.from_matrix(self.delta_kernel()), self.compute_dtype)
        return self.view.project(inputs, delta)

    #: True when the method applies its update merged (`merged_output`).
    forward_merged = False

    def merged_output(self, inputs, training=None):
        """`x (W + ΔW)` without bias, for methods with `forward_merged = True`."""
        raise NotImplementedError(f"{type(self).__name__} does not define merged_output.")

    def adapter_losses(self):
        """Losses added at every call (scalars). Default: none."""
        return []

    def call(self, inputs, training=None, **kwargs):
        for loss in self.adapter_losses():
            self.add_loss(loss)
        base = self.wrapped
        # The base may be quantized after wrapping: checked at every call.
        if self.forward_merged and check_quantization(base) is None:
            y = self.merged_output(ops.cast(inputs, self.compute_dtype), training)
            if base.bias is not None:
                y = ops.add(y, ops.cast(base.bias, y.dtype))
            return self.activation(y)
        # An int8 base runs its own quantized kernel; the update stays float.
        y = base(inputs, training=training, **kwargs)
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
            config["dtype"] = keras.dtype_policies.serialize(float_policy(base))
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

        Keras calls it only when it saves a whole model, never for weights
        files (`save_weights`, `ModelCheckpoint`, `BackupAndRestore`). A
        `.keras` config knows nothing of adapters (keras-hub's neither), so a
        reload would silently rebuild plain layers: raise (Keras opened the
        file already; `apply_adapters` guards `model.save`, which refuses first).
        """
        raise unmerged_save_error(self, written=True)

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
        refuse_inside_keras_hub(self, *_PRESET)
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
        """The number of rank components in use (for reports); subclasses define it."""

    def capacity(self):
        """The most rank components it can hold (`rank()` unless it moves, as FlexLoRA's)."""
        return self.rank()

    def own_variables(self):
        """`[(name, variable)]`: the adapter's variables that are not the
        wrapped layer's (factors, non-trainable state, seed-generator states),
        named by their path relative to the adapter. The one enumeration used
        by adapter files and multi-device layouts."""
        base = {id(v) for v in self.wrapped.variables}
        prefix = self.path + "/"
        out, seen = [], set()
        for variable in self.variables:
            if id(variable) in base or id(variable) in seen:
                continue
            seen.add(id(variable))
            path = variable.path
            out.append((path[len(prefix):] if path.startswith(prefix) else variable.name, variable))
        names = [n for n, _ in out]
        if len(set(names)) != len(names):
            raise ValueError(
                f"Layer '{self.path}': its adapter variables have duplicate names "
                f"{names}; they cannot be keyed in an adapter file."
            )
        return out

    #: `{variable name: "in" | "out"}`: the method's factors, for `factor_roles`.
    factors = None

    def factor_roles(self):
        """`{name: "in" | "out" | None}` for `own_variables()`: `"in"` for an
        `A`-like `(d_in, k)` factor, `"out"` for a `B`-like `(k, d_out)` one
        (they follow the kernel's input / output sharding), None for the rest:
        the class's `factors` where set, else by shape (`k <= min(d_in, d_out)`;
        ambiguous square shapes get None)."""
        if self.factors is not None:
            return {name: self.factors.get(name) for name, _ in self.own_variables()}
        limit, roles = min(self.d_in, self.d_out), {}
        for name, variable in self.own_variables():
            roles[name] = None
            if len(variable.shape) == 2:
                rows, cols = (int(d) for d in variable.shape)
                is_a, is_b = rows == self.d_in and cols <= limit, cols == self.d_out and rows <= limit
                if is_a != is_b:
                    roles[name] = "in" if is_a else "out"
        return roles

    def trainable_parameter_count(self):
        return int(sum(np.prod(v.shape) for v in self.trainable_weights))
