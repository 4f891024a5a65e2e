"""The adapter file format: writing, reading and checking it (no model logic).

An adapter file is one `.npz` file (a zip of `.npy` arrays, readable with
`numpy.load`, no pickle) holding:

- `"<layer path>::<variable>"`: every variable of every adapter that is not
  a variable of the wrapped base layer: trainable factors and the
  non-trainable state (FlexLoRA masks, expansion counter and schedule step,
  SR-LoRA seed-generator state). `<variable>` is the variable's path relative
  to the adapter (`lora_a`, `spu_seed_generator/seed_generator_state`).
- `"train_also::<variable path>"`: the other trainable variables of the model
  (after `apply_adapters`, those of its `train_also` layers, e.g. a
  classifier head). Nothing else of the base model is stored.
- `"__metadata__"`: a JSON string: format version, library and Keras
  versions, the backend it was saved under, the method specs (registered
  name, class name, config, resolved targets) and one entry per adapted
  layer: path, adapter class (registered name), wrapped layer type, kernel
  shape, `d_in`, `d_out`, rank, the adapter's own config
  (`adapter_config()`: rank, alpha, ..., sinc grid, FlexLoRA capacity and
  seed) and its variables (key, shape, dtype).

Layers are keyed by `layer.path`, never by index. `write_adapter_file` and
`read_adapter_file` check the metadata the same way, so a file that could
not be read back is never written.
"""

import json
import zipfile

import numpy as np

from keras_adaptive_lora.saving._atomic import replacing_file

FORMAT = "keras_adaptive_lora.adapters"
FORMAT_VERSION = 1
METADATA_KEY = "__metadata__"
TRAIN_ALSO_PREFIX = "train_also::"
SEP = "::"


# --------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------
def write_adapter_file(path, metadata, arrays):
    """Write an adapter file: `arrays` (`{key: array}`) and `metadata` (a
    JSON-able dict) under `"__metadata__"`.

    `metadata` must have this library's `format` and `format_version` and
    pass the checks `read_adapter_file` makes (every array it names is in
    `arrays`); arrays must not need pickle. The file is written under a
    temporary name in the same folder and moved onto `path` only once
    complete: a failure (full disk, Ctrl-C) leaves a previous file at `path`
    as it was and no temporary behind.

    Args:
        path: the file to write (no suffix is added; `.npz` is conventional).
        metadata: the metadata dict (see the module docstring).
        arrays: `{key: array-like}`, the keys the metadata names.
    """
    if not isinstance(metadata, dict) or (
        metadata.get("format"), metadata.get("format_version")
    ) != (FORMAT, FORMAT_VERSION):
        raise ValueError(
            f"Cannot write adapter file {str(path)!r}: the metadata must be a dict "
            f"with format {FORMAT!r} and format_version {FORMAT_VERSION}."
        )
    if METADATA_KEY in arrays:
        raise ValueError(
            f"Cannot write adapter file {str(path)!r}: '{METADATA_KEY}' is reserved "
            "for the metadata and cannot be an array key."
        )
    payload = {key: np.asarray(value) for key, value in arrays.items()}
    for key, value in payload.items():
        if value.dtype.hasobject:
            raise ValueError(
                f"Cannot write adapter file {str(path)!r}: array {key!r} has dtype "
                "object, which cannot be read back without pickle."
            )
    _check_metadata(metadata, payload, path, writing=True)
    payload[METADATA_KEY] = np.asarray(json.dumps(metadata))
    with replacing_file(path) as temp:
        with open(temp, "xb") as f:
            np.savez(f, **payload)


# --------------------------------------------------------------------------
# Read
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


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
_LAYER_FIELDS = {
    "path": str,
    "adapter_class": str,
    "adapter_config": dict,
    "wrapped_type": str,
    "kernel_shape": list,
    "variables": list,
}


def _check_metadata(metadata, arrays, path, *, writing=False):
    """Raise a `ValueError` when the metadata lacks what loading needs."""

    def corrupted(what):
        if writing:
            return ValueError(f"Cannot write adapter file {str(path)!r}: {what}.")
        return ValueError(
            f"Adapter file {str(path)!r}: {what}. The file is corrupted or was "
            "edited; save the adapters again."
        )

    layers, methods = metadata.get("layers"), metadata.get("methods", [])
    if not isinstance(layers, list) or not layers:
        raise corrupted("its metadata has no list of adapted 'layers'")
    if not isinstance(methods, list):
        raise corrupted("its metadata's 'methods' is not a list")
    for i, spec in enumerate(methods):
        if not isinstance(spec, dict):
            raise corrupted(f"method entry {i} is not a JSON object")
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
            if not isinstance(item.get("key"), str) or item["key"] not in arrays:
                raise corrupted(f"{where}: the array {item.get('key')!r} of variable '{item['name']}' is missing")
    train_also = metadata.get("train_also", [])
    if not isinstance(train_also, list):
        raise corrupted("its metadata's 'train_also' is not a list")
    for item in train_also:
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise corrupted("a 'train_also' entry has no variable 'path'")
        if not isinstance(item.get("key"), str) or item["key"] not in arrays:
            raise corrupted(f"the array {item.get('key')!r} of variable '{item['path']}' is missing")
