"""The transfer job's data: the few-shot splits (a tfds dataset or the
generated target task), their normalization, and the evaluation set.

Everything is a `tf.data` pipeline (built with `keras_adaptive_lora.data`),
which `fit` accepts on every Keras backend; TensorFlow is imported lazily.
"""

import math

import numpy as np

from keras_adaptive_lora import backend, data
from keras_adaptive_lora.apps.transfer import synthetic
from keras_adaptive_lora.apps.transfer.options import (
    EVAL_BATCH_SIZE,
    PROBE_SIZE,
    TARGET_SEED,
)


def import_tf():
    """`tensorflow`, with an actionable `ImportError` when it is missing."""
    return backend.import_tensorflow(
        "The transfer job feeds `fit` with tf.data pipelines and",
        "pip install 'keras-adaptive-lora[tensorflow]'.",
    )


def load_tfds_splits(dataset, *, shots, seed, val_per_class, test_size, image_size, data_dir,
                     train_split, test_split):
    """`data.few_shot_splits(...)`, with an actionable `ValueError` when the
    dataset cannot be fetched or read (no network, a missing package)."""
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


def to_float(image, label):
    """`(image, label)` with the image cast to float32 (a `dataset.map` function)."""
    return import_tf().cast(image, "float32"), label


def normalized(dataset, scale, offset):
    """`dataset` of `(image in [0, 255], label)` with `image * scale + offset`."""
    tf = import_tf()
    scale, offset = tf.constant(scale), tf.constant(offset)

    def normalize(image, label):
        return image * scale + offset, label

    return dataset.map(normalize, num_parallel_calls=tf.data.AUTOTUNE)


class Evaluation:
    """The validation and test examples as one batched dataset (validation
    first) with their labels, for one `predict` per model.

    Args:
        val: unbatched `(image, label)` dataset, normalized.
        test: the same for the test examples.
        num_val: number of validation examples.
    """

    def __init__(self, val, test, num_val):
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
