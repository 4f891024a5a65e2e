"""Few-shot splits of a `tensorflow_datasets` image dataset (`few_shot_splits`).

The passes over the data and the memory they need are described in the
`keras_adaptive_lora.data` package docstring. `tensorflow` and
`tensorflow_datasets` are imported lazily, inside `few_shot_splits` (install
the `data` extra).
"""

import numpy as np

from keras_adaptive_lora.data.pipeline import _DATA_EXTRA, _import_tf, _to_rgb_float
from keras_adaptive_lora.data.sampling import (
    FewShotSplits,
    _check_image_size,
    _check_int,
    _check_labels,
    _counts,
    _in_set,
    _test_indices,
    few_shot_indices,
)


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise ImportError(
            "keras_adaptive_lora.data.few_shot_splits reads tfds datasets and "
            f"needs tensorflow-datasets; install the `data` extra: {_DATA_EXTRA}"
        ) from None
    return tfds


# --------------------------------------------------------------------------
# tfds
# --------------------------------------------------------------------------
def _read_labels(tf, dataset, label_key):
    labels = dataset.map(lambda ex: ex[label_key], num_parallel_calls=tf.data.AUTOTUNE)
    chunks = [np.asarray(b) for b in labels.batch(8192).as_numpy_iterator()]
    return np.concatenate(chunks).astype("int64") if chunks else np.zeros((0,), "int64")


def few_shot_splits(
    name,
    *,
    shots,
    seed=0,
    val_per_class=None,
    test_size=None,
    image_size=224,
    data_dir=None,
    train_split="train",
    test_split="test",
    image_key="image",
    label_key="label",
):
    """Seeded few-shot train / val / test splits of a tfds image dataset.

    Draws exactly `shots` training and `val_per_class` validation examples per
    class from `train_split` (disjoint), and the test examples from
    `test_split` (all of them, or a seeded subsample of `test_size`). When
    `test_split == train_split`, the test examples are drawn from the records
    that are not used for train or validation. Images are decoded, made RGB
    (grayscale repeated, alpha dropped) and resized to `image_size` in the
    pipeline. See the `keras_adaptive_lora.data` package docstring for the
    passes over the data and the memory they need.

    Splits with different names are only as disjoint as the dataset makes
    them: overlapping slices such as `"train[:80%]"` and `"train[50%:]"` are
    not checked.

    Args:
        name: a tfds dataset name, e.g. `"eurosat/rgb"`, `"oxford_flowers102"`.
        shots: training examples per class (VTAB-1k style: 1, 5, 10).
        seed: the sampling seed; the same seed gives the same examples.
            Defaults to 0.
        val_per_class: validation examples per class (0 for none). Defaults
            to None (`shots`).
        test_size: at most this many test examples, a seeded subsample.
            Defaults to None (the whole test split).
        image_size: an int or `(height, width)`: images are resized to it.
            Defaults to 224.
        data_dir: the tfds data directory. Defaults to None (tfds's default).
        train_split: the tfds split (or slice, e.g. `"train[:800]"`) that the
            train and validation examples come from. Defaults to "train".
        test_split: the tfds split of the test examples. Defaults to "test".
        image_key: the image feature. Defaults to "image".
        label_key: the label feature, a `tfds.features.ClassLabel`. Defaults
            to "label".

    Returns:
        A `FewShotSplits`.

    Example:
    ```python
    from keras_adaptive_lora import data
    splits = data.few_shot_splits("eurosat/rgb", shots=5, seed=0,
                                  train_split="train[:80%]", test_split="train[80%:]")
    model.fit(data.batched(splits.train, 32, shuffle=True),
              validation_data=data.batched(splits.val, 64), epochs=10)
    ```
    """
    tf = _import_tf()
    tfds = _import_tfds()
    shots = _check_int("shots", shots, 1)
    val_per_class = shots if val_per_class is None else _check_int("val_per_class", val_per_class, 0)
    test_size = None if test_size is None else _check_int("test_size", test_size, 1)
    seed = _check_int("seed", seed, 0)
    size = _check_image_size(image_size)
    if size is None:
        raise ValueError("`image_size` is required for tfds datasets (images of a batch must match).")

    builder = tfds.builder(name, data_dir=data_dir)
    builder.download_and_prepare()
    features = builder.info.features
    for key, what in ((image_key, "image_key"), (label_key, "label_key")):
        if key not in features:
            raise ValueError(
                f"Dataset '{name}' has no feature {key!r} (`{what}`); its features "
                f"are {sorted(features.keys())}."
            )
    label_feature = features[label_key]
    if not isinstance(label_feature, tfds.features.ClassLabel):
        raise ValueError(
            f"Feature {label_key!r} of '{name}' is a {type(label_feature).__name__}, "
            "not a tfds.features.ClassLabel; pass the class-label feature as `label_key`."
        )
    num_classes = int(label_feature.num_classes)
    class_names = [str(n) for n in label_feature.names]
    image_feature = features[image_key]
    skip = isinstance(image_feature, tfds.features.Image)
    decoders = {image_key: tfds.decode.SkipDecoding()} if skip else None

    def read(split):
        # The same read for the label and the selection passes (fixed order).
        return builder.as_dataset(split=split, shuffle_files=False, decoders=decoders)

    def decode(image):
        return image_feature.decode_example(image) if skip else image

    def prepare(image, label):
        return _to_rgb_float(decode(image), size), tf.cast(label, "int32")

    train_labels = _read_labels(tf, read(train_split), label_key)
    train_idx, val_idx = few_shot_indices(
        train_labels,
        shots=shots,
        val_per_class=val_per_class,
        num_classes=num_classes,
        seed=seed,
        class_names=class_names,
        where=f"'{name}' split '{train_split}'",
    )

    # Selection pass: keep the (encoded) images of the selected records.
    chosen = np.union1d(train_idx, val_idx)
    keep = tf.constant(_in_set(chosen, len(train_labels)))
    selected = (
        read(train_split)
        .take(int(chosen[-1]) + 1)
        .enumerate()
        .filter(lambda i, ex: keep[i])
        .map(lambda i, ex: (i, ex[image_key], ex[label_key]))
    )
    images, seen = [], []
    for index, image, label in selected.as_numpy_iterator():
        if int(label) != train_labels[index]:
            raise ValueError(
                f"'{name}' split '{train_split}' gave a different label for record "
                f"{index} on a second read ({label} vs {train_labels[index]}): its "
                "read order is not deterministic, so few-shot indices cannot be used."
            )
        images.append(image)
        seen.append(int(index))
    position = {index: k for k, index in enumerate(seen)}

    def in_memory(indices):
        rows = [position[int(i)] for i in indices]
        stored = [images[r] for r in rows]
        if skip:
            stored = tf.constant(stored, dtype=tf.string, shape=(len(stored),))
        else:
            shapes = {np.shape(s) for s in stored}
            if len(shapes) > 1:
                raise ValueError(
                    f"Feature {image_key!r} of '{name}' is a {type(image_feature).__name__} "
                    f"with images of different shapes {sorted(shapes)[:3]}; only "
                    "tfds.features.Image supports variable image sizes."
                )
            stored = np.stack(stored) if stored else np.zeros((0, *size, 3), "uint8")
        labels = train_labels[indices].astype("int32")
        dataset = tf.data.Dataset.from_tensor_slices((stored, labels))
        return dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)

    if test_split == train_split:
        test_labels = train_labels
        remaining = np.setdiff1d(np.arange(len(train_labels)), chosen)
        test_idx = _test_indices(remaining, test_size, seed)
    else:
        test_labels = _read_labels(tf, read(test_split), label_key)
        test_labels = _check_labels(test_labels, num_classes, f"'{name}' split '{test_split}'")
        test_idx = _test_indices(np.arange(len(test_labels)), test_size, seed)
    test = read(test_split)
    if len(test_idx) < len(test_labels):
        test_keep = tf.constant(_in_set(test_idx, len(test_labels)))
        test = test.take(int(test_idx[-1]) + 1 if len(test_idx) else 0).enumerate()
        test = test.filter(lambda i, ex: test_keep[i]).map(lambda i, ex: ex)
    test = test.map(
        lambda ex: prepare(ex[image_key], ex[label_key]), num_parallel_calls=tf.data.AUTOTUNE
    )

    return FewShotSplits(
        train=in_memory(train_idx),
        val=in_memory(val_idx),
        test=test,
        num_classes=num_classes,
        class_names=class_names,
        counts={
            "train": _counts(train_labels[train_idx], num_classes),
            "val": _counts(train_labels[val_idx], num_classes),
            "test": _counts(test_labels[test_idx], num_classes),
        },
        indices={"train": train_idx, "val": val_idx, "test": test_idx},
        image_size=size,
        source=f"tfds '{name}' ({train_split} -> train/val, {test_split} -> test, seed {seed})",
    )

