"""Few-shot sampling (`keras_adaptive_lora.data`) with `tfds.testing.mock_data`.

Two kinds of mock: the stock random generator (real feature specs of
"eurosat/rgb"; note its train and test splits hold the same examples), and
a controlled one for "mnist" whose examples carry their split and index in
their pixels, so that counts, identities and pixel values can be checked
against a numpy oracle.
"""

import functools
import hashlib
import sys

import keras
import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
tfds = pytest.importorskip("tensorflow_datasets")

from keras_adaptive_lora import data  # noqa: E402

# Controlled "mnist": 10 classes, uneven class sizes in train.
TRAIN_COUNTS = [6, 5, 5, 7, 5, 6, 5, 5, 8, 5]
TRAIN_LABELS = np.random.default_rng(7).permutation(np.repeat(np.arange(10), TRAIN_COUNTS))
TEST_LABELS = np.arange(30) % 10
SPLIT_CODE = {"train": 1, "test": 2}


def _fake_image(split, index, label):
    """28x28x1 uint8 whose first pixels encode (split, index); the rest is noise."""
    rng = np.random.default_rng([SPLIT_CODE[split], index])
    image = rng.integers(0, 256, (28, 28, 1)).astype("uint8")
    image[0, 0, 0] = index % 256
    image[0, 1, 0] = index // 256
    image[0, 2, 0] = SPLIT_CODE[split]
    image[0, 3, 0] = label
    return image


def _identity(image):
    """(split code, index) from an image returned by the pipeline."""
    pixels = np.asarray(image)[0, :4, 0].astype(int)
    return int(pixels[2]), int(pixels[0] + 256 * pixels[1])


_ENCODED = {}  # split -> encoded examples (PNG encoding once per session)


def _controlled_as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    features = self.info.features
    if split not in _ENCODED:
        labels = {"train": TRAIN_LABELS, "test": TEST_LABELS}[split]
        _ENCODED[split] = [
            features.encode_example({"image": _fake_image(split, i, int(y)), "label": int(y)})
            for i, y in enumerate(labels)
        ]
    examples = _ENCODED[split]
    specs = features.get_serialized_info()
    signature = tf.nest.map_structure(lambda t: tf.TensorSpec(t.shape, t.dtype), specs)
    ds = tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=signature)
    return ds.map(functools.partial(features.decode_example, decoders=decoders))


@pytest.fixture
def controlled():
    with tfds.testing.mock_data(as_dataset_fn=_controlled_as_dataset):
        yield


def _collect(ds):
    return [(np.asarray(x), int(y)) for x, y in ds.as_numpy_iterator()]


def _digest(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# --------------------------------------------------------------------------
# tfds, controlled examples
# --------------------------------------------------------------------------
def test_counts_identities_and_pixels_match_the_source(controlled):
    splits = data.few_shot_splits("mnist", shots=2, val_per_class=3, image_size=28, seed=0)
    assert splits.num_classes == 10
    assert splits.class_names == [str(c) for c in range(10)]
    spec = splits.train.element_spec
    assert spec[0].shape == (28, 28, 3) and spec[0].dtype == tf.float32
    assert spec[1].shape == () and spec[1].dtype == tf.int32
    for name, per_class in (("train", 2), ("val", 3)):
        examples = _collect(getattr(splits, name))
        assert len(examples) == 10 * per_class
        ids = []
        for image, label in examples:
            code, index = _identity(image)
            assert code == 1 and TRAIN_LABELS[index] == label
            # Grayscale repeated to RGB; same size: the pixels are unchanged.
            expected = np.repeat(_fake_image("train", index, label), 3, axis=-1)
            np.testing.assert_array_equal(image, expected.astype("float32"))
            ids.append(index)
        assert sorted(ids) == list(splits.indices[name])
        assert np.bincount([y for _, y in examples], minlength=10).tolist() == [per_class] * 10
        assert splits.counts[name] == {c: per_class for c in range(10)}
    test = _collect(splits.test)
    assert [_identity(x) for x, _ in test] == [(2, i) for i in range(30)]
    assert [y for _, y in test] == TEST_LABELS.tolist()
    assert splits.counts["test"] == {c: 3 for c in range(10)}


def test_same_split_for_test_is_disjoint_and_subsampled(controlled):
    splits = data.few_shot_splits(
        "mnist", shots=1, val_per_class=2, test_size=12, image_size=28, seed=3,
        test_split="train",
    )
    digests = {name: {_digest(x) for x, _ in _collect(getattr(splits, name))}
               for name in ("train", "val", "test")}
    assert [len(d) for d in digests.values()] == [10, 20, 12]
    assert not digests["train"] & digests["val"]
    assert not digests["train"] & digests["test"]
    assert not digests["val"] & digests["test"]
    used = set(splits.indices["train"]) | set(splits.indices["val"])
    assert not used & set(splits.indices["test"])
    test_ids = sorted(_identity(x)[1] for x, _ in _collect(splits.test))
    assert test_ids == list(splits.indices["test"])
    assert sum(splits.counts["test"].values()) == 12
    assert splits.counts["test"] == {
        c: int(n) for c, n in enumerate(np.bincount(TRAIN_LABELS[test_ids], minlength=10))
    }


def test_seeded_reproducible_nested_and_seed_dependent(controlled):
    def sample(shots, seed):
        return data.few_shot_splits(
            "mnist", shots=shots, val_per_class=1, image_size=28, seed=seed
        )

    a, b = sample(2, 5), sample(2, 5)
    for name in ("train", "val"):
        np.testing.assert_array_equal(a.indices[name], b.indices[name])
        assert [_digest(x) for x, _ in _collect(getattr(a, name))] == [
            _digest(x) for x, _ in _collect(getattr(b, name))
        ]
    other = sample(2, 6)
    assert not np.array_equal(a.indices["train"], other.indices["train"])
    # The 1-shot set is inside the 2-shot set; validation does not move.
    one = sample(1, 5)
    assert set(one.indices["train"]) < set(a.indices["train"])
    np.testing.assert_array_equal(one.indices["val"], a.indices["val"])


def test_resize_and_range(controlled):
    splits = data.few_shot_splits("mnist", shots=1, val_per_class=0, image_size=(16, 20))
    images = np.stack([x for x, _ in _collect(splits.train)])
    assert images.shape == (10, 16, 20, 3) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 255.0 and images.max() > 100.0
    np.testing.assert_array_equal(images[..., 0], images[..., 2])  # from grayscale
    assert len(_collect(splits.val)) == 0 and splits.counts["val"] == {c: 0 for c in range(10)}


def test_too_few_examples_names_the_class(controlled):
    # Classes 1, 2, 4, 6, 7, 9 have 5 training examples; 3 + 3 are needed.
    with pytest.raises(ValueError, match=r"class 1 \('1'\) has 5.*class 9 \('9'\) has 5"):
        data.few_shot_splits("mnist", shots=3, val_per_class=3, image_size=28)


def test_bad_feature_keys(controlled):
    with pytest.raises(ValueError, match="no feature 'img'"):
        data.few_shot_splits("mnist", shots=1, image_key="img")
    with pytest.raises(ValueError, match="not a tfds.features.ClassLabel"):
        data.few_shot_splits("mnist", shots=1, label_key="image")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"shots": 0}, "`shots` must be a positive integer"),
        ({"shots": 1, "val_per_class": -1}, "`val_per_class` must be"),
        ({"shots": 1, "test_size": 0}, "`test_size` must be"),
        ({"shots": 1, "seed": -2}, "`seed` must be"),
        ({"shots": 1, "image_size": (0, 4)}, "`image_size` must be"),
        ({"shots": 1, "image_size": None}, "`image_size` is required"),
    ],
)
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        data.few_shot_splits("mnist", **kwargs)


def test_missing_tfds_names_the_data_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"keras-adaptive-lora\[data\]"):
        data.few_shot_splits("mnist", shots=1)


# --------------------------------------------------------------------------
# tfds, stock random mock with a real RGB dataset's features
# --------------------------------------------------------------------------
def test_random_mock_eurosat():
    with tfds.testing.mock_data(num_examples=120):
        splits = data.few_shot_splits(
            "eurosat/rgb", shots=2, val_per_class=1, image_size=32, test_split="train",
            test_size=20,
        )
        train = _collect(splits.train)
        test = _collect(splits.test)
    assert splits.num_classes == 10 and "Forest" in splits.class_names
    assert splits.counts["train"] == {c: 2 for c in range(10)}
    assert np.bincount([y for _, y in train], minlength=10).tolist() == [2] * 10
    images = np.stack([x for x, _ in train + test])
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.float32
    assert 0.0 <= images.min() and images.max() <= 255.0 and images.std() > 10.0
    assert len(test) == 20
    assert not {_digest(x) for x, _ in train} & {_digest(x) for x, _ in test}


# --------------------------------------------------------------------------
# batched + fit on the current backend
# --------------------------------------------------------------------------
def test_batched_pipeline_trains_a_model(controlled):
    splits = data.few_shot_splits("mnist", shots=2, val_per_class=1, image_size=12)
    train = data.batched(splits.train, 8, shuffle=True, seed=1)
    first = [y.tolist() for _, y in train.as_numpy_iterator()]
    again = [y.tolist() for _, y in data.batched(splits.train, 8, shuffle=True, seed=1)
             .as_numpy_iterator()]
    plain = [y.tolist() for _, y in data.batched(splits.train, 8).as_numpy_iterator()]
    assert [len(b) for b in first] == [8, 8, 4]
    assert first == again and first != plain
    assert sorted(sum(first, [])) == sorted(sum(plain, []))

    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Rescaling(1 / 255.0),
            keras.layers.Flatten(),
            keras.layers.Dense(10),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    before = np.array(keras.ops.convert_to_numpy(model.layers[-1].kernel))
    history = model.fit(train, validation_data=data.batched(splits.val, 16), epochs=2, verbose=0)
    after = keras.ops.convert_to_numpy(model.layers[-1].kernel)
    assert np.isfinite(history.history["loss"]).all()
    assert "val_accuracy" in history.history
    assert not np.allclose(before, after)


def test_batched_errors():
    ds = tf.data.Dataset.range(3)
    with pytest.raises(ValueError, match="`batch_size` must be"):
        data.batched(ds, 0)
    with pytest.raises(ValueError, match="must be a tf.data.Dataset"):
        data.batched(np.zeros(3), 2)


# --------------------------------------------------------------------------
# from_arrays and the index sampler
# --------------------------------------------------------------------------
def _arrays(n=60, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 6, 5)).astype("uint8")  # grayscale, no channel axis
    images[:, 0, 0] = np.arange(n)  # identity
    labels = np.arange(n) % classes
    return images, labels


def test_from_arrays_counts_disjoint_and_pixels():
    images, labels = _arrays()
    splits = data.from_arrays(images, labels, shots=3, val_per_class=2, test_size=25, seed=4,
                              class_names=["a", "b", "c", "d"])
    assert splits.num_classes == 4 and splits.class_names == ["a", "b", "c", "d"]
    assert splits.counts["train"] == {c: 3 for c in range(4)}
    assert splits.counts["val"] == {c: 2 for c in range(4)}
    assert sum(splits.counts["test"].values()) == 25
    seen = {}
    for name in ("train", "val", "test"):
        examples = _collect(getattr(splits, name))
        ids = [int(x[0, 0, 0]) for x, _ in examples]
        assert ids == list(splits.indices[name])
        for (x, y), i in zip(examples, ids):
            assert x.shape == (6, 5, 3) and x.dtype == np.float32 and y == labels[i]
            np.testing.assert_array_equal(x, np.repeat(images[i][..., None], 3, -1))
        seen[name] = set(ids)
    assert not seen["train"] & seen["val"] and not seen["test"] & (seen["train"] | seen["val"])
    # Without test_size the test split is everything else.
    full = data.from_arrays(images, labels, shots=3, val_per_class=2, seed=4)
    assert len(full.indices["test"]) == 60 - 20
    assert set(splits.indices["test"]) <= set(full.indices["test"])


def test_from_arrays_resize_dtypes_and_channels():
    rng = np.random.default_rng(1)
    labels = np.arange(8) % 2
    rgba = rng.integers(0, 256, (8, 4, 4, 4)).astype("uint8")
    splits = data.from_arrays(rgba, labels, shots=1, val_per_class=0, image_size=(8, 6))
    x, _ = _collect(splits.train)[0]
    assert x.shape == (8, 6, 3)
    constant = np.full((8, 5, 7, 1), 65535, "uint16")
    x, _ = _collect(data.from_arrays(constant, labels, shots=1, image_size=3).train)[0]
    np.testing.assert_allclose(x, np.full((3, 3, 3), 255.0), rtol=1e-6)
    floats = rng.normal(size=(8, 3, 3, 3)).astype("float32")
    splits = data.from_arrays(floats, labels, shots=1, val_per_class=0)
    x, y = _collect(splits.train)[0]
    np.testing.assert_array_equal(x, floats[splits.indices["train"][0]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"labels": np.zeros(5, int)}, r"`labels` must have shape \(8,\)"),
        ({"images": np.zeros((8, 3, 3, 2))}, r"1 \(grayscale\), 3 \(RGB\) or 4"),
        ({"images": np.zeros((8, 3))}, "`images` must be an array"),
        ({"class_names": ["x"], "num_classes": 2}, "1 class names for num_classes=2"),
        ({"labels": np.array([0, 1, 2, 0, 1, 2, 0, 5]), "num_classes": 3}, r"must lie in \[0, 3\)"),
        ({"shots": 4, "class_names": ["zero", "one"]}, r"class 0 \('zero'\) has 4, class 1 \('one'\) has 4"),
        ({"shots": 1.5}, "`shots` must be a positive integer"),
    ],
)
def test_from_arrays_errors(kwargs, match):
    args = {"images": np.zeros((8, 3, 3, 3)), "labels": np.arange(8) % 2, "shots": 1,
            "val_per_class": 1}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        data.from_arrays(**args)


def test_few_shot_indices_by_hand():
    labels = np.array([2, 0, 0, 1, 2, 0, 1, 1, 2, 2])
    train, val = data.few_shot_indices(labels, shots=1, val_per_class=1, num_classes=3, seed=0)
    assert sorted(labels[train].tolist()) == [0, 1, 2]
    assert sorted(labels[val].tolist()) == [0, 1, 2]
    assert not set(train) & set(val)
    draws = {tuple(data.few_shot_indices(labels, shots=2, val_per_class=0, num_classes=3,
                                         seed=s)[0]) for s in range(6)}
    assert len(draws) > 1  # the seed matters
    for draw in draws:
        assert np.bincount(labels[list(draw)], minlength=3).tolist() == [2, 2, 2]
