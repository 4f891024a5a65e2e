"""Few-shot splits of in-memory numpy arrays (`from_arrays`).

`tensorflow` is imported lazily, inside `from_arrays` (install the `data`
extra).
"""

import numpy as np

from keras_adaptive_lora.data.pipeline import _import_tf, _to_rgb_float
from keras_adaptive_lora.data.sampling import (
    FewShotSplits,
    _check_image_size,
    _check_int,
    _check_labels,
    _counts,
    _test_indices,
    few_shot_indices,
)


# --------------------------------------------------------------------------
# In-memory arrays
# --------------------------------------------------------------------------
def from_arrays(
    images,
    labels,
    *,
    shots,
    seed=0,
    val_per_class=None,
    test_size=None,
    num_classes=None,
    class_names=None,
    image_size=None,
):
    """Seeded few-shot splits of in-memory numpy arrays.

    The same sampling as `few_shot_splits` (see `few_shot_indices`); the test
    split is every example not used for train or validation, or a seeded
    subsample of `test_size` of them.

    Args:
        images: array `(N, h, w)`, `(N, h, w, 1)`, `(N, h, w, 3)` or
            `(N, h, w, 4)`; uint8 (kept in `[0, 255]`), another integer type
            (scaled to `[0, 255]`) or float (values kept).
        labels: integer array `(N,)` of class ids in `[0, num_classes)`.
        shots: training examples per class (>= 1).
        seed: the sampling seed. Defaults to 0.
        val_per_class: validation examples per class (0 for none). Defaults
            to None (`shots`).
        test_size: at most this many test examples. Defaults to None (all the
            remaining examples).
        num_classes: the number of classes. Defaults to None
            (`max(labels) + 1`, or `len(class_names)`).
        class_names: one name per class. Defaults to None (`"0"`, `"1"`, ...).
        image_size: an int or `(height, width)` to resize to. Defaults to None
            (keep the arrays' size).

    Returns:
        A `FewShotSplits` whose datasets hold their examples in memory.

    Example:
    ```python
    import numpy as np
    from keras_adaptive_lora import data
    images = np.random.randint(0, 256, (100, 32, 32, 3), "uint8")
    labels = np.arange(100) % 4
    splits = data.from_arrays(images, labels, shots=5, seed=0)
    splits.counts["train"]  # {0: 5, 1: 5, 2: 5, 3: 5}
    ```
    """
    tf = _import_tf()
    shots = _check_int("shots", shots, 1)
    val_per_class = shots if val_per_class is None else _check_int("val_per_class", val_per_class, 0)
    test_size = None if test_size is None else _check_int("test_size", test_size, 1)
    seed = _check_int("seed", seed, 0)
    size = _check_image_size(image_size)
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim not in (3, 4):
        raise ValueError(
            "`images` must be an array (N, height, width) or (N, height, width, "
            f"channels); got shape {images.shape}."
        )
    if images.ndim == 4 and images.shape[-1] not in (1, 3, 4):
        raise ValueError(
            "`images` must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels in "
            f"the last axis; got shape {images.shape}."
        )
    if labels.shape != (len(images),):
        raise ValueError(
            f"`labels` must have shape ({len(images)},) (one per image); got {labels.shape}."
        )
    if class_names is not None:
        class_names = [str(n) for n in class_names]
    if num_classes is None:
        if class_names is not None:
            num_classes = len(class_names)
        elif labels.size and np.issubdtype(labels.dtype, np.integer):
            num_classes = int(labels.max()) + 1
        else:
            raise ValueError("Pass `num_classes` (the labels are empty or not integers).")
    num_classes = _check_int("num_classes", num_classes, 1)
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(
            f"Got {len(class_names)} class names for num_classes={num_classes}; "
            "pass one name per class."
        )
    labels = _check_labels(labels, num_classes, "`labels`")
    train_idx, val_idx = few_shot_indices(
        labels,
        shots=shots,
        val_per_class=val_per_class,
        num_classes=num_classes,
        seed=seed,
        class_names=class_names,
        where="`labels`",
    )
    remaining = np.setdiff1d(np.arange(len(labels)), np.union1d(train_idx, val_idx))
    test_idx = _test_indices(remaining, test_size, seed)

    def dataset(indices):
        ds = tf.data.Dataset.from_tensor_slices((images[indices], labels[indices].astype("int32")))
        return ds.map(lambda x, y: (_to_rgb_float(x, size), y), num_parallel_calls=tf.data.AUTOTUNE)

    return FewShotSplits(
        train=dataset(train_idx),
        val=dataset(val_idx),
        test=dataset(test_idx),
        num_classes=num_classes,
        class_names=class_names,
        counts={
            split: _counts(labels[idx], num_classes)
            for split, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx))
        },
        indices={"train": train_idx, "val": val_idx, "test": test_idx},
        image_size=size,
        source=f"arrays ({len(labels)} examples, seed {seed})",
    )

