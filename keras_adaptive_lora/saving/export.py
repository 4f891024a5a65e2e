"""Merged saving and export: `save_merged` (a `.keras` file) and
`export_merged` (a TensorFlow SavedModel), both through `temporarily_merged`,
which swaps every adapter for its merged plain layer and back.

Neither destroys a previous good file: the file or folder is written under a
temporary name next to the target and swapped in only once complete.
"""

import contextlib
import os
import subprocess
import sys
import tempfile

import keras

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.tree import reset_compiled_functions, swap_layer, walk
from keras_adaptive_lora.saving._atomic import _remove, replacing_file, replacing_folder

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


@contextlib.contextmanager
def _uncompiled(model):
    """`model` seen as not compiled inside the block (no optimizer state and
    no compile config saved), as it was afterwards."""
    if not getattr(model, "compiled", False):
        yield model
        return
    optimizer = model.optimizer
    model.optimizer, model.compiled = None, False
    try:
        yield model
    finally:
        model.optimizer, model.compiled = optimizer, True


def save_merged(model, path, *, include_optimizer=False):
    """Save `model` with its adapters merged as a `.keras` file.

    The merge is temporary: `model` keeps its adapters afterwards. The file
    holds plain `Dense`/`EinsumDense` layers, loads with
    `keras.saving.load_model` under any backend (import `keras_hub` first for
    keras-hub models) and is the input of `keras-adaptive-lora export`.

    The file is written under a temporary name in the same folder and moved
    onto `path` only once complete: a failed save leaves a previous file at
    `path` as it was.

    By default the file holds the model without its optimizer state or
    compile settings (the optimizer's slots belong to the adapter variables,
    which the merged file does not have; loading it would warn). Load it
    with `keras.saving.load_model(path)` and `compile` it to train further.

    Args:
        model: a model with or without adapters.
        path: the file to write, ending in `.keras` (or a legacy `.h5`).
        include_optimizer: also save the optimizer state and compile
            settings. Defaults to False.
    """
    name = str(path)
    if not name.endswith(_KERAS_SUFFIXES):
        raise ValueError(
            f"save_merged writes a `.keras` file; {name!r} does not end in "
            "`.keras`. To write a TensorFlow SavedModel use `export_merged`."
        )
    stripped = contextlib.nullcontext() if include_optimizer else _uncompiled(model)
    if _is_remote(name):  # no temporary sibling on remote stores
        with temporarily_merged(model), stripped:
            model.save(path)
        return
    suffix = next(s for s in _KERAS_SUFFIXES if name.endswith(s))
    with temporarily_merged(model), stripped, replacing_file(path, suffix=suffix) as temp:
        model.save(temp)


def export_merged(model, path, *, overwrite=False, **export_kwargs):
    """Write a TensorFlow SavedModel of `model` with its adapters merged.

    The merge is temporary: `model` keeps its adapters afterwards. The
    SavedModel's `serve` endpoint returns the adapted model's inference
    outputs (`model.export(path, format="tf_saved_model")` on the merged
    model); the tensorflow package must be installed. Under every backend:

    - tensorflow: in this process.
    - jax: in this process, through jax2tf (Keras's own jax export). Unknown
      sizes of the inputs get their own symbolic names, as Keras names them;
      when that export fails (keras-hub text models: `token_ids` and
      `padding_mask` must have the same length), it is retried once with
      each axis's unknown size shared by all inputs. Pass `input_signature`
      or `jax2tf_kwargs={"polymorphic_shapes": ...}` to decide yourself.
    - torch (Keras cannot export from torch): the merged model is saved to
      a temporary `.keras` file (`save_merged`) and exported by
      `keras-adaptive-lora export` in a tensorflow subprocess; custom layers
      must be importable there, and `export_kwargs` cannot be passed.

    The SavedModel is written to a temporary folder next to `path`, then
    swapped in. A non-empty folder at `path` is refused (a `ValueError`,
    nothing written) unless `overwrite=True`; then a previous SavedModel
    there is replaced as a whole, and stays as it was when the export fails.
    A folder holding anything but a SavedModel's entries is always refused,
    never deleted.

    Args:
        model: a model with or without adapters.
        path: the SavedModel directory to write.
        overwrite: replace a SavedModel already at `path`. Defaults to False.
        **export_kwargs: passed to `model.export` (e.g. `input_signature`).

    Returns:
        `path`.
    """
    if not isinstance(overwrite, bool):
        raise ValueError(f"`overwrite` must be True or False, got {overwrite!r}.")
    if not overwrite and os.path.isdir(path) and os.listdir(path):
        raise ValueError(
            f"Folder {str(path)!r} is not empty ({', '.join(map(repr, sorted(os.listdir(path))[:5]))}); "
            "export_merged writes a SavedModel into a new or empty folder. Pass "
            "`overwrite=True` (command line: `--overwrite`) to replace a previous "
            "SavedModel there, or choose another path; nothing was written."
        )
    if keras.backend.backend() == "torch":
        return _export_in_tensorflow(model, path, overwrite, export_kwargs)
    if _is_remote(path):  # no temporary sibling on remote stores
        with temporarily_merged(model):
            _export(model, path, export_kwargs)
        return path
    with replacing_folder(path, replaceable=_SAVED_MODEL_ENTRIES) as temp:
        with temporarily_merged(model):
            _export(model, temp, export_kwargs)
    return path


def _export(model, path, export_kwargs):
    """`model.export(path, format="tf_saved_model")`; under jax retried
    with shared unknown sizes when it fails (see `export_merged`)."""
    jax2tf = dict(export_kwargs.get("jax2tf_kwargs") or {})
    shapes = None
    if keras.backend.backend() == "jax" and "input_signature" not in export_kwargs:
        shapes = None if "polymorphic_shapes" in jax2tf else _shared_shapes(model)
    try:
        model.export(path, format="tf_saved_model", verbose=False, **export_kwargs)
    except Exception:
        if shapes is None:
            raise
        _remove(path)
        jax2tf["polymorphic_shapes"] = shapes
        retry = dict(export_kwargs, jax2tf_kwargs=jax2tf)
        model.export(path, format="tf_saved_model", verbose=False, **retry)


def _shared_shapes(model):
    """jax2tf shapes of a functional model's inputs (`[structure]`, as
    Keras's input signature) with unknown axis `i` named `d{i}` in every
    input, or None for a model with fewer than two inputs."""
    try:
        inputs = model.input
    except (AttributeError, ValueError):
        return None
    if len(keras.tree.flatten(inputs)) < 2:
        return None

    def shape(tensor):
        dims = [str(d) if d is not None else "batch" if i == 0 else f"d{i}"
                for i, d in enumerate(tensor.shape)]
        return f"({', '.join(dims)})"

    return [keras.tree.map_structure(shape, inputs)]


def _export_in_tensorflow(model, path, overwrite, export_kwargs):
    """Under torch: `save_merged` to a temporary `.keras` file, then
    `keras-adaptive-lora export` in a tensorflow subprocess."""
    if export_kwargs:
        raise ValueError(
            "export_merged under torch exports in a tensorflow subprocess, which "
            f"cannot take export arguments ({', '.join(sorted(export_kwargs))}). Save "
            "the merged model (`save_merged(model, 'merged.keras')`) and export it "
            "under KERAS_BACKEND=tensorflow (or jax) with your arguments."
        )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [root, *filter(None, [os.environ.get("PYTHONPATH")])]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=os.pathsep.join(paths))
    with tempfile.TemporaryDirectory() as folder:
        merged = os.path.join(folder, "merged.keras")
        save_merged(model, merged)
        command = [sys.executable, "-m", "keras_adaptive_lora.cli", "export", merged,
                   os.fspath(path), *(["--overwrite"] if overwrite else [])]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout or "").strip().splitlines()
        raise ValueError(
            "export_merged under torch exports in a tensorflow subprocess (Keras "
            f"cannot export from torch), which failed: {lines[-1] if lines else result.returncode}"
            " (it needs the tensorflow package: pip install "
            "'keras-adaptive-lora[tensorflow]'). Nothing was written."
        )
    return path
