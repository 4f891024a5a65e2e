"""ViT few-shot image classification with SR-LoRA (StableRankLoRA + SPU).

Loads a keras-hub ViT preset, puts a new classification head on it, plans
SR-LoRA ranks from the stable rank of every pretrained query, value and
attention-output projection (printed as a table), applies them, trains the
adapters and the head with stochastic partial updating, evaluates, merges the
adapters into plain layers and checks that the merged model predicts the same.
Exits nonzero if a check fails.

    # real: a keras-hub ViT preset and a tfds image dataset, VTAB-1k style
    # sampling (needs network for the downloads; a GPU helps)
    python examples/vit_few_shot_sr_lora.py --preset vit_base_patch16_224_imagenet21k \\
        --dataset eurosat/rgb --shots 10 --epochs 100
    # smoke: a tiny ViT saved as a local preset, synthetic images (used by the tests)
    python examples/vit_few_shot_sr_lora.py --smoke

Both modes run the same code; the smoke mode only makes the preset (a tiny
ViT written with `save_to_preset` into a temporary folder) and the data
(numpy arrays with a class-dependent colour) locally. The optimizer follows
the SR-LoRA paper: AdamW, learning rate 1e-3, weight decay 5e-2, cosine decay.
The last line is `SUMMARY {json}` (read by tests/test_examples.py).
"""

import argparse
import json
import sys
import tempfile

import keras
import keras_hub
import numpy as np

import keras_adaptive_lora as kal


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny local preset and synthetic data (seconds)")
    parser.add_argument("--preset", default="vit_base_patch16_224_imagenet21k",
                        help="a keras-hub ViT preset name or a local preset folder")
    parser.add_argument("--dataset", default="eurosat/rgb", help="a tfds image dataset")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="train",
                        help="tfds split of the test examples; the same as --train-split "
                             "draws them from the records not used for train/val "
                             "(eurosat has only 'train')")
    parser.add_argument("--test-size", type=int, default=2000,
                        help="at most this many test examples (a seeded subsample)")
    parser.add_argument("--shots", type=int, default=10, help="training examples per class")
    parser.add_argument("--val-per-class", type=int, default=None,
                        help="validation examples per class (default: --shots)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-2)
    parser.add_argument("--alpha", type=float, default=1.0, help="SR-LoRA scale s = alpha / r")
    parser.add_argument("--max-rank", type=int, default=None, help="cap on every layer's rank")
    parser.add_argument("--budget", type=int, default=None,
                        help="total adapter parameters (ranks scaled down to fit)")
    args = parser.parse_args(argv)
    if args.smoke:  # one batch per split: every compiled step has one input shape
        args.epochs, args.batch_size, args.shots, args.learning_rate = 2, 8, 4, 1e-2
    return args


def make_tiny_preset(directory, image_size=32):
    """A tiny ViT backbone + image converter saved as a keras-hub preset."""
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=(8, 8),
        num_layers=2,
        num_heads=2,
        hidden_dim=16,
        mlp_dim=32,
    )
    backbone.save_to_preset(directory)
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(image_size, image_size), scale=1.0 / 127.5, offset=-1.0
    )
    keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter).save_to_preset(
        directory
    )
    return directory


def synthetic_splits(image_size, *, shots, num_classes=2, test_per_class=4, seed=0):
    """Numpy (images in [0, 255], int32 labels) splits with a class-coloured tint."""
    rng = np.random.default_rng(seed)
    tints = rng.uniform(0, 255, (num_classes, 3))

    def split(per_class):
        labels = np.repeat(np.arange(num_classes), per_class).astype("int32")
        noise = rng.uniform(0, 255, (labels.size, image_size, image_size, 3))
        images = 0.5 * noise + 0.5 * tints[labels][:, None, None, :]
        return images.astype("float32"), labels

    return split(shots), split(shots), split(test_per_class), num_classes


def load_data(args, image_size):
    """`(train, val, test, num_classes)`: numpy tuples (smoke) or batched tf.data."""
    if args.smoke:
        return synthetic_splits(image_size[0], shots=args.shots, seed=args.seed)
    from keras_adaptive_lora import data  # tensorflow + tensorflow-datasets: the `data` extra

    splits = data.few_shot_splits(
        args.dataset,
        shots=args.shots,
        seed=args.seed,
        val_per_class=args.val_per_class,
        test_size=args.test_size,
        image_size=tuple(image_size),
        train_split=args.train_split,
        test_split=args.test_split,
    )
    print(splits)
    return (
        data.batched(splits.train, args.batch_size, shuffle=True, seed=args.seed),
        data.batched(splits.val, args.batch_size),
        data.batched(splits.test, args.batch_size),
        splits.num_classes,
    )


def inputs_of(split, batch_size):
    """Keyword arguments of fit/evaluate/predict for a numpy tuple or a tf.data split."""
    if isinstance(split, tuple):
        return {"x": split[0], "y": split[1], "batch_size": batch_size}
    return {"x": split}


def steps_in(split, batch_size):
    """Batches per epoch of a numpy tuple or a batched tf.data split."""
    if isinstance(split, tuple):
        return int(np.ceil(len(split[1]) / batch_size))
    steps = int(split.cardinality())
    return steps if steps >= 0 else sum(1 for _ in split)  # unknown: count once


def probe_of(split):
    """A few examples to compare adapted and merged predictions on."""
    if isinstance(split, tuple):
        return split[0][:16]
    return np.concatenate([np.asarray(x) for x, _ in split.take(2).as_numpy_iterator()])


def main(argv=None):
    args = parse_args(argv)
    keras.utils.set_random_seed(args.seed)
    failures = []
    # The smoke preset lives in a temporary folder removed at exit.
    smoke_dir = tempfile.TemporaryDirectory(prefix="tiny_preset_") if args.smoke else None
    preset = make_tiny_preset(smoke_dir.name) if args.smoke else args.preset
    print(f"backend {keras.backend.backend()}, preset {preset}")

    backbone = keras_hub.models.ViTBackbone.from_preset(preset)
    image_size = tuple(backbone.image_shape[:2])
    train, val, test, num_classes = load_data(args, image_size)
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone,
        num_classes=num_classes,
        preprocessor=keras_hub.models.ViTImageClassifierPreprocessor.from_preset(preset),
    )

    method = kal.StableRankLoRA(
        alpha=args.alpha, spu=True, max_rank=args.max_rank, budget=args.budget, seed=args.seed
    )
    plan = kal.plan_ranks(model, method)
    print(plan)
    report = kal.apply_adapters(model, method, train_also=["predictions"])
    print(report)
    applied = [row["rank"] for row in report.rows]
    if applied != plan.ranks:
        failures.append(f"applied ranks {applied} differ from the plan {plan.ranks}")

    steps_per_epoch = steps_in(train, args.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        args.learning_rate, decay_steps=max(1, args.epochs * steps_per_epoch)
    )
    model.compile(
        optimizer=keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = model.fit(
        **inputs_of(train, args.batch_size),
        validation_data=val,
        epochs=args.epochs,
        verbose=2 if args.smoke else 1,
    )
    losses = history.history["loss"]
    if not np.all(np.isfinite(losses)):
        failures.append(f"non-finite training loss: {losses}")
    adapted = model.evaluate(**inputs_of(test, args.batch_size), return_dict=True, verbose=0)
    print(f"adapted: test loss {adapted['loss']:.4f}, test accuracy {adapted['accuracy']:.4f}")

    probe = probe_of(test)
    before = np.asarray(keras.ops.convert_to_numpy(model.predict(probe, verbose=0)))
    merged_count = kal.merge_adapters(model)
    after = np.asarray(keras.ops.convert_to_numpy(model.predict(probe, verbose=0)))
    diff = float(np.abs(after - before).max())
    tolerance = 1e-4 * max(1.0, float(np.abs(before).max()))
    print(f"merged {merged_count} adapters into plain layers: max |logit difference| on "
          f"{len(probe)} test images {diff:.2e} (tolerance {tolerance:.1e})")
    if merged_count != len(plan):
        failures.append(f"merged {merged_count} adapters, planned {len(plan)}")
    if not diff <= tolerance:
        failures.append(f"merged logits differ by {diff:.2e} > {tolerance:.1e}")

    summary = {
        "ranks": plan.ranks,
        "stable_ranks": [row["stable_rank"] for row in plan],
        "adapter_params": report.adapter_params,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "test_accuracy": adapted["accuracy"],
        "merged": merged_count,
        "merge_diff": diff,
        "failures": failures,
    }
    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
