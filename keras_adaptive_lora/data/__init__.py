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

from keras_adaptive_lora.data.arrays import from_arrays
from keras_adaptive_lora.data.pipeline import batched
from keras_adaptive_lora.data.sampling import FewShotSplits, few_shot_indices
from keras_adaptive_lora.data.tfds import few_shot_splits

__all__ = [
    "FewShotSplits",
    "batched",
    "few_shot_indices",
    "few_shot_splits",
    "from_arrays",
]
