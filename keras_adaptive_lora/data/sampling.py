"""Few-shot index sampling and the `FewShotSplits` result (numpy only).

The seeded per-class draw that `few_shot_splits` and `from_arrays` share,
the argument and label checks, and the test subsample. Nothing here imports
TensorFlow.
"""

import numbers

import numpy as np

from keras_adaptive_lora._validation import check_int


# --------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------
_check_int = check_int  # one set of checks for the package (`_validation`)


def _check_image_size(image_size):
    if image_size is None:
        return None
    if isinstance(image_size, numbers.Integral) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    try:
        height, width = image_size
        size = (_check_int("image_size", height, 1), _check_int("image_size", width, 1))
    except (TypeError, ValueError):
        raise ValueError(
            "`image_size` must be a positive int or a (height, width) pair of "
            f"positive ints, got {image_size!r}."
        ) from None
    return size


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------
class FewShotSplits:
    """Train / validation / test splits of a few-shot classification task.

    Attributes:
        train: `tf.data.Dataset` of `(image, label)`, unbatched: `image`
            float32 `(h, w, 3)` in the raw pixel range `[0, 255]` (for uint8
            sources), `label` an int32 scalar. Exactly `shots` examples per
            class, in source-index order (shuffle with `batched`).
        val: the same, `val_per_class` examples per class.
        test: the same; for tfds sources streamed from disk.
        num_classes: the number of classes.
        class_names: list of `num_classes` strings.
        counts: `{"train" | "val" | "test": {class_id: count}}`, every class
            listed.
        indices: `{"train" | "val" | "test": sorted int64 numpy array}`, the
            positions of the examples in their source split (in the split's
            fixed read order) or in the arrays given to `from_arrays`.
        image_size: `(height, width)` of the images, or None where the
            images keep their source size.
        source: a short description of where the examples come from.
    """

    def __init__(
        self, *, train, val, test, num_classes, class_names, counts, indices, image_size, source
    ):
        self.train = train
        self.val = val
        self.test = test
        self.num_classes = num_classes
        self.class_names = class_names
        self.counts = counts
        self.indices = indices
        self.image_size = image_size
        self.source = source

    def __repr__(self):
        sizes = ", ".join(f"{split} {sum(c.values())}" for split, c in self.counts.items())
        return (
            f"FewShotSplits({self.source}: {self.num_classes} classes, {sizes} "
            f"examples, image size {self.image_size})"
        )


# --------------------------------------------------------------------------
# Index sampling (pure numpy)
# --------------------------------------------------------------------------
def _check_labels(labels, num_classes, where):
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Labels of {where} must be a 1-D array of integer class ids; got "
            f"dtype {labels.dtype} and shape {labels.shape}."
        )
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"Labels of {where} must lie in [0, {num_classes}) (num_classes="
            f"{num_classes}); found values in [{labels.min()}, {labels.max()}]."
        )
    return labels.astype("int64")


def few_shot_indices(labels, *, shots, val_per_class, num_classes, seed=0, class_names=None,
                     where="the dataset"):
    """Seeded per-class train and validation indices into `labels`.

    For each class in class-id order, a permutation of its indices is drawn
    from `numpy.random.default_rng(seed)`: its first `shots` entries are the
    training examples and its last `val_per_class` entries the validation
    examples. The training sets of one seed are nested across `shots`, and
    the validation set does not depend on `shots`.

    Args:
        labels: 1-D integer array of class ids in `[0, num_classes)`.
        shots: training examples per class (>= 1).
        val_per_class: validation examples per class (>= 0).
        num_classes: the number of classes.
        seed: the sampling seed (>= 0). Defaults to 0.
        class_names: names used in error messages. Defaults to None.
        where: what `labels` are, for error messages. Defaults to
            "the dataset".

    Returns:
        `(train, val)`: sorted int64 numpy arrays of indices into `labels`.
    """
    shots = _check_int("shots", shots, 1)
    val_per_class = _check_int("val_per_class", val_per_class, 0)
    num_classes = _check_int("num_classes", num_classes, 1)
    seed = _check_int("seed", seed, 0)
    labels = _check_labels(labels, num_classes, where)
    needed = shots + val_per_class
    order = np.argsort(labels, kind="stable")  # indices grouped by class
    sizes = np.bincount(labels, minlength=num_classes)
    short = [(c, int(n)) for c, n in enumerate(sizes) if n < needed]
    if short:
        names = class_names or [str(c) for c in range(num_classes)]
        listed = ", ".join(f"class {c} ('{names[c]}') has {n}" for c, n in short[:10])
        more = f" and {len(short) - 10} more classes" if len(short) > 10 else ""
        raise ValueError(
            f"Not enough examples in {where}: shots={shots} + val_per_class="
            f"{val_per_class} = {needed} are needed per class, but {listed}{more}. "
            "Lower `shots` / `val_per_class`, or sample from a larger split."
        )
    rng = np.random.default_rng(seed)
    train, val = [], []
    starts = np.concatenate([[0], np.cumsum(sizes)])
    for c in range(num_classes):
        members = rng.permutation(order[starts[c] : starts[c + 1]])
        train.append(members[:shots])
        if val_per_class:
            val.append(members[len(members) - val_per_class :])
    train = np.sort(np.concatenate(train)).astype("int64")
    val = np.sort(np.concatenate(val)).astype("int64") if val else np.zeros((0,), "int64")
    return train, val


def _test_indices(candidates, test_size, seed):
    """A seeded subsample of `candidates` of at most `test_size` (sorted)."""
    candidates = np.asarray(candidates, "int64")
    if test_size is None or test_size >= len(candidates):
        return candidates
    rng = np.random.default_rng([seed, 1])  # independent of the train draw
    return np.sort(rng.choice(candidates, size=test_size, replace=False)).astype("int64")


def _counts(labels, num_classes):
    return {c: int(n) for c, n in enumerate(np.bincount(labels, minlength=num_classes))}


def _in_set(indices, size):
    """A boolean lookup `mask[i] = i in indices`, for `tf.data` filters."""
    mask = np.zeros((max(int(size), 1),), bool)
    mask[indices] = True
    return mask

