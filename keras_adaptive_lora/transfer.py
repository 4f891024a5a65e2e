"""The main job: few-shot transfer of a keras-hub ViT with every method.

`keras-adaptive-lora transfer` (or `python -m keras_adaptive_lora.transfer`,
or `run_transfer(...)` from Python) adapts one pretrained ViT backbone to a
few-shot image classification task with each method: `linear` (probe: frozen
backbone, trained head), `full` (full fine-tune), `lora`, `sr-lora`
(`StableRankLoRA`), `flexlora` (`FlexLoRA` + `FlexLoRAScheduler`) and `sinc`
(`SincLoRA`, LR-LoRA), plus the optional reference `scratch` (full training of
the same architecture from a random init). Every method starts from the same
backbone weights and the same head init (a new `Dense` on the class token of a
`keras_hub.models.ViTImageClassifier`; the head is trained by every method).

It prints a progress line per method (and Keras progress bars with
`verbose=1`), then a table (test and validation accuracy, trainable
parameters, ms per training step), and writes to `--output-dir`:

- `results.json`: the configuration, the data, one record per method (with
  the per-layer ranks of the adapters), the best method and the files below;
- `transfer.png`: accuracy vs trainable parameters (log x) per method, and
  heatmaps of the per-layer rank allocation of SR-LoRA and FlexLoRA (blocks x
  projections, after training);
- the method with the best validation accuracy (ties: fewer trainable
  parameters), adapters merged: `best_merged.keras` (`save_merged`) and a
  TensorFlow SavedModel `best_saved_model/` (`export_merged` under the
  tensorflow backend; under torch or jax, `keras-adaptive-lora export` in a
  `KERAS_BACKEND=tensorflow` subprocess), plus `export_probe.npz` (a few
  test inputs and the adapted model's logits, to check the export against).
  The exported model takes images already normalized as in `results.json`
  (`input.scale`, `input.offset`).

Two ways to get the backbone and the data, one code path after that:

- Offline (default, no network): a small `ViTBackbone` is pre-trained inside
  the run on a generated source task (`keras_adaptive_lora.synthetic`), saved
  with `save_to_preset` into the output directory with a `ViTImageConverter`,
  and loaded back with `from_preset`; the target task is generated with a
  domain gap (`synthetic.target_task`) and sampled with
  `data.from_arrays`.
- Real: `--preset` (a keras-hub ViT preset name such as
  `vit_base_patch16_224_imagenet21k`, or a local preset folder) and/or
  `--dataset` (a tfds image dataset, sampled VTAB-1k style by
  `data.few_shot_splits`). Images are normalized with the preset's image
  converter (`scale`, `offset`; keras-hub's ViT presets map `[0, 255]` to
  `[-1, 1]`).

Training (SR-LoRA paper, section 4), the same for every method: AdamW,
learning rate 1e-3, weight decay 5e-2, cosine decay to 0 after a 10% linear
warmup, batch size 4, 20 epochs (offline: 60, see `OFFLINE`); each
method's own default targets and scaling (see `method_spec`). The offline pre-training uses AdamW with
learning rate 4e-3 and batch size 64 (`OFFLINE`).

Each method keeps its weights after the last epoch (no per-epoch
checkpoint selection); the validation split only picks the exported method.
"""

import argparse
import gc
import json
import math
import os
import re
import subprocess
import sys
import time

import keras
import keras_hub
import numpy as np

from keras_adaptive_lora import synthetic
from keras_adaptive_lora.adapters.flexlora import FlexLoRA
from keras_adaptive_lora.adapters.lora import LoRA
from keras_adaptive_lora.adapters.sinc import SincLoRA
from keras_adaptive_lora.adapters.stable_rank import StableRankLoRA
from keras_adaptive_lora.callbacks import FlexLoRAScheduler
from keras_adaptive_lora.diagnostics import update_stable_ranks
from keras_adaptive_lora.io import export_merged, save_merged
from keras_adaptive_lora.surgery import apply_adapters, find_adapters

# The compared methods, in table order (the default selection).
METHODS = ("linear", "full", "lora", "sr-lora", "flexlora", "sinc")
# A reference row: the same architecture trained from a random init.
REFERENCE_METHODS = ("scratch",)
TITLES = {
    "linear": "linear probe",
    "full": "full fine-tune",
    "lora": "LoRA",
    "sr-lora": "SR-LoRA",
    "flexlora": "FlexLoRA",
    "sinc": "LR-LoRA (sinc)",
    "scratch": "from scratch",
}
# Methods whose per-layer rank allocation is plotted.
RANK_PLOT_METHODS = ("sr-lora", "flexlora")
HEAD = "predictions"  # the Dense head of ViTImageClassifier

# The offline backbone and source task (default, and `--quick`).
OFFLINE = {
    "default": {
        "image_size": 32,
        "patch_size": 8,
        "num_layers": 3,
        "num_heads": 4,
        "hidden_dim": 64,
        "mlp_dim": 128,
        "source_images": 24000,
        "source_val_images": 1000,
        "pretrain_epochs": 8,
        "pretrain_batch_size": 64,
        "pretrain_learning_rate": 4e-3,
        "shots": 10,
        # 900 steps: at 20 epochs (300 steps) the linear probe and the SR-LoRA
        # and FlexLoRA adapters are still far from converged on this task.
        "epochs": 60,
        "batch_size": 4,
        "test_size": 600,
    },
    "quick": {
        "image_size": 16,
        "patch_size": 8,
        "num_layers": 1,
        "num_heads": 2,
        "hidden_dim": 16,
        "mlp_dim": 32,
        "source_images": 64,
        "source_val_images": 16,
        "pretrain_epochs": 1,
        "pretrain_batch_size": 32,
        "pretrain_learning_rate": 3e-3,
        "shots": 2,
        "epochs": 1,
        "batch_size": 4,
        "test_size": 24,
    },
}
# Real mode (a preset and/or a tfds dataset): the SR-LoRA paper's settings.
REAL = {"shots": 1, "epochs": 20, "batch_size": 4}
TARGET_DESCRIPTION = "shapes in a stain-like imaging domain"
SOURCE_SEED = 0  # the generated data are fixed, like a real dataset;
TARGET_SEED = 1  # `seed` chooses the few-shot sample and the inits.
EVAL_BATCH_SIZE = 64
PROBE_SIZE = 8
ROLE_ORDER = ("query", "key", "value", "attention_output", "dense_1", "dense_2")


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------
def _positive_int(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _positive_float(name, value, allow_zero=False):
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(
            f"`{name}` must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}."
        )
    return value


def parse_methods(methods, *, offline=True):
    """The method names to run, in table order, without duplicates.

    Args:
        methods: None or `"all"` (the six methods, plus `scratch` when
            `offline`), a comma-separated string, or a list of names from
            `METHODS + REFERENCE_METHODS`.
        offline: whether the backbone is pre-trained in the run (then the
            default adds the `scratch` reference). Defaults to True.

    Returns:
        A tuple of method names.
    """
    default = METHODS + (REFERENCE_METHODS if offline else ())
    if methods is None:
        return default
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    names = []
    for name in methods:
        if not isinstance(name, str):
            raise ValueError(f"Method names must be strings, got {name!r}.")
        expanded = default if name.lower() == "all" else (name.lower(),)
        for item in expanded:
            if item not in METHODS + REFERENCE_METHODS:
                raise ValueError(
                    f"Unknown method {item!r}. Choose from {', '.join(METHODS + REFERENCE_METHODS)} "
                    "(comma-separated), or 'all'."
                )
            if item not in names:
                names.append(item)
    if not names:
        raise ValueError(f"No method selected; choose from {', '.join(METHODS + REFERENCE_METHODS)}.")
    order = METHODS + REFERENCE_METHODS
    return tuple(sorted(names, key=order.index))


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------
class TransferResult:
    """What `run_transfer` did.

    Attributes:
        rows: one dict per method, in table order: `method`, `title`,
            `test_accuracy`, `val_accuracy`, `train_accuracy`,
            `trainable_params`, `total_params`, `ms_per_step`, `steps`,
            `train_seconds`, `ranks` (`{layer path: rank}` of the adapters,
            empty for `linear`/`full`/`scratch`), and per method extras
            (`update_stable_ranks` for `sinc`, `initial_rank` for
            `flexlora`).
        best: the method with the best validation accuracy (exported).
        best_model: that method's trained model (adapters unmerged).
        config: the resolved options.
        output_dir: where the files are.
        results_path, plot_path, merged_path, saved_model_path, probe_path:
            the files written (None when not written).
        export_error: why the SavedModel export failed, or None.
    """

    def __init__(self, **fields):
        self.rows = fields.pop("rows")
        self.best = fields.pop("best")
        self.best_model = fields.pop("best_model")
        self.config = fields.pop("config")
        self.output_dir = fields.pop("output_dir")
        self.results_path = fields.pop("results_path", None)
        self.plot_path = fields.pop("plot_path", None)
        self.merged_path = fields.pop("merged_path", None)
        self.saved_model_path = fields.pop("saved_model_path", None)
        self.probe_path = fields.pop("probe_path", None)
        self.export_error = fields.pop("export_error", None)
        self.extra = fields

    def row(self, method):
        """The row of `method`."""
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(f"No row for method {method!r}; ran {[r['method'] for r in self.rows]}.")

    def table(self):
        """The results table as text."""
        return format_table(self.rows, best=self.best)

    def __repr__(self):
        return self.table()


def format_table(rows, *, best=None):
    """A text table: method, test / validation accuracy, trainable
    parameters (and their share of the model), ms per training step."""
    headers = ("method", "test acc", "val acc", "trainable params", "% of model", "ms/step")
    cells = []
    for r in rows:
        mark = " *" if r["method"] == best else ""
        cells.append(
            (
                f"{r['method']}{mark}",
                f"{r['test_accuracy']:.3f}",
                f"{r['val_accuracy']:.3f}",
                f"{r['trainable_params']:,}",
                f"{100.0 * r['trainable_params'] / max(r['total_params'], 1):.2f}",
                f"{r['ms_per_step']:.1f}",
            )
        )
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        )

    rule = line(["-" * w for w in widths])
    out = [line(headers), rule, *(line(c) for c in cells), rule]
    if best is not None:
        out.append("* best validation accuracy (exported)")
    return "\n".join(out)


# --------------------------------------------------------------------------
# Backbone and image normalization
# --------------------------------------------------------------------------
def pretrain_backbone(directory, *, settings, seed=SOURCE_SEED, verbose=1, log=print):
    """Pre-train a small ViT on the generated source task; save it as a preset.

    Writes `ViTBackbone.save_to_preset(directory)` and a `ViTImageConverter`
    (the keras-hub ViT normalization, `[0, 255] -> [-1, 1]`) into
    `directory`, so it loads back with `from_preset(directory)` like any
    keras-hub preset.

    Args:
        directory: the preset folder to write.
        settings: a dict like `OFFLINE["default"]` (architecture, source task
            size, epochs, batch size, learning rate).
        seed: seed of the source images and of the init. Defaults to 0.
        verbose: Keras `fit` verbosity. Defaults to 1.
        log: where progress lines go. Defaults to `print`.

    Returns:
        A dict: the source task's validation accuracy, steps and seconds.
    """
    size = settings["image_size"]
    start = time.perf_counter()
    images, labels, names = synthetic.source_task(settings["source_images"], seed=seed, image_size=size)
    val_images, val_labels, _ = synthetic.source_task(
        settings["source_val_images"], seed=seed + 1, image_size=size
    )
    # Kept as uint8 (a quarter of the memory), normalized in the pipeline.
    images, val_images = (np.round(a).astype(np.uint8) for a in (images, val_images))
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(size, size), scale=1.0 / 127.5, offset=-1.0
    )
    scale, offset = _normalization(converter)
    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(size, size, 3),
        patch_size=(settings["patch_size"], settings["patch_size"]),
        num_layers=settings["num_layers"],
        num_heads=settings["num_heads"],
        hidden_dim=settings["hidden_dim"],
        mlp_dim=settings["mlp_dim"],
    )
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=len(names), activation=None
    )
    batch = settings["pretrain_batch_size"]
    steps = settings["pretrain_epochs"] * math.ceil(len(images) / batch)
    model.compile(
        optimizer=keras.optimizers.AdamW(
            _cosine_schedule(settings["pretrain_learning_rate"], steps), weight_decay=0.05
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    source_images = len(images)
    log(
        f"pre-training a ViT ({backbone.count_params():,} params, {settings['num_layers']} "
        f"layers, hidden {settings['hidden_dim']}, {size}x{size} images, patch "
        f"{settings['patch_size']}) on the generated source task: {source_images} images, "
        f"{len(names)} classes, {steps} steps"
    )
    data = _import_data()
    tf = _import_tf()
    def pipeline(x, y):
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        return _normalized(dataset.map(_to_float), scale, offset)

    train = data.batched(pipeline(images, labels), batch, shuffle=True, seed=seed)
    del images
    model.fit(train, epochs=settings["pretrain_epochs"], verbose=verbose, shuffle=False)
    val = model.evaluate(
        data.batched(pipeline(val_images, val_labels), EVAL_BATCH_SIZE), verbose=0, return_dict=True
    )
    os.makedirs(directory, exist_ok=True)
    backbone.save_to_preset(directory)
    keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter).save_to_preset(directory)
    seconds = time.perf_counter() - start
    log(
        f"pre-trained in {seconds:.1f}s: source-task validation accuracy "
        f"{val['accuracy']:.3f}; saved as a keras-hub preset in {directory} (reuse it "
        f"with --preset {directory})"
    )
    return {
        "preset": directory,
        "source_classes": list(names),
        "source_images": source_images,
        "steps": steps,
        "seconds": seconds,
        "source_val_accuracy": float(val["accuracy"]),
        "architecture": {k: settings[k] for k in (
            "image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")},
    }


def _normalization(converter):
    """`(scale, offset)` float32 arrays (broadcast over channels) of an
    image converter; missing values mean identity."""
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    return np.asarray(scale, "float32"), np.asarray(offset, "float32")


def load_backbone(preset):
    """`keras_hub.models.Backbone.from_preset(preset)`, checked to be a ViT."""
    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
    except Exception as error:  # a download, a missing folder, a bad config
        raise ValueError(
            f"Could not load the keras-hub preset {preset!r} ({type(error).__name__}: "
            f"{error}). A preset name needs network access to download it (Kaggle); "
            "offline, pass a local preset folder, or leave --preset out to pre-train a "
            "small ViT in the run."
        ) from error
    if not isinstance(backbone, keras_hub.models.ViTBackbone):
        raise ValueError(
            f"Preset {preset!r} holds a {type(backbone).__name__}; the transfer job needs "
            "a ViT (keras_hub.models.ViTBackbone), e.g. 'vit_base_patch16_224_imagenet21k'."
        )
    return backbone


def load_normalization(preset, log=print):
    """`(scale, offset)` of the preset's image converter.

    Falls back to the keras-hub ViT presets' normalization (`[0, 255] ->
    [-1, 1]`) when the preset has no image converter.
    """
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
    except Exception as error:  # no preprocessor saved with the preset
        log(
            f"note: preset {preset!r} has no image converter ({type(error).__name__}); "
            "using the keras-hub ViT normalization x / 127.5 - 1"
        )
        return np.float32(1.0 / 127.5), np.float32(-1.0)
    return _normalization(converter)


def _cosine_schedule(learning_rate, total_steps, warmup_fraction=0.1):
    """Linear warmup over `warmup_fraction` of the steps, then cosine decay to 0."""
    total_steps = max(int(total_steps), 1)
    warmup = int(round(warmup_fraction * total_steps))
    if warmup == 0:
        return keras.optimizers.schedules.CosineDecay(learning_rate, total_steps)
    return keras.optimizers.schedules.CosineDecay(
        0.0,
        max(total_steps - warmup, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup,
    )


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------
def _import_data():
    from keras_adaptive_lora import data  # tf.data, imported lazily

    return data


def _import_tf():
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "The transfer job feeds `fit` with tf.data pipelines and needs TensorFlow: "
            "pip install 'keras-adaptive-lora[tensorflow]'."
        ) from None
    return tf


def load_tfds_splits(dataset, *, shots, seed, val_per_class, test_size, image_size, data_dir,
                     train_split, test_split):
    """`data.few_shot_splits(...)`, with an actionable `ValueError` when the
    dataset cannot be fetched or read (no network, a missing package)."""
    data = _import_data()
    try:
        return data.few_shot_splits(
            dataset,
            shots=shots,
            seed=seed,
            val_per_class=val_per_class,
            test_size=test_size,
            image_size=image_size,
            data_dir=data_dir,
            train_split=train_split,
            test_split=test_split,
        )
    except ValueError:
        raise  # already actionable: unknown name, too few examples, bad feature
    except Exception as error:  # downloads without network, missing packages
        raise ValueError(
            f"Could not load the tfds dataset {dataset!r} ({type(error).__name__}: "
            f"{error}). Real mode downloads it (it needs network access and the `data` "
            "extra: pip install 'keras-adaptive-lora[data]'), or reads a prepared copy "
            "from --data-dir. Without network, leave --dataset out to use the "
            "generated target task."
        ) from error


def synthetic_splits(*, shots, seed, val_per_class, test_size, image_size):
    """The generated target task, sampled like a dataset with
    `data.from_arrays` (the image pool is fixed; `seed` picks the shots)."""
    data = _import_data()
    classes = len(synthetic.TARGET_CLASSES)
    per_class = max(shots, 10) + max(val_per_class, 10) + math.ceil(test_size / classes)
    images, labels, names = synthetic.target_task(
        classes * per_class, seed=TARGET_SEED, image_size=image_size
    )
    return data.from_arrays(
        images,
        labels,
        shots=shots,
        seed=seed,
        val_per_class=val_per_class,
        test_size=test_size,
        class_names=names,
    )


def _to_float(image, label):
    return _import_tf().cast(image, "float32"), label


def _normalized(dataset, scale, offset):
    """`dataset` of `(image in [0, 255], label)` with `image * scale + offset`."""
    tf = _import_tf()
    scale, offset = tf.constant(scale), tf.constant(offset)

    def normalize(image, label):
        return image * scale + offset, label

    return dataset.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)


# --------------------------------------------------------------------------
# One method
# --------------------------------------------------------------------------
def method_spec(method, *, rank, seed, alpha=None):
    """The adapter method spec of an adapter method name (None for
    `linear`, `full` and `scratch`). Each uses its paper's default targets
    and, with `alpha=None`, its own default scaling (`s = 1` for LoRA,
    FlexLoRA and LR-LoRA; `s = 1 / r` for SR-LoRA, as its reference code)."""
    scale = {} if alpha is None else {"alpha": alpha}
    if method == "lora":
        return LoRA(rank=rank, **scale)
    if method == "sr-lora":
        return StableRankLoRA(seed=seed, **scale)
    if method == "flexlora":
        return FlexLoRA(rank=rank, seed=seed, **scale)
    if method == "sinc":
        return SincLoRA(rank=rank, **scale)
    return None


def flexlora_schedule(total_steps):
    """FlexLoRA scheduler settings for a run of `total_steps`, scaled from the
    paper's VTAB setting (warmup and final phases ~15% each, a reallocation
    every ~3% of the steps), or None when the run is too short (< 2 steps)."""
    if total_steps < 2:
        return None
    warmup = final = total_steps * 15 // 100
    interval = max(1, total_steps * 3 // 100)
    if warmup + interval >= total_steps - final:
        warmup, final, interval = 0, 0, 1
    return {"warmup_steps": warmup, "final_steps": final, "interval": interval}


class _StepTimer(keras.callbacks.Callback):
    """Steady-state time per training step: from the end of the first step
    (which traces and compiles) to the end of training, over the other
    steps. With a single step, that step's time, compile included."""

    def on_train_begin(self, logs=None):
        self.begin, self.first, self.end, self.steps = time.perf_counter(), None, None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.first is None:
            self.first = time.perf_counter()

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()

    def ms_per_step(self):
        """`(milliseconds, includes_compile)`."""
        if self.steps > 1:
            return 1000.0 * (self.end - self.first) / (self.steps - 1), False
        return 1000.0 * (self.end - self.begin) / max(self.steps, 1), True


def _count(variables):
    return int(sum(int(np.prod(v.shape)) for v in variables))


def _role(path):
    return path.rsplit("/", 1)[-1]


def _block(path):
    match = re.search(r"transformer_block_(\d+)", path)
    return int(match.group(1)) if match else path.rsplit("/", 1)[0]


def adapt(method, *, preset, num_classes, train, evaluation, steps_per_epoch, options, log=print):
    """Adapt the preset's backbone with one method and evaluate it.

    Args:
        method: a name from `METHODS + REFERENCE_METHODS`.
        preset: the backbone's keras-hub preset (name or folder).
        num_classes: classes of the task.
        train: the unbatched training dataset (normalized). Each method
            batches and shuffles it afresh, so that every method sees the
            same sequence of shuffled batches.
        evaluation: an `Evaluation` (validation and test examples).
        steps_per_epoch: training steps per epoch.
        options: dict with `seed`, `epochs`, `batch_size`, `rank`, `alpha`,
            `learning_rate`, `weight_decay`, `verbose`, `index`, `count`.
        log: function receiving progress lines. Defaults to `print`.

    Returns:
        `(row, model, probe_logits)`: the table row (see
        `TransferResult.rows`), the trained model, and its logits for the
        first `PROBE_SIZE` test examples (`evaluation.probe`).
    """
    seed, epochs = options["seed"], options["epochs"]
    keras.utils.set_random_seed(seed)  # the same head init for every method
    backbone = load_backbone(preset)
    if method == "scratch":
        backbone = type(backbone).from_config(backbone.get_config())
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=num_classes, activation=None
    )
    total_steps = epochs * steps_per_epoch
    callbacks, row = [], {"method": method, "title": TITLES[method], "ranks": {}}
    spec = method_spec(method, rank=options["rank"], seed=seed, alpha=options["alpha"])
    if method == "linear":
        backbone.trainable = False
    elif spec is not None:
        apply_adapters(model, spec, train_also=[HEAD])
        if method == "flexlora":
            row["initial_rank"] = options["rank"]
            schedule = flexlora_schedule(total_steps)
            if schedule is None:
                log("  note: a single training step leaves no room for FlexLoRA rank moves")
            else:
                callbacks.append(
                    FlexLoRAScheduler(
                        total_steps,
                        b0=4,
                        verbose=2 if options["verbose"] >= 2 else 0,
                        **schedule,
                    )
                )
                row["schedule"] = schedule
    model.compile(
        optimizer=keras.optimizers.AdamW(
            _cosine_schedule(options["learning_rate"], total_steps),
            weight_decay=options["weight_decay"],
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    row["trainable_params"] = _count(model.trainable_weights)
    row["total_params"] = _count(model.weights)
    log(
        f"[{options['index']}/{options['count']}] {method} ({TITLES[method]}): "
        f"{row['trainable_params']:,} trainable of {row['total_params']:,} params, "
        f"{total_steps} steps"
    )
    batches = _import_data().batched(train, options["batch_size"], shuffle=True, seed=seed)
    timer = _StepTimer()
    start = time.perf_counter()
    history = model.fit(
        batches,
        epochs=epochs,
        callbacks=[timer, *callbacks],
        verbose=options["verbose"],
        shuffle=False,  # `batches` is shuffled by tf.data, anew each epoch
    )
    row["train_seconds"] = time.perf_counter() - start
    row["steps"] = total_steps
    row["ms_per_step"], row["ms_per_step_includes_compile"] = timer.ms_per_step()
    row["train_accuracy"] = float(history.history["accuracy"][-1])
    # One `predict` over validation + test (one compiled function per model).
    logits = np.asarray(keras.ops.convert_to_numpy(model.predict(evaluation.dataset, verbose=0)))
    correct = np.argmax(logits, axis=-1) == evaluation.labels
    row["val_accuracy"] = float(correct[: evaluation.num_val].mean())
    row["test_accuracy"] = float(correct[evaluation.num_val :].mean())
    probe_logits = logits[evaluation.num_val : evaluation.num_val + PROBE_SIZE]
    adapters = find_adapters(model)
    row["ranks"] = {a.path: int(a.rank()) for a in adapters}
    if method == "sinc":  # the rank LR-LoRA learned (it is not `rank`)
        row["update_stable_ranks"] = update_stable_ranks(model)
    if method == "flexlora":
        row["capacity"] = {a.path: int(a.max_rank) for a in adapters}
    log(
        f"      {method}: test accuracy {row['test_accuracy']:.3f}, validation "
        f"{row['val_accuracy']:.3f}, train {row['train_accuracy']:.3f} in "
        f"{row['train_seconds']:.1f}s ({row['ms_per_step']:.1f} ms/step)"
    )
    return row, model, probe_logits


class Evaluation:
    """The validation and test examples as one batched dataset (validation
    first) with their labels, for one `predict` per model.

    Args:
        val: unbatched `(image, label)` dataset, normalized.
        test: the same for the test examples.
        num_val: number of validation examples.
    """

    def __init__(self, val, test, num_val):
        data = _import_data()
        both = val.concatenate(test)
        self.dataset = data.batched(both, EVAL_BATCH_SIZE)
        self.labels = np.concatenate(
            [np.asarray(y) for y in data.batched(both.map(_label), 1024).as_numpy_iterator()]
        )
        self.num_val = int(num_val)
        self.probe = np.concatenate(
            [x for x, _ in data.batched(test.take(PROBE_SIZE), PROBE_SIZE).as_numpy_iterator()]
        )


def _label(image, label):
    return label


# --------------------------------------------------------------------------
# Export, plot
# --------------------------------------------------------------------------
def export_best(model, output_dir, probe, logits, log=print):
    """Save `model` merged (`.keras`), export it as a TensorFlow SavedModel
    and write `probe` (a few normalized inputs) with `model`'s `logits` for
    them, to check the export against.

    Returns `(merged_path, saved_model_path, probe_path, error)`; `error`
    is None when the SavedModel was written.
    """
    merged_path = os.path.join(output_dir, "best_merged.keras")
    saved_path = os.path.join(output_dir, "best_saved_model")
    probe_path = os.path.join(output_dir, "export_probe.npz")
    np.savez(probe_path, inputs=probe, logits=logits)
    save_merged(model, merged_path)
    if keras.backend.backend() == "tensorflow":
        export_merged(model, saved_path)
        log(f"exported the best model merged: {saved_path} (SavedModel), {merged_path}")
        return merged_path, saved_path, probe_path, None
    command = [sys.executable, "-m", "keras_adaptive_lora.cli", "export", merged_path, saved_path]
    log(f"exporting under tensorflow: KERAS_BACKEND=tensorflow {' '.join(command[1:])}")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this package's parent
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=path)
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        error = f"export subprocess exited with {done.returncode}: {done.stderr.strip()[-2000:]}"
        log(f"SavedModel export FAILED: {error}")
        return merged_path, None, probe_path, error
    log(f"exported the best model merged: {saved_path} (SavedModel), {merged_path}")
    return merged_path, saved_path, probe_path, None


def rank_grid(ranks):
    """`(blocks, roles, matrix)` of a `{layer path: rank}` dict: one row per
    transformer block, one column per projection name (NaN: not adapted)."""
    blocks, roles = [], []
    for path in ranks:
        block, role = _block(path), _role(path)
        if block not in blocks:
            blocks.append(block)
        if role not in roles:
            roles.append(role)
    roles.sort(key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r))
    matrix = np.full((len(blocks), len(roles)), np.nan)
    for path, rank in ranks.items():
        matrix[blocks.index(_block(path)), roles.index(_role(path))] = rank
    return blocks, roles, matrix


def save_plot(rows, path, *, title=""):
    """Accuracy vs trainable parameters per method, and the per-layer rank
    heatmaps of SR-LoRA and FlexLoRA (those that ran), in one PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "The transfer plot needs matplotlib: pip install 'keras-adaptive-lora[plot]' "
            "(or pass --no-plot)."
        ) from None
    heat = [r for r in rows if r["method"] in RANK_PLOT_METHODS and r["ranks"]]
    fig, axes = plt.subplots(
        1, 1 + len(heat), figsize=(6 + 4.2 * len(heat), 4.6), squeeze=False
    )
    ax = axes[0, 0]
    for r in rows:
        ax.scatter(r["trainable_params"], r["test_accuracy"], s=40)
        ax.annotate(
            TITLES[r["method"]], (r["trainable_params"], r["test_accuracy"]),
            textcoords="offset points", xytext=(5, 4), fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy vs trainable parameters", fontsize=9)
    ax.grid(True, alpha=0.3)
    for ax, r in zip(axes[0, 1:], heat):
        blocks, roles, matrix = rank_grid(r["ranks"])
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=7)
        note = " (after training)" if r["method"] == "flexlora" else " (from stable rank)"
        ax.set_title(f"{TITLES[r['method']]} rank per layer{note}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------
def run_transfer(
    *,
    methods=None,
    shots=None,
    seed=0,
    epochs=None,
    batch_size=None,
    rank=8,
    alpha=None,
    learning_rate=1e-3,
    weight_decay=5e-2,
    output_dir="transfer_output",
    preset=None,
    dataset=None,
    data_dir=None,
    image_size=None,
    train_split="train",
    test_split="test",
    val_per_class=None,
    test_size=None,
    quick=False,
    export=True,
    plot=True,
    verbose=1,
    log=print,
):
    """Adapt a pretrained ViT to a few-shot task with each method; compare.

    See the module docstring for what it does and writes. Options left at
    None take the defaults of the mode: offline (no `preset`: a small ViT
    pre-trained in the run; `quick`: a tiny one and a handful of steps) or
    real (`preset` and/or `dataset`: the SR-LoRA paper's few-shot settings).

    Args:
        methods: names from `METHODS` and `REFERENCE_METHODS`, a
            comma-separated string, or "all". Defaults to None: the six
            methods, plus `scratch` when the backbone is pre-trained in the run.
        shots: training examples per class. Defaults to None (offline 10,
            quick 2, real 1).
        seed: seed of the few-shot sample, the head init, the adapters and
            the shuffling. Defaults to 0.
        epochs: training epochs per method. Defaults to None (offline 60,
            quick 1, real 20).
        batch_size: training batch size. Defaults to None (offline 4, quick 4,
            real 4).
        rank: the rank of LoRA and LR-LoRA, and FlexLoRA's initial rank
            (SR-LoRA's ranks come from the stable ranks). Defaults to 8.
        alpha: the scaling numerator `alpha` (`s = alpha / r`) of every
            adapter method. Defaults to None: each method's own default
            (`alpha = rank` for LoRA, FlexLoRA, LR-LoRA; `alpha = 1` for
            SR-LoRA, its reference scaling).
        learning_rate: peak AdamW learning rate. Defaults to 1e-3.
        weight_decay: AdamW weight decay. Defaults to 5e-2.
        output_dir: where results, plot, preset and export go. Defaults to
            "transfer_output".
        preset: a keras-hub ViT preset name or local preset folder. Defaults
            to None (pre-train a small ViT in the run).
        dataset: a tfds image classification dataset. Defaults to None (the
            generated target task).
        data_dir: the tfds data directory. Defaults to None (tfds's default).
        image_size: offline: side of the generated images and the ViT input.
            With a preset it must equal the preset's input size. Defaults to
            None (offline 32, quick 16, preset: its own).
        train_split: tfds split of the train / validation examples. Defaults
            to "train".
        test_split: tfds split of the test examples (equal to `train_split`:
            the records not sampled). Defaults to "test".
        val_per_class: validation examples per class. Defaults to None
            (`shots`, as VTAB-1k few-shot).
        test_size: at most this many test examples. Defaults to None (offline
            600, quick 24, real: the whole test split).
        quick: the smallest offline setting (tiny ViT, a few steps; seconds).
            Defaults to False.
        export: export the best model. Defaults to True.
        plot: write the PNG plot (needs matplotlib). Defaults to True.
        verbose: 0 quiet `fit`, 1 progress bars, 2 one line per epoch and
            FlexLoRA rank moves. Defaults to 1.
        log: function receiving progress lines. Defaults to `print`.

    Returns:
        A `TransferResult`.
    """
    started = time.perf_counter()
    offline = preset is None
    if quick and not offline:
        raise ValueError(
            "`quick` is the smallest offline setting (a tiny ViT pre-trained in the run); "
            "it cannot be combined with `preset`. Drop one of them."
        )
    settings = OFFLINE["quick" if quick else "default"]
    real = preset is not None or dataset is not None
    defaults = REAL if real and not quick else settings
    methods = parse_methods(methods, offline=offline)
    shots = _positive_int("shots", defaults["shots"] if shots is None else shots)
    seed = _positive_int("seed", seed, minimum=0)
    epochs = _positive_int("epochs", defaults["epochs"] if epochs is None else epochs)
    batch_size = _positive_int(
        "batch_size", defaults["batch_size"] if batch_size is None else batch_size
    )
    rank = _positive_int("rank", rank)
    alpha = None if alpha is None else _positive_float("alpha", alpha)
    learning_rate = _positive_float("learning_rate", learning_rate)
    weight_decay = _positive_float("weight_decay", weight_decay, allow_zero=True)
    val_per_class = shots if val_per_class is None else _positive_int("val_per_class", val_per_class)
    if test_size is not None:
        test_size = _positive_int("test_size", test_size)
    elif dataset is None:  # the generated task needs a size; a dataset has its split
        test_size = settings["test_size"]
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
    if image_size is not None:
        image_size = _positive_int("image_size", image_size, minimum=16)
    output_dir = os.path.abspath(str(output_dir))
    os.makedirs(output_dir, exist_ok=True)
    log(
        f"transfer: backend {keras.backend.backend()}, keras {keras.__version__}, "
        f"methods {', '.join(methods)}; output in {output_dir}"
    )

    # 1. The input size, from the preset (or the offline setting).
    settings = dict(settings)
    if offline:
        if image_size is not None:
            if image_size % settings["patch_size"]:
                raise ValueError(
                    f"`image_size` {image_size} must be a multiple of the offline ViT's "
                    f"patch size {settings['patch_size']} (e.g. "
                    f"{settings['patch_size'] * max(2, image_size // settings['patch_size'])})."
                )
            settings["image_size"] = image_size
        input_size = (settings["image_size"], settings["image_size"])
    else:
        backbone = load_backbone(preset)
        input_size = tuple(int(d) for d in backbone.image_shape[:2])
        del backbone
        if image_size is not None and (image_size, image_size) != input_size:
            raise ValueError(
                f"`image_size` {image_size} does not match preset {preset!r}, whose ViT "
                f"takes {input_size[0]}x{input_size[1]} images (its position embeddings "
                "are fixed). Leave `image_size` out."
            )

    # 2. The data: a tfds dataset or the generated target task.
    if dataset is not None:
        splits = load_tfds_splits(
            dataset, shots=shots, seed=seed, val_per_class=val_per_class, test_size=test_size,
            image_size=input_size, data_dir=data_dir, train_split=train_split,
            test_split=test_split,
        )
    else:
        splits = synthetic_splits(
            shots=shots, seed=seed, val_per_class=val_per_class, test_size=test_size,
            image_size=input_size[0],
        )

    # 3. The backbone: pre-trained in the run and saved as a preset, or a preset.
    pretraining = None
    if offline:
        preset = os.path.join(output_dir, "pretrained_vit")
        pretraining = pretrain_backbone(preset, settings=settings, verbose=verbose, log=log)
    scale, offset = load_normalization(preset, log=log)
    base_params = load_backbone(preset).count_params()

    counts = {split: int(sum(c.values())) for split, c in splits.counts.items()}
    task = dataset or f"generated target task ({TARGET_DESCRIPTION})"
    log(
        f"data: {task}, {splits.source}: {splits.num_classes} classes, {shots} shots; "
        f"train {counts['train']}, val {counts['val']}, test {counts['test']} images"
    )
    train = _normalized(splits.train, scale, offset)
    evaluation = Evaluation(
        _normalized(splits.val, scale, offset), _normalized(splits.test, scale, offset), counts["val"]
    )
    steps_per_epoch = math.ceil(counts["train"] / batch_size)

    # 4. Each method.
    options = {
        "seed": seed, "epochs": epochs, "rank": rank, "alpha": alpha, "learning_rate": learning_rate,
        "weight_decay": weight_decay, "verbose": verbose, "count": len(methods),
        "batch_size": batch_size,
    }
    rows, best, best_model, best_key, best_logits = [], None, None, None, None
    for index, method in enumerate(methods, 1):
        row, model, logits = adapt(
            method,
            preset=preset,
            num_classes=splits.num_classes,
            train=train,
            evaluation=evaluation,
            steps_per_epoch=steps_per_epoch,
            options=dict(options, index=index),
            log=log,
        )
        rows.append(row)
        key = (row["val_accuracy"], -row["trainable_params"])
        if best_key is None or key > best_key:
            best, best_model, best_key, best_logits = method, model, key, logits
        del model
        gc.collect()
    log("")
    log(format_table(rows, best=best))

    # 5. Files.
    config = {
        "methods": list(methods), "shots": shots, "seed": seed, "epochs": epochs,
        "batch_size": batch_size, "rank": rank, "alpha": alpha, "learning_rate": learning_rate,
        "weight_decay": weight_decay, "preset": preset, "dataset": dataset,
        "data_dir": data_dir, "train_split": train_split, "test_split": test_split,
        "val_per_class": val_per_class, "test_size": test_size, "quick": bool(quick),
        "offline": offline, "steps_per_epoch": steps_per_epoch,
    }
    result = {
        "rows": rows, "best": best, "best_model": best_model, "config": config,
        "output_dir": output_dir,
    }
    if plot:
        result["plot_path"] = save_plot(
            rows,
            os.path.join(output_dir, "transfer.png"),
            title=f"{task}: {shots}-shot, seed {seed}, {epochs} epochs ({keras.backend.backend()})",
        )
        log(f"plot: {result['plot_path']}")
    if export:
        merged, saved, probe_path, error = export_best(
            best_model, output_dir, evaluation.probe, best_logits, log=log
        )
        result.update(
            merged_path=merged, saved_model_path=saved, probe_path=probe_path, export_error=error
        )
    record = {
        "config": config,
        "backend": keras.backend.backend(),
        "keras_version": keras.__version__,
        "input": {
            "image_size": list(input_size),
            "scale": np.asarray(scale).tolist(),
            "offset": np.asarray(offset).tolist(),
            "note": "the exported model takes images already normalized: x * scale + offset, "
                    "x in [0, 255]",
        },
        "backbone_params": int(base_params),
        "pretraining": pretraining,
        "data": {
            "task": task,
            "source": splits.source,
            "num_classes": splits.num_classes,
            "class_names": list(splits.class_names),
            "counts": {split: {str(k): v for k, v in c.items()} for split, c in splits.counts.items()},
        },
        "methods": rows,
        "best": best,
        "files": {
            key: result.get(key)
            for key in ("plot_path", "merged_path", "saved_model_path", "probe_path")
        },
        "export_error": result.get("export_error"),
        "seconds": time.perf_counter() - started,
    }
    result["results_path"] = os.path.join(output_dir, "results.json")
    with open(result["results_path"], "w") as f:
        json.dump(record, f, indent=2)
    log(f"results: {result['results_path']} ({record['seconds']:.0f}s in all)")
    return TransferResult(**result)


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------
def add_arguments(parser):
    """Add the transfer job's options to an `argparse` parser."""
    add = parser.add_argument
    add("--methods", default=None,
        help=f"comma-separated subset of {','.join(METHODS + REFERENCE_METHODS)}, or 'all' "
             "(default: all six methods, plus 'scratch' when the ViT is pre-trained in the run)")
    add("--shots", type=int, default=None,
        help="training examples per class (default: offline 10, --quick 2, real 1)")
    add("--seed", type=int, default=0, help="few-shot sample, inits, shuffling (default 0)")
    add("--epochs", type=int, default=None,
        help="epochs per method (default: offline 60, --quick 1, real 20)")
    add("--batch-size", type=int, default=None,
        help="training batch size (default 4, the SR-LoRA paper's)")
    add("--rank", type=int, default=8,
        help="rank of LoRA and LR-LoRA, initial rank of FlexLoRA (default 8)")
    add("--alpha", type=float, default=None,
        help="adapter scaling numerator (s = alpha / r) for every adapter method (default: "
             "each method's own: alpha = rank, SR-LoRA alpha = 1)")
    add("--learning-rate", type=float, default=1e-3, help="AdamW peak learning rate (default 1e-3)")
    add("--weight-decay", type=float, default=5e-2, help="AdamW weight decay (default 5e-2)")
    add("--output-dir", default="transfer_output",
        help="results.json, transfer.png, the preset, the export (default ./transfer_output)")
    add("--preset", default=None,
        help="keras-hub ViT preset name (e.g. vit_base_patch16_224_imagenet21k) or local "
             "preset folder (default: pre-train a small ViT in the run, offline)")
    add("--dataset", default=None,
        help="tfds image dataset, e.g. eurosat/rgb (default: the generated target task)")
    add("--data-dir", default=None, help="tfds data directory")
    add("--train-split", default="train", help="tfds split for train/val examples")
    add("--test-split", default="test",
        help="tfds split for test examples; equal to --train-split: the unsampled records")
    add("--val-per-class", type=int, default=None, help="validation examples per class (default: shots)")
    add("--test-size", type=int, default=None,
        help="at most this many test examples (default: offline 600, real: the whole split)")
    add("--image-size", type=int, default=None,
        help="offline: generated image side and ViT input (default 32; --quick 16)")
    add("--quick", "--smoke", dest="quick", action="store_true",
        help="the smallest offline setting: a tiny ViT and a handful of steps (seconds)")
    add("--no-export", dest="export", action="store_false", help="do not export the best model")
    add("--no-plot", dest="plot", action="store_false", help="do not write transfer.png")
    add("--verbose", type=int, default=1, choices=(0, 1, 2),
        help="fit output: 0 none, 1 progress bars, 2 a line per epoch (default 1)")
    return parser


def run(args):
    """Run the job from parsed arguments; returns the exit status (0: done,
    1: the export failed, 2: bad options or unavailable model/data)."""
    options = {
        key: getattr(args, key)
        for key in (
            "methods", "shots", "seed", "epochs", "batch_size", "rank", "alpha", "learning_rate",
            "weight_decay", "output_dir", "preset", "dataset", "data_dir", "image_size",
            "train_split", "test_split", "val_per_class", "test_size", "quick", "export",
            "plot", "verbose",
        )
    }
    try:
        result = run_transfer(**options)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 1 if result.export_error else 0


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m keras_adaptive_lora.transfer",
        description="Few-shot transfer of a keras-hub ViT with linear probing, full "
                    "fine-tuning, LoRA, SR-LoRA, FlexLoRA and LR-LoRA; offline by default.",
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
