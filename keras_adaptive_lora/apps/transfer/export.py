"""Export of the transfer job's best method: merged `.keras`, TensorFlow
SavedModel (in a `KERAS_BACKEND=tensorflow` subprocess under the other
backends) and a probe of inputs and logits to check the export against."""

import os
import subprocess
import sys

import keras
import numpy as np

import keras_adaptive_lora
from keras_adaptive_lora.saving import export_merged, save_merged


def export_best(model, output_dir, probe, logits, log=print, note=""):
    """Save `model` merged (`.keras`), export it as a TensorFlow SavedModel
    and write `probe` (a few normalized inputs) with `model`'s `logits` for
    them, to check the export against.

    Returns `(merged_path, saved_model_path, probe_path, error)`; `error`
    is None when the SavedModel was written. `note` (e.g. which method and
    seed) goes into the log line.
    """
    what = f"the best model ({note}) merged" if note else "the best model merged"
    merged_path = os.path.join(output_dir, "best_merged.keras")
    saved_path = os.path.join(output_dir, "best_saved_model")
    probe_path = os.path.join(output_dir, "export_probe.npz")
    np.savez(probe_path, inputs=probe, logits=logits)
    save_merged(model, merged_path)
    if keras.backend.backend() == "tensorflow":
        export_merged(model, saved_path, overwrite=True)  # this run's own output folder
        log(f"exported {what}: {saved_path} (SavedModel), {merged_path}")
        return merged_path, saved_path, probe_path, None
    command = [
        sys.executable, "-m", "keras_adaptive_lora.cli", "export", merged_path, saved_path, "--overwrite",
    ]
    # The parent folder of the `keras_adaptive_lora` package, so the
    # subprocess imports this copy of it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(keras_adaptive_lora.__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=path)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        error = f"export subprocess exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
        log(f"SavedModel export FAILED: {error}")
        return merged_path, None, probe_path, error
    log(
        f"exported {what}: {saved_path} (SavedModel, written by a KERAS_BACKEND=tensorflow "
        f"subprocess), {merged_path}"
    )
    return merged_path, saved_path, probe_path, None
