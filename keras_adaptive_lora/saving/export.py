"""Merged saving and export: `save_merged` (a `.keras` file) and
`export_merged` (a TensorFlow SavedModel), both through `temporarily_merged`,
which swaps every adapter for its merged plain layer and back.

Neither destroys a previous good file: the file or folder is written under a
temporary name next to the target and swapped in only once complete.
"""

import contextlib
import os

import keras

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.tree import reset_compiled_functions, swap_layer, walk
from keras_adaptive_lora.saving._atomic import replacing_file, replacing_folder

#: The suffixes `model.save` writes a file for.
_KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: What `model.export(format="tf_saved_model")` writes in its folder: the only
#: entries an existing export folder may hold to be replaced.
_SAVED_MODEL_ENTRIES = (
    "saved_model.pb", "saved_model.pbtxt", "fingerprint.pb", "keras_metadata.pb",
    "variables", "assets",
)


@contextlib.contextmanager
def temporarily_merged(model):
    """Context manager: every adapter of `model` swapped for its merged
    layer (`adapter.merge()`) inside the block, and back afterwards (also on
    error). Yields `model`."""
    sites = [
        (parent, layer, layer.merge())
        for parent, layer in walk(model)
        if isinstance(layer, AdapterLayer)
    ]
    swapped = []
    try:
        for parent, adapter, merged in sites:
            swap_layer(parent, adapter, merged)
            swapped.append((parent, adapter, merged))
        reset_compiled_functions(model)
        yield model
    finally:
        for parent, adapter, merged in reversed(swapped):
            swap_layer(parent, merged, adapter)
        reset_compiled_functions(model)


def _is_remote(path):
    return "://" in str(path)


def save_merged(model, path):
    """Save `model` with its adapters merged as a `.keras` file.

    The merge is temporary: `model` keeps its adapters afterwards. The file
    holds plain `Dense`/`EinsumDense` layers, loads with
    `keras.saving.load_model` under any backend (import `keras_hub` first for
    keras-hub models) and is the input of `keras-adaptive-lora export`.

    The file is written under a temporary name in the same folder and moved
    onto `path` only once complete: a failed save leaves a previous file at
    `path` as it was.

    Args:
        model: a model with or without adapters.
        path: the file to write, ending in `.keras` (or a legacy `.h5`).
    """
    name = str(path)
    if not name.endswith(_KERAS_SUFFIXES):
        raise ValueError(
            f"save_merged writes a `.keras` file; {name!r} does not end in "
            "`.keras`. To write a TensorFlow SavedModel use `export_merged`."
        )
    if _is_remote(name):  # no temporary sibling on remote stores
        with temporarily_merged(model):
            model.save(path)
        return
    suffix = next(s for s in _KERAS_SUFFIXES if name.endswith(s))
    with temporarily_merged(model), replacing_file(path, suffix=suffix) as temp:
        model.save(temp)


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

    The SavedModel is written to a temporary folder next to `path`, then
    swapped in: a previous SavedModel at `path` is replaced as a whole, and
    stays as it was when the export fails. A folder at `path` holding
    anything but a SavedModel's entries is refused (a `ValueError`), not
    deleted.

    Args:
        model: a model with or without adapters.
        path: the SavedModel directory to write.
        **export_kwargs: passed to `model.export` (e.g. `input_signature`).

    Returns:
        `path`.
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
    if _is_remote(path):  # no temporary sibling on remote stores
        with temporarily_merged(model):
            model.export(path, format="tf_saved_model", verbose=False, **export_kwargs)
        return path
    with replacing_folder(path, replaceable=_SAVED_MODEL_ENTRIES) as temp:
        with temporarily_merged(model):
            model.export(temp, format="tf_saved_model", verbose=False, **export_kwargs)
    return path
