"""Adapter-only files: `save_adapters` and `load_adapters` (the model side).

`save_adapters(model, path)` writes the variables of every adapter of
`model` (non-trainable state included) and the other trainable variables
(`train_also` layers) to one `.npz` file, with metadata describing each
adapted layer; the file format itself is in `adapter_file.py`. Layers are
keyed by `layer.path`, never by index. `load_adapters(model, path)` checks
the whole file against `model` before changing anything.

Training checkpoints need nothing from this module: Keras weights files
(`save_weights`, `ModelCheckpoint(save_weights_only=True)`,
`BackupAndRestore`) hold every adapter variable, and `AdapterLayer` adds its
seed-generator states to them, so a resumed run continues exactly.
"""

import json

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.method import get_method, registered_methods
from keras_adaptive_lora.core.tree import PROJECTION_TYPES, find_adapters, layer_sites
from keras_adaptive_lora import methods as _methods  # noqa: F401  (registers the built-in methods)
from keras_adaptive_lora.reports import build_report
from keras_adaptive_lora.saving.adapter_file import (
    FORMAT,
    FORMAT_VERSION,
    SEP,
    TRAIN_ALSO_PREFIX,
    read_adapter_file,
    write_adapter_file,
)
from keras_adaptive_lora.surgery import all_or_nothing, install_adapters
from keras_adaptive_lora.version import __version__


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _to_numpy(variable):
    value = variable.value
    if "bfloat16" in str(variable.dtype) or "float16" in str(variable.dtype):
        value = ops.cast(value, "float32")
    return np.asarray(ops.convert_to_numpy(value))


def _adapter_variable_ids(model):
    return {id(v) for a in find_adapters(model) for v in a.variables}


def _train_also_variables(model):
    """Trainable variables of `model` outside adapters (the `train_also`
    layers after `apply_adapters`)."""
    inside = _adapter_variable_ids(model)
    return [v for v in model.trainable_variables if id(v) not in inside]


def _shape(x):
    return tuple(int(d) for d in x.shape)


# --------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------
def save_adapters(model, path):
    """Write the adapters of `model` (and its `train_also` variables) to `path`.

    One `.npz` file: arrays keyed `"<layer path>::<variable>"` (adapter
    variables, non-trainable state included) and `"train_also::<variable
    path>"`, plus a JSON string under `"__metadata__"` (versions, method
    specs, targets and per layer: path, adapter class and config, wrapped
    type, kernel shape, rank). The base model's weights are not stored.

    The file is written under a temporary name in the same folder and moved
    onto `path` only once complete: a failed save leaves a previous file at
    `path` as it was.

    Args:
        model: a model with adapters (from `apply_adapters` or
            `load_adapters`).
        path: the file to write (a name ending in `.npz` is conventional; no
            suffix is added).

    Returns:
        The metadata dict that was written.

    Example:
    ```python
    kal.apply_adapters(backbone, kal.LoRA(rank=8))
    backbone.fit(...)
    kal.save_adapters(backbone, "adapters.npz")
    fresh = keras_hub.models.GemmaBackbone.from_preset(preset_dir)
    kal.load_adapters(fresh, "adapters.npz")
    ```
    """
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model {model.name!r} has no adapters to save. Apply them first "
            "(`apply_adapters(model, method)`); to save a merged or plain model "
            "use `model.save(...)` or `save_to_preset(...)`."
        )
    arrays, layers, methods = {}, [], []
    for adapter in adapters:
        spec = getattr(adapter, "method_spec", None)
        spec = json.loads(spec) if isinstance(spec, str) else None
        if spec is not None and spec not in methods:
            methods.append(spec)
        variables = []
        for name, variable in adapter.own_variables():
            key = f"{adapter.path}{SEP}{name}"
            arrays[key] = _to_numpy(variable)
            variables.append(
                {"key": key, "name": name, "shape": list(_shape(variable)),
                 "dtype": str(variable.dtype), "trainable": bool(variable.trainable)}
            )
        layers.append(
            {
                "path": adapter.path,
                "adapter_class": keras.saving.get_registered_name(type(adapter)),
                "adapter_config": adapter.adapter_config(),
                "activation": keras.activations.serialize(adapter.activation),
                "wrapped_type": type(adapter.wrapped).__name__,
                "kernel_shape": list(_shape(adapter.wrapped.kernel)),
                "d_in": int(adapter.d_in),
                "d_out": int(adapter.d_out),
                "rank": int(adapter.rank()),
                "method_index": None if spec is None else methods.index(spec),
                "variables": variables,
            }
        )
    train_also = []
    for variable in _train_also_variables(model):
        key = TRAIN_ALSO_PREFIX + variable.path
        if key in arrays:
            raise ValueError(
                f"Variable path '{variable.path}' occurs twice in {model.name!r}; "
                "trainable variables outside adapters must have unique paths."
            )
        arrays[key] = _to_numpy(variable)
        train_also.append(
            {"key": key, "path": variable.path, "shape": list(_shape(variable)),
             "dtype": str(variable.dtype)}
        )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "model_class": type(model).__name__,
        "methods": methods,
        "layers": layers,
        "train_also": train_also,
    }
    write_adapter_file(path, metadata, arrays)
    return metadata


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------
def _check_array(where, value, shape):
    if _shape(value) != tuple(shape):
        raise ValueError(
            f"{where}: the file's array has shape {_shape(value)} but the model's "
            f"variable has shape {tuple(shape)}. The file does not belong to this "
            "model."
        )


def _check_adapter_array(entry, item, value, shape):
    """The file's array for an adapter variable against the variable its
    rebuilt adapter has (built from the file's own config and the model's
    kernel, which matched): a mismatch means the file contradicts itself."""
    if _shape(value) == tuple(shape):
        return
    config = ", ".join(f"{k}={v!r}" for k, v in sorted(entry["adapter_config"].items()))
    raise ValueError(
        f"Layer '{entry['path']}', variable '{item['name']}': the file's array has "
        f"shape {_shape(value)} but its recorded config ({config}; rank "
        f"{entry.get('rank')!r}) builds shape {tuple(shape)}. The file contradicts "
        "itself (edited or corrupted): save the adapters again; nothing was "
        "changed."
    )


def _check_layer(entry, sites, model):
    path = entry["path"]
    if path not in sites:
        raise ValueError(
            f"Layer '{path}' of the adapter file is not in {type(model).__name__} "
            f"{model.name!r}. Load the adapters into the base model they were "
            "trained on (same architecture and layer names); nothing was changed."
        )
    parent, layer = sites[path]
    if isinstance(layer, AdapterLayer):
        raise ValueError(
            f"Layer '{path}' already has an adapter ({type(layer).__name__}). "
            "Load adapters into a base model without adapters (or call "
            "`merge_adapters(model)` first); nothing was changed."
        )
    if not isinstance(layer, PROJECTION_TYPES) or type(layer).__name__ != entry["wrapped_type"]:
        raise ValueError(
            f"Layer '{path}' is a {type(layer).__name__} in the model but the "
            f"adapter file wraps a {entry['wrapped_type']}; nothing was changed."
        )
    if not layer.built:
        raise ValueError(
            f"Layer '{path}' is not built; build the model (call it on a batch) "
            "before loading adapters; nothing was changed."
        )
    shape, stored = _shape(layer.kernel), tuple(entry["kernel_shape"])
    if shape != stored:
        raise ValueError(
            f"Layer '{path}': the model's kernel has shape {shape} but the adapter "
            f"file was saved for kernel shape {stored}. Load the adapters into the "
            "base model they were trained on; nothing was changed."
        )
    activation = keras.activations.serialize(layer.activation)
    if entry.get("activation", activation) != activation:
        raise ValueError(
            f"Layer '{path}' has activation {activation!r} in the model but the "
            f"adapter file was saved for activation {entry['activation']!r}. Load "
            "the adapters into the base model they were trained on; nothing was "
            "changed."
        )
    cls = keras.saving.get_registered_object(entry["adapter_class"])
    if not (isinstance(cls, type) and issubclass(cls, AdapterLayer)):
        raise ValueError(
            f"Layer '{path}': unknown adapter class {entry['adapter_class']!r}; "
            "import the module that defines it before loading; nothing was "
            "changed."
        )
    return parent, layer, cls


def load_adapters(model, path):
    """Re-apply the adapters stored in `path` to the base `model`, in place.

    Each stored adapter is rebuilt from its class and config around the layer
    at the stored path, every stored value is assigned (non-trainable state
    included), the adapters are swapped in and the model is frozen as
    `apply_adapters` leaves it (adapters and the stored `train_also`
    variables stay trainable). Everything is checked first: an unreadable or
    corrupted file (see `read_adapter_file`), a missing layer, another layer
    type, kernel shape or activation, a layer that already has an adapter,
    an unknown adapter class, a config the class rejects or a variable of
    another shape raises a `ValueError` naming it, and the model is left
    unchanged (nothing half-applied).

    Args:
        model: a built base model: freshly built with the same config, or
            `from_preset(local_dir)`, with the same layer paths as the model
            the adapters were saved from.
        path: a file written by `save_adapters`.

    Returns:
        An `AdapterReport` of the loaded adapters.
    """
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on a batch (or build it) "
            "before loading adapters."
        )
    metadata, arrays = read_adapter_file(path)
    sites = layer_sites(model)
    # 1. Check every layer before building anything.
    checked = [_check_layer(entry, sites, model) for entry in metadata["layers"]]
    # 2. Check the train_also variables.
    by_path = {}
    inside = _adapter_variable_ids(model)
    for variable in model.variables:
        if id(variable) not in inside:
            by_path.setdefault(variable.path, variable)
    train_also = []
    for entry in metadata.get("train_also", []):
        variable = by_path.get(entry["path"])
        if variable is None:
            raise ValueError(
                f"Variable '{entry['path']}' (a trainable variable outside the "
                f"adapters, e.g. of a `train_also` layer) is not in {model.name!r}; "
                "load into the same model type the adapters were saved from; "
                "nothing was changed."
            )
        _check_array(f"Variable '{entry['path']}'", arrays[entry["key"]], variable.shape)
        train_also.append((variable, arrays[entry["key"]]))
    # 3. Build the adapters (off the model), check their variables. Building
    # one freezes its layer and moves the activation; from here on any error
    # undoes everything (`all_or_nothing`).
    swaps = []
    olds = [(variable, ops.copy(variable.value)) for variable, _ in train_also]
    with all_or_nothing(model, [layer for _, layer, _ in checked]) as swapped:
        for entry, (parent, layer, cls) in zip(metadata["layers"], checked):
            try:
                adapter = cls(layer, activation=layer.activation, **entry["adapter_config"])
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Layer '{entry['path']}': cannot rebuild a {cls.__name__} "
                    f"from the file's config {entry['adapter_config']} ({error}). "
                    "The file was edited or written by an incompatible version; "
                    "nothing was changed."
                ) from None
            own = dict(adapter.own_variables())
            stored = {v["name"] for v in entry["variables"]}
            if set(own) != stored:
                raise ValueError(
                    f"Layer '{entry['path']}': the file has adapter variables "
                    f"{sorted(stored)} but a {cls.__name__} has {sorted(own)}; the "
                    "file was written by an incompatible version; nothing was "
                    "changed."
                )
            for item in entry["variables"]:
                _check_adapter_array(entry, item, arrays[item["key"]], own[item["name"]].shape)
            swaps.append((parent, layer, adapter, entry))
        # 4. Assign (the adapters are not in the model yet), then swap in.
        methods = metadata.get("methods", [])
        for parent, layer, adapter, entry in swaps:
            own = dict(adapter.own_variables())
            for item in entry["variables"]:
                variable = own[item["name"]]
                variable.assign(ops.cast(arrays[item["key"]], variable.dtype))
            recorded = entry.get("rank")
            if recorded is not None and recorded != adapter.rank():
                raise ValueError(
                    f"Layer '{entry['path']}': the file records rank {recorded!r} but "
                    f"its arrays hold a rank-{adapter.rank()} {type(adapter).__name__}. "
                    "The file contradicts itself (edited or corrupted): save the "
                    "adapters again; nothing was changed."
                )
            index = entry.get("method_index")
            if index is not None:
                adapter.method_spec = json.dumps(methods[index], sort_keys=True)
        try:
            for variable, value in train_also:
                variable.assign(ops.cast(value, variable.dtype))
            install_adapters(
                model,
                [(parent, layer, adapter) for parent, layer, adapter, _ in swaps],
                keep_trainable=[variable for variable, _ in train_also],
                swapped=swapped,
            )
            for variable, _ in train_also:
                variable.trainable = True
            adapters = [adapter for _, _, adapter, _ in swaps]
            return build_report(model, _method_for_report(methods), adapters)
        except BaseException:
            for variable, value in olds:
                variable.assign(value)
            raise


def _method_class(spec):
    """The registered spec class of a file's method entry, or None.

    By its registered `"name"`; files written before it was stored are
    matched by `"class_name"` against the registered classes' names.
    """
    name = spec.get("name")
    if isinstance(name, str):
        try:
            return get_method(name)
        except ValueError:
            pass
    class_name = spec.get("class_name")
    for cls in registered_methods().values():
        if cls.__name__ == class_name:
            return cls
    return None


def _method_for_report(methods):
    """The method spec object when the file holds one, else a description."""
    if len(methods) == 1:
        cls = _method_class(methods[0])
        config = methods[0].get("config")
        if cls is not None and isinstance(config, dict):
            try:
                return cls.from_config(config)
            except (TypeError, ValueError):
                pass
    if not methods:
        return "loaded adapters"
    return ", ".join(str(m.get("class_name") or m.get("name") or "?") for m in methods)
