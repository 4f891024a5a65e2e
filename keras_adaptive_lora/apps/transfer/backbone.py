"""The transfer job's backbone: a small ViT pre-trained in the run (offline)
or a keras-hub preset, its image normalization, and the learning-rate
schedule every training run of the job uses."""

import json
import math
import os
import time

import keras
import keras_hub
import numpy as np

from keras_adaptive_lora import backend, data
from keras_adaptive_lora.inspection import from_preset
from keras_adaptive_lora.saving._atomic import write_json
from keras_adaptive_lora.apps.transfer import synthetic
from keras_adaptive_lora.apps.transfer.data import import_tf, normalized, to_float
from keras_adaptive_lora.apps.transfer.options import EVAL_BATCH_SIZE, PRETRAINING_FILE, SOURCE_SEED


def read_pretraining(preset):
    """The record the offline pre-training wrote into preset folder
    `preset` (`PRETRAINING_FILE`: the offline setting it used, its
    architecture and source-task accuracy), or None for any other preset."""
    path = os.path.join(str(preset), PRETRAINING_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def pretrain_backbone(directory, *, settings, setting="default", seed=SOURCE_SEED, verbose=1,
                      callbacks=(), log=print):
    """Pre-train a small ViT on the generated source task; save it as a preset.

    Writes `ViTBackbone.save_to_preset(directory)` and a `ViTImageConverter`
    (the keras-hub ViT normalization, `[0, 255] -> [-1, 1]`) into
    `directory`, so it loads back with `from_preset(directory)` like any
    keras-hub preset.

    Args:
        directory: the preset folder to write.
        settings: a dict like `OFFLINE["default"]` (architecture, source task
            size, epochs, batch size, learning rate).
        setting: the name of the offline setting (`"default"` or
            `"quick"`), recorded in the preset folder (`PRETRAINING_FILE`) so
            that `--preset directory` keeps it. Defaults to "default".
        seed: seed of the source images and of the init. Defaults to 0.
        verbose: 2 prints Keras's line per epoch; below, `fit` is silent.
            Defaults to 1.
        callbacks: extra Keras callbacks for `fit` (e.g. progress).
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
    scale, offset = normalization(converter)
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
            cosine_schedule(settings["pretrain_learning_rate"], steps), weight_decay=0.05
        ),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=backend.jit_compile(),
    )
    source_images = len(images)
    log(
        f"pre-training a ViT ({backbone.count_params():,} params, {settings['num_layers']} "
        f"layers, hidden {settings['hidden_dim']}, {size}x{size} images, patch "
        f"{settings['patch_size']}) on the generated source task: {source_images} images, "
        f"{len(names)} classes, {steps} steps"
    )
    tf = import_tf()

    def pipeline(x, y):
        dataset = tf.data.Dataset.from_tensor_slices((x, y))
        return normalized(dataset.map(to_float), scale, offset)

    train = data.batched(pipeline(images, labels), batch, shuffle=True, seed=seed)
    del images
    model.fit(
        train, epochs=settings["pretrain_epochs"], verbose=2 if verbose >= 2 else 0,
        shuffle=False, callbacks=list(callbacks),
    )
    val = model.evaluate(
        data.batched(pipeline(val_images, val_labels), EVAL_BATCH_SIZE), verbose=0, return_dict=True
    )
    os.makedirs(directory, exist_ok=True)
    backbone.save_to_preset(directory)
    keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter).save_to_preset(directory)
    seconds = time.perf_counter() - start
    record = {
        "preset": directory,
        "setting": setting,
        "source_classes": list(names),
        "source_images": source_images,
        "steps": steps,
        "seconds": seconds,
        "source_val_accuracy": float(val["accuracy"]),
        "architecture": {k: settings[k] for k in (
            "image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")},
    }
    write_json(os.path.join(directory, PRETRAINING_FILE), record)
    log(
        f"pre-trained in {seconds:.1f}s: source-task validation accuracy "
        f"{val['accuracy']:.3f}; saved as a keras-hub preset in {directory} (reuse it "
        f"with --preset {directory}: the same offline settings)"
    )
    return record


def normalization(converter):
    """`(scale, offset)` float32 arrays (broadcast over channels) of an
    image converter; missing values mean identity."""
    scale = 1.0 if converter.scale is None else converter.scale
    offset = 0.0 if converter.offset is None else converter.offset
    return np.asarray(scale, "float32"), np.asarray(offset, "float32")


def load_backbone(preset):
    """`keras_hub.models.Backbone.from_preset(preset)`, checked to be a ViT.

    A keras-hub preset or a Hugging Face transformers ViT (a
    `save_pretrained` folder; a missing `hf` extra is an `ImportError` that
    names it, see `inspection.from_preset`).
    """
    try:
        backbone = from_preset(preset)
    except ImportError:
        raise
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
        converter, missing = keras_hub.layers.ImageConverter.from_preset(preset), "None"
    except Exception as error:  # no preprocessor saved with the preset
        converter, missing = None, type(error).__name__
    if converter is None:  # a transformers folder without preprocessor_config.json: None
        log(
            f"note: preset {preset!r} has no image converter ({missing}); "
            "using the keras-hub ViT normalization x / 127.5 - 1"
        )
        return np.float32(1.0 / 127.5), np.float32(-1.0)
    return normalization(converter)


def cosine_schedule(learning_rate, total_steps, warmup_fraction=0.1):
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
