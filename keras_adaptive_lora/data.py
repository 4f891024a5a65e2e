"""Few-shot splits of image classification datasets (VTAB-1k / MedFM style).

`few_shot_splits` samples `shots` training and `val_per_class` validation
examples per class from a `tensorflow_datasets` split, seeded, and returns
`tf.data` pipelines of `(image float32 (h, w, 3) in [0, 255], label int32)`
that `model.fit` accepts on every Keras backend. `from_arrays` does the same
for in-memory numpy arrays (the offline synthetic job). `batched` batches,
optionally shuffles and prefetches a split.

How the sampling works, and what it costs (for a tfds split of `N` records):

1. A label pass reads the train split once, in its fixed file order, with
   image decoding skipped: `N` record reads, no image decode, and `N` labels
   (int64 numpy, 8 bytes each) kept in memory.
2. Per class (in class-id order) a seeded permutation of that class's indices:
   the first `shots` are the training examples, the last `val_per_class` the
   validation examples. So for one seed the training sets are nested across
   `shots` (the 1-shot set is inside the 5-shot set) and the validation set
   does not depend on `shots`.
3. A selection pass reads the split again up to the last selected record and
   keeps the *encoded* images (PNG/JPEG bytes) of the selected examples only:
   memory is the compressed size of `num_classes * (shots + val_per_class)`
   images. Images are decoded, converted to 3 channels and resized inside
   the `tf.data` pipeline, at iteration time.
4. The test split is streamed from disk at every iteration (an index filter,
   decode and resize); a label pass over it gives the per-class test counts
   and, with `test_size`, the seeded subsample. When `test_split` equals
   `train_split`, the test examples are drawn from the records not used for
   train or validation, so the three splits never share a record.
   Call `.cache()` on `splits.test` to keep it in memory instead.

`tensorflow` and `tensorflow_datasets` are imported lazily, inside the
functions that need them (install the `data` extra).
"""

import numbers

import numpy as np

_DATA_EXTRA = "pip install 'keras-adaptive-lora[data]'"


def _import_tf():
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(
            "keras_adaptive_lora.data builds tf.data pipelines and needs "
            f"TensorFlow: {_DATA_EXTRA} tensorflow"
        ) from None
    return tf


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
# Argument checks
# --------------------------------------------------------------------------
def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return int(value)


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


# --------------------------------------------------------------------------
# Image preprocessing (inside tf.data)
# --------------------------------------------------------------------------
def _to_rgb_float(image, image_size):
    """uint8 / integer / float image (h, w), (h, w, 1|3|4) -> float32 (h, w, 3).

    Integer images are scaled to `[0, 255]` (uint8 is kept as is), float
    images keep their values. Grayscale is repeated to 3 channels, an alpha
    channel is dropped. With `image_size`, the image is resized (bilinear,
    antialiased) and clipped to the input's value range.
    """
    tf = _import_tf()
    image = tf.convert_to_tensor(image)
    if image.shape.rank == 2:
        image = image[..., None]
    if image.shape.rank != 3:
        raise ValueError(
            f"Images must be (height, width) or (height, width, channels); got "
            f"an image of shape {image.shape}."
        )
    dtype = image.dtype
    if dtype == tf.uint8 or dtype.is_floating:
        image = tf.cast(image, "float32")
    elif dtype.is_integer:
        image = tf.cast(image, "float32") * (255.0 / float(dtype.max))
    else:
        raise ValueError(f"Images must have an integer or float dtype, got {dtype.name}.")
    channels = image.shape[-1]
    if channels == 1:
        image = tf.repeat(image, 3, axis=-1)
    elif channels == 4:
        image = image[..., :3]
    elif channels is None:
        image = tf.cond(
            tf.equal(tf.shape(image)[-1], 1),
            lambda: tf.repeat(image, 3, axis=-1),
            lambda: image[..., :3],
        )
    elif channels != 3:
        raise ValueError(
            f"Images must have 1 (grayscale), 3 (RGB) or 4 (RGBA) channels; got {channels}."
        )
    image = tf.ensure_shape(image, (None, None, 3))
    if image_size is not None:
        low, high = tf.reduce_min(image), tf.reduce_max(image)
        image = tf.image.resize(image, image_size, method="bilinear", antialias=True)
        image = tf.clip_by_value(image, low, high)
        image = tf.ensure_shape(image, (*image_size, 3))
    return image


def _in_set(indices, size):
    """A boolean lookup `mask[i] = i in indices`, for `tf.data` filters."""
    mask = np.zeros((max(int(size), 1),), bool)
    mask[indices] = True
    return mask


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
    pipeline. See the module docstring for the passes over the data and the
    memory they need.

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


# --------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------
def batched(ds, batch_size, *, shuffle=False, seed=0, buffer_size=None, drop_remainder=False):
    """Batch (optionally shuffle) and prefetch a split for `model.fit`.

    The result is a `tf.data.Dataset` of `(images (b, h, w, 3), labels (b,))`
    batches, which Keras's `fit`, `evaluate` and `predict` accept on the
    torch, tensorflow and jax backends.

    Args:
        ds: an unbatched `tf.data.Dataset`, e.g. `splits.train`.
        batch_size: examples per batch.
        shuffle: shuffle the examples, anew at every epoch (iteration).
            Defaults to False.
        seed: the shuffle seed. Defaults to 0.
        buffer_size: the shuffle buffer, in examples (it holds preprocessed
            images: 224x224x3 float32 is 0.6 MB each). Defaults to None: the
            dataset's size when known, at most 1024.
        drop_remainder: drop a last, smaller batch (static batch shapes).
            Defaults to False.

    Returns:
        The batched, prefetched `tf.data.Dataset`.
    """
    tf = _import_tf()
    if not isinstance(ds, tf.data.Dataset):
        raise ValueError(f"`ds` must be a tf.data.Dataset (e.g. `splits.train`); got {type(ds).__name__}.")
    batch_size = _check_int("batch_size", batch_size, 1)
    if shuffle:
        seed = _check_int("seed", seed, 0)
        if buffer_size is None:
            size = int(ds.cardinality())
            buffer_size = min(size, 1024) if size > 0 else 1024
        buffer_size = _check_int("buffer_size", buffer_size, 1)
        ds = ds.shuffle(buffer_size, seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size, drop_remainder=bool(drop_remainder)).prefetch(tf.data.AUTOTUNE)
