"""The transfer job: `run_transfer`, one run over the methods, stage by stage.

1. the input size (the preset's, or the offline setting), 2. the data (a
tfds dataset or the generated target task, `data.py`), 3. the backbone
(pre-trained in the run, or a preset: `backbone.py`), 4. each method
(`train.adapt`), 5. the files: the plot and table (`report.py`), the export
of the best method (`export.py`) and `results.json`.
"""

import gc
import json
import math
import os
import time

import keras
import numpy as np

from keras_adaptive_lora.apps.transfer.backbone import (
    load_backbone,
    load_normalization,
    pretrain_backbone,
)
from keras_adaptive_lora.apps.transfer.data import (
    Evaluation,
    load_tfds_splits,
    normalized,
    synthetic_splits,
)
from keras_adaptive_lora.apps.transfer.export import export_best
from keras_adaptive_lora.apps.transfer.options import (
    OFFLINE,
    REAL,
    TARGET_DESCRIPTION,
    parse_methods,
    positive_float,
    positive_int,
)
from keras_adaptive_lora.apps.transfer.report import (
    TransferResult,
    format_table,
    save_plot,
)
from keras_adaptive_lora.apps.transfer.train import adapt


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

    See the package docstring (`keras_adaptive_lora.apps.transfer`) for
    what it does and writes. Options left at
    None take the defaults of the mode: offline (no `preset`: a small ViT
    pre-trained in the run; `quick`: a tiny one and a handful of steps) or
    real (`preset` and/or `dataset`: the SR-LoRA paper's few-shot settings).

    Args:
        methods: names from `options.all_methods()` (the baselines, the
            registered adapter methods, `scratch`), a comma-separated string,
            or "all". Defaults to None: the baselines and every registered
            adapter method, plus `scratch` when the backbone is pre-trained
            in the run.
        shots: training examples per class. Defaults to None (offline 10,
            quick 2, real 1).
        seed: seed of the few-shot sample, the head init, the adapters and
            the shuffling. Defaults to 0.
        epochs: training epochs per method. Defaults to None (offline 60,
            quick 1, real 20).
        batch_size: training batch size. Defaults to None (offline 4, quick 4,
            real 4).
        rank: the rank of every adapter method that takes one (the initial
            rank of a method that moves ranks; a method that allocates its
            own ranks has no `rank` option and ignores it). Defaults to 8.
        alpha: the scaling numerator `alpha` (`s = alpha / r`) of every
            adapter method. Defaults to None: each method's own default.
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
            the methods' callbacks' lines (e.g. rank moves). Defaults to 1.
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
    shots = positive_int("shots", defaults["shots"] if shots is None else shots)
    seed = positive_int("seed", seed, minimum=0)
    epochs = positive_int("epochs", defaults["epochs"] if epochs is None else epochs)
    batch_size = positive_int(
        "batch_size", defaults["batch_size"] if batch_size is None else batch_size
    )
    rank = positive_int("rank", rank)
    alpha = None if alpha is None else positive_float("alpha", alpha)
    learning_rate = positive_float("learning_rate", learning_rate)
    weight_decay = positive_float("weight_decay", weight_decay, allow_zero=True)
    val_per_class = shots if val_per_class is None else positive_int("val_per_class", val_per_class)
    if test_size is not None:
        test_size = positive_int("test_size", test_size)
    elif dataset is None:  # the generated task needs a size; a dataset has its split
        test_size = settings["test_size"]
    if verbose not in (0, 1, 2) or isinstance(verbose, bool):
        raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
    if image_size is not None:
        image_size = positive_int("image_size", image_size, minimum=16)
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
    train = normalized(splits.train, scale, offset)
    evaluation = Evaluation(
        normalized(splits.val, scale, offset), normalized(splits.test, scale, offset), counts["val"]
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
