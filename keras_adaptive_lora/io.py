"""Adapter-only files and merged export.

`save_adapters(model, path)` writes one `.npz` file (a zip of `.npy` arrays,
readable with `numpy.load`, no pickle) holding:

- `"<layer path>::<variable>"`: every variable of every adapter that is not
  a variable of the wrapped base layer: trainable factors and the
  non-trainable state (FlexLoRA masks, expansion counter and schedule step,
  SR-LoRA seed-generator state). `<variable>` is the variable's path relative
  to the adapter (`lora_a`, `spu_seed_generator/seed_generator_state`).
- `"train_also::<variable path>"`: the other trainable variables of the model
  (after `apply_adapters`, those of its `train_also` layers, e.g. a
  classifier head). Nothing else of the base model is stored.
- `"__metadata__"`: a JSON string: format version, library and Keras
  versions, the backend it was saved under, the method specs (class name,
  config, resolved targets) and one entry per adapted layer: path, adapter
  class (registered name), wrapped layer type, kernel shape, `d_in`, `d_out`,
  rank, the adapter's own config (`adapter_config()`: rank, alpha, ...,
  sinc grid, FlexLoRA capacity and seed) and its variables (key, shape,
  dtype).

Layers are keyed by `layer.path`, never by index. `load_adapters(model,
path)` checks the whole file against `model` before changing anything.

Training checkpoints need nothing from this module: Keras weights files
(`save_weights`, `ModelCheckpoint(save_weights_only=True)`,
`BackupAndRestore`) hold every adapter variable, and `AdapterLayer` adds its
seed-generator states to them, so a resumed run continues exactly.
"""

import json
import zipfile

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.adapters.base import AdapterLayer
from keras_adaptive_lora.surgery import (
    PROJECTION_TYPES,
    build_report,
    find_adapters,
    install_adapters,
    swap_layer,
    walk,
    _reset_compiled_functions,
)

FORMAT = "keras_adaptive_lora.adapters"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"
TRAIN_ALSO_PREFIX = "train_also::"
SEP = "::"


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------
def _version():
    from keras_adaptive_lora import __version__  # the package imports this module

    return __version__


def _own_variables(adapter):
    """`[(name, variable)]`: the adapter's variables that are not the wrapped
    layer's, named by their path relative to the adapter."""
    base = {id(v) for v in adapter.wrapped.variables}
    prefix = adapter.path + "/"
    out, seen = [], set()
    for variable in adapter.variables:
        if id(variable) in base or id(variable) in seen:
            continue
        seen.add(id(variable))
        path = variable.path
        name = path[len(prefix):] if path.startswith(prefix) else variable.name
        out.append((name, variable))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(
            f"Layer '{adapter.path}': its adapter variables have duplicate names "
            f"{names}; they cannot be keyed in an adapter file."
        )
    return out


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


def _layer_sites(model):
    """`{path: (parent, layer)}` for every layer of `model` (first wins)."""
    sites = {}
    for parent, layer in walk(model):
        sites.setdefault(layer.path or layer.name, (parent, layer))
    return sites


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
        for name, variable in _own_variables(adapter):
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
        "library_version": _version(),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "model_class": type(model).__name__,
        "methods": methods,
        "layers": layers,
        "train_also": train_also,
    }
    arrays[METADATA_KEY] = np.asarray(json.dumps(metadata))
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return metadata


# --------------------------------------------------------------------------
# Load
# --------------------------------------------------------------------------
def read_adapter_file(path):
    """`(metadata, arrays)` of an adapter file written by `save_adapters`.

    The file is checked before anything is returned: a file that is not a
    readable `.npz`, has no or unparsable metadata, another format, layer
    entries without their fields, or an array named in the metadata but
    missing raises a `ValueError` that says what is wrong.
    """
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(
            f"Cannot read adapter file {str(path)!r} ({type(error).__name__}: "
            f"{error}); expected a file written by "
            "`keras_adaptive_lora.save_adapters`."
        ) from None
    if METADATA_KEY not in arrays:
        raise ValueError(
            f"{str(path)!r} has no '{METADATA_KEY}' entry; it was not written by "
            "`keras_adaptive_lora.save_adapters`."
        )
    try:
        metadata = json.loads(str(arrays.pop(METADATA_KEY)))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"Adapter file {str(path)!r}: its '{METADATA_KEY}' entry is not valid "
            f"JSON ({error}); the file is corrupted. Save the adapters again."
        ) from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT or (
        not isinstance(metadata.get("format_version"), int)
        or metadata["format_version"] > FORMAT_VERSION
    ):
        found = metadata if not isinstance(metadata, dict) else (
            metadata.get("format"), metadata.get("format_version")
        )
        raise ValueError(
            f"{str(path)!r} has format {found!r}; this library reads "
            f"{FORMAT!r} up to version {FORMAT_VERSION}. Upgrade "
            "keras_adaptive_lora, or check that the file was written by "
            "`save_adapters`."
        )
    _check_metadata(metadata, arrays, path)
    return metadata, arrays


_LAYER_FIELDS = {
    "path": str,
    "adapter_class": str,
    "adapter_config": dict,
    "wrapped_type": str,
    "kernel_shape": list,
    "variables": list,
}


def _check_metadata(metadata, arrays, path):
    """Raise a `ValueError` when the metadata lacks what loading needs."""

    def corrupted(what):
        return ValueError(
            f"Adapter file {str(path)!r}: {what}. The file is corrupted or was "
            "edited; save the adapters again."
        )

    layers, methods = metadata.get("layers"), metadata.get("methods", [])
    if not isinstance(layers, list) or not layers:
        raise corrupted("its metadata has no list of adapted 'layers'")
    if not isinstance(methods, list):
        raise corrupted("its metadata's 'methods' is not a list")
    seen = set()
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict):
            raise corrupted(f"layer entry {i} is not a JSON object")
        where = f"layer entry {i} ('{entry.get('path', '?')}')"
        for field, kind in _LAYER_FIELDS.items():
            if not isinstance(entry.get(field), kind):
                raise corrupted(f"{where} has no valid '{field}' ({kind.__name__})")
        if entry["path"] in seen:
            raise corrupted(f"layer '{entry['path']}' occurs twice")
        seen.add(entry["path"])
        index = entry.get("method_index")
        if index is not None and (
            isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(methods)
        ):
            raise corrupted(f"{where} has 'method_index' {index!r} but the file has {len(methods)} methods")
        for item in entry["variables"]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise corrupted(f"{where} has a variable entry without a 'name'")
            if item.get("key") not in arrays:
                raise corrupted(f"{where}: the array {item.get('key')!r} of variable '{item['name']}' is missing")
    train_also = metadata.get("train_also", [])
    if not isinstance(train_also, list):
        raise corrupted("its metadata's 'train_also' is not a list")
    for item in train_also:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise corrupted("a 'train_also' entry has no variable 'path'")
        if item.get("key") not in arrays:
            raise corrupted(f"the array {item.get('key')!r} of variable '{item['path']}' is missing")


def _check_array(where, value, shape):
    if _shape(value) != tuple(shape):
        raise ValueError(
            f"{where}: the file's array has shape {_shape(value)} but the model's "
            f"variable has shape {tuple(shape)}. The file does not belong to this "
            "model."
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
    sites = _layer_sites(model)
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
    # one freezes its layer and moves the activation: undone on any error.
    touched, swaps = [], []
    try:
        for entry, (parent, layer, cls) in zip(metadata["layers"], checked):
            touched.append((layer, layer.activation, layer.trainable))
            try:
                adapter = cls(layer, activation=layer.activation, **entry["adapter_config"])
            except (TypeError, ValueError) as error:
                raise ValueError(
                    f"Layer '{entry['path']}': cannot rebuild a {cls.__name__} "
                    f"from the file's config {entry['adapter_config']} ({error}). "
                    "The file was edited or written by an incompatible version; "
                    "nothing was changed."
                ) from None
            own = dict(_own_variables(adapter))
            stored = {v["name"] for v in entry["variables"]}
            if set(own) != stored:
                raise ValueError(
                    f"Layer '{entry['path']}': the file has adapter variables "
                    f"{sorted(stored)} but a {cls.__name__} has {sorted(own)}; the "
                    "file was written by an incompatible version; nothing was "
                    "changed."
                )
            for item in entry["variables"]:
                _check_array(
                    f"Layer '{entry['path']}', variable '{item['name']}'",
                    arrays[item["key"]],
                    own[item["name"]].shape,
                )
            swaps.append((parent, layer, adapter, entry))
    except Exception:
        for layer, activation, trainable in touched:
            layer.activation = activation
            layer.trainable = trainable
        raise
    # 4. Assign (the adapters are not in the model yet), then swap in.
    methods = metadata.get("methods", [])
    for parent, layer, adapter, entry in swaps:
        own = dict(_own_variables(adapter))
        for item in entry["variables"]:
            variable = own[item["name"]]
            variable.assign(ops.cast(arrays[item["key"]], variable.dtype))
        index = entry.get("method_index")
        if index is not None:
            adapter.method_spec = json.dumps(methods[index], sort_keys=True)
    for variable, value in train_also:
        variable.assign(ops.cast(value, variable.dtype))
    install_adapters(
        model,
        [(parent, layer, adapter) for parent, layer, adapter, _ in swaps],
        keep_trainable=[variable for variable, _ in train_also],
    )
    for variable, _ in train_also:
        variable.trainable = True
    adapters = [adapter for _, _, adapter, _ in swaps]
    return build_report(model, _method_for_report(methods), adapters)


def _method_for_report(methods):
    """The method spec object when the file holds one, else a description."""
    import keras_adaptive_lora as kal

    if len(methods) == 1:
        cls = getattr(kal, methods[0]["class_name"], None)
        if cls is not None:
            try:
                return cls.from_config(methods[0]["config"])
            except (TypeError, ValueError):
                pass
    return "loaded adapters" if not methods else ", ".join(m["class_name"] for m in methods)


# --------------------------------------------------------------------------
# Merged save and export
# --------------------------------------------------------------------------
class _TemporarilyMerged:
    """Context manager: adapters swapped for their merged layers, then back."""

    def __init__(self, model):
        self.model = model
        self.sites = []

    def __enter__(self):
        for parent, layer in walk(self.model):
            if isinstance(layer, AdapterLayer):
                self.sites.append((parent, layer, layer.merge()))
        for parent, adapter, merged in self.sites:
            swap_layer(parent, adapter, merged)
        _reset_compiled_functions(self.model)
        return self.model

    def __exit__(self, *exc):
        for parent, adapter, merged in reversed(self.sites):
            swap_layer(parent, merged, adapter)
        _reset_compiled_functions(self.model)
        return False


def save_merged(model, path):
    """Save `model` with its adapters merged as a `.keras` file.

    The merge is temporary: `model` keeps its adapters afterwards. The file
    holds plain `Dense`/`EinsumDense` layers, loads with
    `keras.saving.load_model` under any backend (import `keras_hub` first for
    keras-hub models) and is the input of `keras-adaptive-lora export`.
    """
    with _TemporarilyMerged(model):
        model.save(path)


def export_merged(model, path, **export_kwargs):
    """Write a TensorFlow SavedModel of `model` with its adapters merged.

    The merge is temporary: `model` keeps its adapters afterwards. The
    SavedModel's `serve` endpoint returns the adapted model's inference
    outputs (`model.export(path, format="tf_saved_model")` on the merged
    model). Needs the tensorflow backend. For a model trained under torch or
    jax, save it merged and export under tensorflow in another process:

    ```python
    kal.save_merged(model, "merged.keras")
    # then: KERAS_BACKEND=tensorflow python -m keras_adaptive_lora.cli \\
    #           export merged.keras saved_model_dir
    ```

    Args:
        model: a model with or without adapters.
        path: the SavedModel directory to write.
        **export_kwargs: passed to `model.export` (e.g. `input_signature`).
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise ValueError(
            f"export_merged writes a TensorFlow SavedModel and needs "
            f"KERAS_BACKEND=tensorflow; this process runs {backend!r}. Save the "
            "merged model with `keras_adaptive_lora.save_merged(model, "
            "'merged.keras')`, then run `KERAS_BACKEND=tensorflow python -m "
            "keras_adaptive_lora.cli export merged.keras OUT_DIR`."
        )
    with _TemporarilyMerged(model):
        model.export(path, format="tf_saved_model", verbose=False, **export_kwargs)
    return path
