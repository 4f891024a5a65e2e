"""tf.data helpers: the lazy TensorFlow import, image conversion, batching.

`tensorflow` is imported inside the functions that need it (install the
`data` extra; `backend.import_tensorflow`), never at module import.
"""

from keras_adaptive_lora import backend
from keras_adaptive_lora.data.sampling import _check_int

_DATA_EXTRA = "pip install 'keras-adaptive-lora[data]'"


def _import_tf():
    return backend.import_tensorflow(
        "keras_adaptive_lora.data builds tf.data pipelines and", f"{_DATA_EXTRA} tensorflow"
    )


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
