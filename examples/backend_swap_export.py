"""Backend swap: train LoRA under torch, export a merged SavedModel under tensorflow.

1. `--stage train` (runs under `KERAS_BACKEND=torch`): loads a keras-hub ViT
   preset as an image classifier, puts LoRA on its query and value
   projections, fits the adapters and the new head a few steps, saves the model
   with the adapters merged as a `.keras` file (`save_merged`) and the torch
   model's outputs on a few probe images.
2. `--stage export` (runs under `KERAS_BACKEND=tensorflow`): the package's CLI,
   `python -m keras_adaptive_lora.cli export merged.keras saved_model/`.
3. `--stage check`: loads the SavedModel with `tf.saved_model.load`, runs its
   `serve` endpoint on the probe images and compares with the torch outputs
   (prints the max abs difference; fails above `--tolerance`, 1e-4).

`--stage all` (the default) runs the three in order, each under its backend:
the train stage in this process if it already runs torch, else in a child
process with `KERAS_BACKEND=torch`; the export stage always in a child process
with `KERAS_BACKEND=tensorflow`. Exits nonzero if a stage or the check fails.

    # real: a keras-hub ViT preset (needs network for the download)
    python examples/backend_swap_export.py --preset vit_base_patch16_224_imagenet21k
    # smoke: a tiny ViT saved as a local preset (used by the tests)
    python examples/backend_swap_export.py --smoke

Both modes run the same code; the smoke mode only makes the preset locally.
The images are synthetic in both modes (this example is about moving a model
between backends, not about accuracy), already in the model's input range:
the SavedModel takes preprocessed images, like the Keras model's `call`. The
last line of the `all` and `check` stages is `SUMMARY {json}` (read by
tests/test_examples.py).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

STAGES = ("all", "train", "export", "check")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=STAGES, default="all")
    parser.add_argument("--smoke", action="store_true", help="tiny local preset (seconds)")
    parser.add_argument("--preset", default="vit_base_patch16_224_imagenet21k",
                        help="a keras-hub ViT preset name or a local preset folder")
    parser.add_argument("--workdir", default=None,
                        help="folder for merged.keras, probe.npz and saved_model/ "
                             "(default: a new temporary folder)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest accepted |serve - torch| output difference")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.smoke:
        args.rank, args.num_classes, args.examples, args.batch_size = 2, 3, 8, 8
    return args


def paths(workdir):
    return {
        "merged": os.path.join(workdir, "merged.keras"),
        "probe": os.path.join(workdir, "probe.npz"),
        "saved_model": os.path.join(workdir, "saved_model"),
        "preset": os.path.join(workdir, "tiny_vit_preset"),
    }


def make_tiny_preset(directory):
    """A tiny ViT backbone saved as a keras-hub preset."""
    import keras_hub

    keras_hub.models.ViTBackbone(
        image_shape=(32, 32, 3), patch_size=(8, 8), num_layers=1, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    ).save_to_preset(directory)
    return directory


def train(args, files):
    """Adapt, fit, `save_merged`, and keep the torch outputs on probe images."""
    import keras
    import keras_hub

    import keras_adaptive_lora as kal

    backend = keras.backend.backend()
    if backend != "torch":
        raise SystemExit(f"the train stage runs under KERAS_BACKEND=torch, not {backend!r}")
    keras.utils.set_random_seed(args.seed)
    preset = make_tiny_preset(files["preset"]) if args.smoke else args.preset
    backbone = keras_hub.models.ViTBackbone.from_preset(preset)
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=args.num_classes, preprocessor=None
    )
    report = kal.apply_adapters(model, kal.LoRA(rank=args.rank), train_also=["predictions"])
    print(report)

    rng = np.random.default_rng(args.seed)
    images = rng.uniform(-1, 1, (args.examples, *backbone.image_shape)).astype("float32")
    labels = rng.integers(0, args.num_classes, args.examples).astype("int32")
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = model.fit(images, labels, batch_size=args.batch_size, epochs=args.epochs,
                        verbose=2)
    probe = images[: min(8, args.examples)]
    logits = np.asarray(keras.ops.convert_to_numpy(model(probe, training=False)))
    kal.save_merged(model, files["merged"])
    np.savez(files["probe"], images=probe, logits=logits)
    print(f"[torch] trained: loss {history.history['loss'][0]:.4f} -> "
          f"{history.history['loss'][-1]:.4f}; wrote {files['merged']} (adapters merged) "
          f"and the torch outputs on {len(probe)} probe images")


def run_stage(command, backend):
    """Run `command` with `KERAS_BACKEND=backend`; raise on a nonzero exit."""
    env = dict(os.environ, KERAS_BACKEND=backend)
    print(f"[{backend}] $ {' '.join(command)}", flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode:
        raise SystemExit(f"stage failed under {backend}: {' '.join(command)} "
                         f"(exit {result.returncode})")


def export(files):
    """The package's CLI under tensorflow: merged .keras -> SavedModel."""
    run_stage([sys.executable, "-m", "keras_adaptive_lora.cli", "export", files["merged"],
               files["saved_model"], "--overwrite"], "tensorflow")  # a rerun replaces its own export


def check(args, files):
    """Compare the SavedModel's `serve` outputs with the torch outputs."""
    import tensorflow as tf

    probe = np.load(files["probe"])
    saved_model = tf.saved_model.load(files["saved_model"])  # keep it alive while serving
    served = np.asarray(saved_model.serve(tf.constant(probe["images"])))
    diff = float(np.abs(served - probe["logits"]).max())
    ok = diff <= args.tolerance
    print(f"SavedModel serve vs torch model on {len(probe['images'])} probe images: "
          f"max |difference| = {diff:.2e} (tolerance {args.tolerance:.0e}) -> "
          f"{'OK' if ok else 'FAILED'}")
    failures = [] if ok else [f"max |serve - torch| = {diff:.2e} > {args.tolerance:.0e}"]
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    print("SUMMARY " + json.dumps({"max_abs_diff": diff, "outputs_shape": list(served.shape),
                                   "failures": failures}), flush=True)
    return 1 if failures else 0


def main(argv=None):
    args = parse_args(argv)
    if args.workdir is None:  # a temporary work folder, removed at the end
        with tempfile.TemporaryDirectory(prefix="backend_swap_") as workdir:
            return run(args, workdir)
    os.makedirs(args.workdir, exist_ok=True)
    return run(args, args.workdir)


def run(args, workdir):
    files = paths(workdir)
    if args.stage == "train":
        train(args, files)
        return 0
    if args.stage == "export":
        export(files)
        return 0
    if args.stage == "check":
        return check(args, files)

    print(f"work folder: {workdir}")
    if os.environ.get("KERAS_BACKEND") == "torch":
        train(args, files)
    else:
        forwarded = ["--workdir", workdir, "--rank", str(args.rank), "--num-classes",
                     str(args.num_classes), "--examples", str(args.examples), "--batch-size",
                     str(args.batch_size), "--epochs", str(args.epochs), "--seed",
                     str(args.seed), "--preset", args.preset]
        run_stage([sys.executable, os.path.abspath(__file__), "--stage", "train",
                   *(["--smoke"] if args.smoke else []), *forwarded], "torch")
    export(files)
    return check(args, files)


if __name__ == "__main__":
    sys.exit(main())
