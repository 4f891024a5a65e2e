"""Adapter-only files (`save_adapters`/`load_adapters`) and each of their
error cases, the `.keras` and `save_to_preset` guards, weights-only
checkpoints, `save_merged`, and failed writes that leave the previous file
or SavedModel as it was. Runs under every KERAS_BACKEND. Resume,
cross-backend moves and SavedModel export for every method are in
`test_persistence_matrix.py`."""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.saving import read_adapter_file
from keras_adaptive_lora.saving._atomic import replacing_folder
from keras_adaptive_lora.saving.export import _SAVED_MODEL_ENTRIES

from conftest import tiny_gemma, to_numpy, token_batch

METHODS = {
    "lora": lambda: kal.LoRA(rank=2, alpha=4.0),
    "stable_rank": lambda: kal.StableRankLoRA(seed=3),
    "flexlora": lambda: kal.FlexLoRA(rank=2, seed=5),
    "sinc": lambda: kal.SincLoRA(rank=2, grid_size=5),
}


def _lm(backbone):
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


# --------------------------------------------------------------------------
# save_adapters / load_adapters
# --------------------------------------------------------------------------
def test_file_is_small_and_keyed_by_path(tmp_path):
    lm = _lm(tiny_gemma())
    kal.apply_adapters(lm, kal.LoRA(rank=2, alpha=4.0), targets=["query", "value"])
    path = str(tmp_path / "adapters.npz")
    kal.save_adapters(lm, path)
    with np.load(path, allow_pickle=False) as data:
        keys = set(data.files)
        metadata = json.loads(str(data["__metadata__"]))
    assert keys == {
        "__metadata__",
        "decoder_block_0/attention/query::lora_a",
        "decoder_block_0/attention/query::lora_b",
        "decoder_block_0/attention/value::lora_a",
        "decoder_block_0/attention/value::lora_b",
    }
    assert metadata["library_version"] == kal.__version__
    assert metadata["methods"] == [
        {
            "name": "lora",
            "class_name": "LoRA",
            "config": {"rank": 2, "alpha": 4.0, "dropout": 0.0, "rslora": False},
            "targets": ["query", "value"],
        }
    ]
    query = metadata["layers"][0]
    assert query["path"] == "decoder_block_0/attention/query"
    assert query["wrapped_type"] == "EinsumDense"
    assert query["kernel_shape"] == [4, 16, 4]
    assert query["adapter_config"]["alpha"] == 4.0 and query["rank"] == 2
    assert query["adapter_class"] == "keras_adaptive_lora>LoRAAdapter"
    assert metadata["train_also"] == []


# --------------------------------------------------------------------------
# Errors: nothing half-applied
# --------------------------------------------------------------------------
def _saved(backbone, tmp_path, method=None, targets=None):
    kal.apply_adapters(backbone, method or kal.LoRA(rank=2), targets=targets)
    for a in kal.find_adapters(backbone):
        a.lora_b.assign(np.full(a.lora_b.shape, 0.1, "float32"))
    path = str(tmp_path / "adapters.npz")
    kal.save_adapters(backbone, path)
    return path


def _snapshot(model):
    return (
        [type(layer).__name__ for layer in model.layers],
        [(v.path, v.trainable) for v in model.weights],
        [getattr(layer, "activation", None) for layer in model._flatten_layers()],
    )


def test_other_kernel_shape_raises_and_changes_nothing(tmp_path):
    # query fits (4 heads) but value does not (2 kv heads instead of 1).
    path = _saved(tiny_gemma(), tmp_path)
    other = tiny_gemma(num_key_value_heads=2)
    x = token_batch()
    before, snapshot = to_numpy(other(x)), _snapshot(other)
    with pytest.raises(
        ValueError, match=r"'decoder_block_0/attention/value'.*\(2, 16, 4\).*\(1, 16, 4\)"
    ):
        kal.load_adapters(other, path)
    assert kal.find_adapters(other) == []
    assert _snapshot(other) == snapshot
    np.testing.assert_array_equal(to_numpy(other(x)), before)


def test_missing_layer_raises_and_changes_nothing(tmp_path):
    path = _saved(tiny_gemma(num_layers=2), tmp_path)
    other = tiny_gemma(num_layers=1)
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"'decoder_block_1/attention/query' .* is not in"):
        kal.load_adapters(other, path)
    assert kal.find_adapters(other) == [] and _snapshot(other) == snapshot


def test_already_adapted_and_bad_files_raise(tmp_path):
    backbone = tiny_gemma()
    path = _saved(backbone, tmp_path)
    with pytest.raises(ValueError, match="'decoder_block_0/attention/query' already has an adapter"):
        kal.load_adapters(backbone, path)
    with pytest.raises(ValueError, match="has no adapters to save"):
        kal.save_adapters(tiny_gemma(), str(tmp_path / "none.npz"))
    junk = tmp_path / "junk.npz"
    np.savez(str(junk), a=np.zeros(2))
    with pytest.raises(ValueError, match="not written by"):
        kal.load_adapters(tiny_gemma(), str(junk))


def test_wrong_variable_shape_in_file_rolls_back(tmp_path):
    # A file whose second layer's factor has another shape: the first adapter
    # is already built when this is found, and must be undone.
    path = _saved(tiny_gemma(), tmp_path)
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["decoder_block_0/attention/value::lora_b"] = np.zeros((2, 5), "float32")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    other = tiny_gemma()
    snapshot = _snapshot(other)
    with pytest.raises(ValueError, match=r"'decoder_block_0/attention/value', variable 'lora_b'.*\(2, 5\)"):
        kal.load_adapters(other, path)
    assert kal.find_adapters(other) == [] and _snapshot(other) == snapshot


# --------------------------------------------------------------------------
# Whole-model .keras files
# --------------------------------------------------------------------------
def _functional():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    outputs = keras.layers.Dense(3, name="out")(hidden)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("kind", ["gemma", "functional"])
def test_keras_file_with_unmerged_adapters_raises(kind, tmp_path):
    model = tiny_gemma() if kind == "gemma" else _functional()
    targets = None if kind == "gemma" else ["hidden"]
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=targets)
    with pytest.raises(ValueError, match=r"unmerged LoRAAdapter.*merge_adapters.*save_adapters"):
        model.save(str(tmp_path / "model.keras"))


def test_weights_checkpoint_still_works_with_adapters(tmp_path):
    model = _functional()
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["hidden"])
    adapter = kal.find_adapters(model)[0]
    adapter.lora_b.assign(np.ones(adapter.lora_b.shape, "float32"))
    path = str(tmp_path / "ckpt.weights.h5")
    model.save_weights(path)
    want = adapter.lora_b.numpy() if hasattr(adapter.lora_b, "numpy") else to_numpy(adapter.lora_b)
    adapter.lora_b.assign(np.zeros(adapter.lora_b.shape, "float32"))
    model.load_weights(path)
    np.testing.assert_array_equal(to_numpy(adapter.lora_b), want)


def test_merged_keras_file_round_trips(tmp_path):
    model = _functional()
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["hidden"])
    adapter = kal.find_adapters(model)[0]
    adapter.lora_b.assign(np.full(adapter.lora_b.shape, 0.3, "float32"))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    want = to_numpy(model(x))
    path = str(tmp_path / "merged.keras")
    kal.save_merged(model, path)
    assert kal.find_adapters(model) == [adapter]  # the merge was temporary
    np.testing.assert_allclose(to_numpy(model(x)), want, atol=1e-6)
    reloaded = keras.saving.load_model(path)
    assert kal.find_adapters(reloaded) == []
    np.testing.assert_allclose(to_numpy(reloaded(x)), want, atol=1e-5)


# --------------------------------------------------------------------------
# Corrupted, edited or mismatched files: an actionable error, nothing changed
# --------------------------------------------------------------------------
def _rewrite(path, out, edit):
    """Copy the adapter file at `path` to `out` with `edit(metadata, arrays)`
    applied; `edit` may also replace the metadata entry itself."""
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    metadata = json.loads(str(arrays["__metadata__"]))
    edit(metadata, arrays)
    if "__metadata__" in arrays and not isinstance(arrays["__metadata__"], str):
        arrays["__metadata__"] = np.asarray(json.dumps(metadata))
    with open(out, "wb") as f:
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _value_layer(metadata):
    return next(e for e in metadata["layers"] if e["path"].endswith("/value"))


def _set(mapping, key, value):
    mapping[key] = value


CORRUPTIONS = {
    # The metadata: unparsable, missing, another format, missing fields.
    "json": (lambda m, a: _set(a, "__metadata__", "{not json"), "not valid JSON"),
    "no_metadata": (lambda m, a: a.pop("__metadata__"), "has no '__metadata__' entry"),
    "format": (lambda m, a: _set(m, "format_version", 99), r"format .*99.*Upgrade"),
    "no_layers": (lambda m, a: m.pop("layers"), "no list of adapted 'layers'"),
    "no_field": (
        lambda m, a: _value_layer(m).pop("kernel_shape"),
        r"layer entry 1 \('decoder_block_0/attention/value'\) has no valid 'kernel_shape'",
    ),
    "duplicate": (lambda m, a: m["layers"].append(m["layers"][0]), "occurs twice"),
    "method_index": (lambda m, a: _set(_value_layer(m), "method_index", 3), "'method_index' 3"),
    "method_entry": (lambda m, a: m["methods"].append(3), "method entry 1 is not a JSON object"),
    # An array named in the metadata is missing.
    "no_array": (
        lambda m, a: a.pop("decoder_block_0/attention/value::lora_b"),
        r"'decoder_block_0/attention/value::lora_b' of variable 'lora_b' is missing",
    ),
    "no_train_also_array": (
        lambda m, a: m["train_also"].append({"key": "train_also::x", "path": "x"}),
        r"'train_also::x' of variable 'x' is missing",
    ),
    # The method spec of a layer does not fit: another class, a bad config.
    "unknown_class": (
        lambda m, a: _set(_value_layer(m), "adapter_class", "keras_adaptive_lora>Nope"),
        r"'decoder_block_0/attention/value': unknown adapter class",
    ),
    "other_method": (
        lambda m, a: _set(_value_layer(m), "adapter_class", "keras_adaptive_lora>FlexLoRAAdapter"),
        r"'decoder_block_0/attention/value': cannot rebuild a FlexLoRAAdapter",
    ),
    "bad_config": (
        lambda m, a: _value_layer(m)["adapter_config"].update(rank=99),
        r"'decoder_block_0/attention/value': cannot rebuild a LoRAAdapter .*rank",
    ),
    "activation": (
        lambda m, a: _set(_value_layer(m), "activation", "relu"),
        r"'decoder_block_0/attention/value' has activation 'linear' .* 'relu'",
    ),
    # The file contradicts itself: its recorded rank or config vs its arrays.
    "recorded_rank": (
        lambda m, a: _set(_value_layer(m), "rank", 1),
        r"'decoder_block_0/attention/value': the file records rank 1 but its arrays "
        r"hold a rank-2 LoRAAdapter.*contradicts itself",
    ),
    "config_rank": (
        lambda m, a: _value_layer(m)["adapter_config"].update(rank=1),
        r"'decoder_block_0/attention/value', variable 'lora_a': the file's array has shape "
        r"\(16, 2\) but its recorded config \(.*rank=1.*\) builds shape \(16, 1\).*contradicts itself",
    ),
}


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    return _saved(tiny_gemma(), tmp_path_factory.mktemp("lora_file"))


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupted_or_mismatched_file_raises_and_changes_nothing(case, lora_file, tmp_path):
    edit, message = CORRUPTIONS[case]
    path = str(tmp_path / "edited.npz")
    _rewrite(lora_file, path, edit)
    model = tiny_gemma()
    x = token_batch()
    before, snapshot = to_numpy(model(x)), _snapshot(model)
    with pytest.raises(ValueError, match=message):
        kal.load_adapters(model, path)
    assert kal.find_adapters(model) == []
    assert _snapshot(model) == snapshot
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    kal.load_adapters(model, lora_file)  # the model is still a clean base
    assert len(kal.find_adapters(model)) == 2


def test_unreadable_files_raise(tmp_path):
    truncated = tmp_path / "truncated.npz"
    with open(_saved(tiny_gemma(), tmp_path), "rb") as f:
        truncated.write_bytes(f.read()[:200])
    with pytest.raises(ValueError, match="Cannot read adapter file .*BadZipFile"):
        kal.load_adapters(tiny_gemma(), str(truncated))
    with pytest.raises(ValueError, match="Cannot read adapter file"):
        kal.load_adapters(tiny_gemma(), str(tmp_path / "missing.npz"))


def test_loaded_report_has_the_method(lora_file, tmp_path):
    # Found by the registered name; in a file written before the name was
    # stored, by the spec's class name; else the file's class names.
    assert kal.load_adapters(tiny_gemma(), lora_file).method == kal.LoRA(rank=2)
    old = str(tmp_path / "old.npz")
    _rewrite(lora_file, old, lambda m, a: m["methods"][0].pop("name"))
    assert kal.load_adapters(tiny_gemma(), old).method == kal.LoRA(rank=2)
    unknown = str(tmp_path / "unknown.npz")
    _rewrite(lora_file, unknown, lambda m, a: m["methods"][0].update(name="nope", class_name="Nope"))
    assert kal.load_adapters(tiny_gemma(), unknown).method == "Nope"


# --------------------------------------------------------------------------
# keras-hub presets
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_to_preset_with_unmerged_adapters_raises(name, tmp_path):
    backbone = tiny_gemma()
    kal.apply_adapters(backbone, METHODS[name]())
    for adapter in kal.find_adapters(backbone):  # a nonzero update
        for _, variable in adapter.own_variables():
            if variable.trainable:
                variable.assign(np.full(variable.shape, 0.2, "float32"))
    message = r"unmerged .*save_to_preset.*merge_adapters.*save_adapters"
    with pytest.raises(ValueError, match=message):
        backbone.save_to_preset(str(tmp_path / "backbone"))
    with pytest.raises(ValueError, match=message):
        _lm(backbone).save_to_preset(str(tmp_path / "task"))
    # Merged, the preset round-trips with the adapted outputs.
    x = token_batch()
    want = to_numpy(backbone(x))
    kal.merge_adapters(backbone)
    backbone.save_to_preset(str(tmp_path / "merged"))
    reloaded = keras_hub.models.GemmaBackbone.from_preset(str(tmp_path / "merged"))
    np.testing.assert_allclose(to_numpy(reloaded(x)), want, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------
# Weights files hold the adapters' seed-generator states
# --------------------------------------------------------------------------
def test_weights_store_holds_seed_generator_state():
    keras.utils.set_random_seed(5)
    backbone = tiny_gemma()
    kal.apply_adapters(backbone, kal.StableRankLoRA(seed=3), targets=["query"])
    adapter = kal.find_adapters(backbone)[0]
    adapter.sample_rank()  # advance the SPU sampler
    store = {}
    adapter.save_own_variables(store)
    store = {k: to_numpy(v) for k, v in store.items()}
    state = to_numpy(adapter.seed_generator.state)
    assert len(store) == 3
    np.testing.assert_array_equal(store["2"], state)
    assert state[1] != 0  # advanced, not the initial state

    keras.utils.set_random_seed(5)  # the same kernel, so the same SR-LoRA rank
    other = tiny_gemma()
    kal.apply_adapters(other, kal.StableRankLoRA(seed=3), targets=["query"])
    fresh = kal.find_adapters(other)[0]
    fresh.load_own_variables(store)
    np.testing.assert_array_equal(to_numpy(fresh.seed_generator.state), state)
    np.testing.assert_array_equal(to_numpy(fresh.lora_a), store["0"])
    # A file written without the state still loads (the sampler is kept) ...
    initial = to_numpy(fresh.seed_generator.state)
    fresh.load_own_variables({"0": store["0"], "1": store["1"]})
    np.testing.assert_array_equal(to_numpy(fresh.seed_generator.state), initial)
    # ... and another count is Keras's own error.
    with pytest.raises(ValueError, match="expected 2 variables, but received 1"):
        fresh.load_own_variables({"0": store["0"]})
    # An adapter dropout's sampler is stored too; the wrapped layer's are not.
    dropped = tiny_gemma()
    kal.apply_adapters(dropped, kal.LoRA(rank=2, dropout=0.1), targets=["query"])
    adapter = kal.find_adapters(dropped)[0]
    store = {}
    adapter.save_own_variables(store)
    assert len(store) == 3 and store["2"] is adapter._dropout_layer.seed_generator.state


# --------------------------------------------------------------------------
# A failed write leaves the previous file or folder as it was
# --------------------------------------------------------------------------
def _listing(folder):
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_save_adapters_keeps_previous_file(error, tmp_path, monkeypatch):
    backbone = tiny_gemma()
    path = _saved(backbone, tmp_path)  # lora_b = 0.1
    before = (tmp_path / "adapters.npz").read_bytes()
    for a in kal.find_adapters(backbone):
        a.lora_b.assign(np.full(a.lora_b.shape, 0.7, "float32"))
    written = []

    def savez(file, *args, **kwargs):  # half a zip, then the disk is full
        written.append(file.name)
        file.write(b"PK\x03\x04half a zip")
        raise error("disk full")

    monkeypatch.setattr(np, "savez", savez)
    with pytest.raises(error, match="disk full"):
        kal.save_adapters(backbone, path)
    with pytest.raises(error, match="disk full"):  # no previous file: none appears
        kal.save_adapters(backbone, str(tmp_path / "new.npz"))
    monkeypatch.undo()
    assert len(written) == 2
    assert all(os.path.dirname(w) == os.path.realpath(tmp_path) for w in written)
    assert _listing(tmp_path) == ["adapters.npz"]  # no temporary left behind
    assert (tmp_path / "adapters.npz").read_bytes() == before
    fresh = tiny_gemma()
    kal.load_adapters(fresh, path)
    for a in kal.find_adapters(fresh):
        np.testing.assert_array_equal(to_numpy(a.lora_b), np.full(a.lora_b.shape, 0.1, "float32"))
    # A save that succeeds replaces the file.
    kal.save_adapters(backbone, path)
    _, arrays = read_adapter_file(path)
    lora_b = [v for k, v in arrays.items() if k.endswith("::lora_b")]
    assert len(lora_b) == 2 and all(np.all(v == np.float32(0.7)) for v in lora_b)
    assert _listing(tmp_path) == ["adapters.npz"]


def _adapted_functional(value):
    model = _functional()
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["hidden"])
    adapter = kal.find_adapters(model)[0]
    adapter.lora_b.assign(np.full(adapter.lora_b.shape, value, "float32"))
    x = np.random.default_rng(0).normal(size=(4, 6)).astype("float32")
    return model, adapter, x


@pytest.mark.parametrize("error", [OSError, KeyboardInterrupt])
def test_failed_save_merged_keeps_previous_file(error, tmp_path, monkeypatch):
    model, adapter, x = _adapted_functional(0.3)
    old = to_numpy(model(x))
    path = str(tmp_path / "merged.keras")
    kal.save_merged(model, path)
    before = (tmp_path / "merged.keras").read_bytes()
    adapter.lora_b.assign(np.full(adapter.lora_b.shape, -0.5, "float32"))
    new = to_numpy(model(x))
    written = []

    def save(self, filepath, *args, **kwargs):  # half a zip, then the disk is full
        written.append(str(filepath))
        with open(filepath, "wb") as f:
            f.write(b"PK\x03\x04half a zip")
        raise error("disk full")

    monkeypatch.setattr(keras.Model, "save", save)
    with pytest.raises(error, match="disk full"):
        kal.save_merged(model, path)
    monkeypatch.undo()
    assert len(written) == 1 and written[0].endswith(".keras")  # Keras checks the suffix
    assert os.path.dirname(written[0]) == os.path.realpath(tmp_path)
    assert _listing(tmp_path) == ["merged.keras"]
    assert (tmp_path / "merged.keras").read_bytes() == before
    np.testing.assert_allclose(to_numpy(keras.saving.load_model(path)(x)), old, atol=1e-5)
    # The model got its adapters back, unmerged.
    assert kal.find_adapters(model) == [adapter]
    np.testing.assert_array_equal(to_numpy(model(x)), new)
    # A save that succeeds replaces the file; another suffix is refused.
    kal.save_merged(model, path)
    np.testing.assert_allclose(to_numpy(keras.saving.load_model(path)(x)), new, atol=1e-5)
    with pytest.raises(ValueError, match=r"'.*merged\.bin' does not end in `\.keras`"):
        kal.save_merged(model, str(tmp_path / "merged.bin"))
    assert _listing(tmp_path) == ["merged.keras"] and kal.find_adapters(model) == [adapter]


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="SavedModel export needs tensorflow"
)
def test_failed_export_merged_keeps_previous_saved_model(tmp_path, monkeypatch):
    import tensorflow as tf

    def serve(path):
        saved = tf.saved_model.load(path)  # kept alive while serving
        return np.asarray(saved.serve(x))

    model, x = tiny_gemma(), token_batch()
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["query"])
    [adapter] = kal.find_adapters(model)
    adapter.lora_b.assign(np.full(adapter.lora_b.shape, 0.3, "float32"))
    old = to_numpy(model(x))
    path = str(tmp_path / "saved_model")
    kal.export_merged(model, path)
    # What an export writes can be replaced by the next export.
    assert set(os.listdir(path)) <= set(_SAVED_MODEL_ENTRIES)
    adapter.lora_b.assign(np.full(adapter.lora_b.shape, -0.5, "float32"))
    new = to_numpy(model(x))
    assert np.abs(new - old).max() > 1e-3

    def export(self, filepath, *args, **kwargs):  # part of a SavedModel, then a failure
        os.makedirs(filepath)
        with open(os.path.join(filepath, "saved_model.pb"), "wb") as f:
            f.write(b"half a graph")
        raise OSError("disk full")

    monkeypatch.setattr(keras.Model, "export", export)
    with pytest.raises(OSError, match="disk full"):
        kal.export_merged(model, path, overwrite=True)
    monkeypatch.undo()
    assert _listing(tmp_path) == ["saved_model"]
    np.testing.assert_allclose(serve(path), old, atol=1e-5)
    assert kal.find_adapters(model) == [adapter]
    # An export that succeeds replaces the SavedModel as a whole.
    kal.export_merged(model, path, overwrite=True)
    assert _listing(tmp_path) == ["saved_model"]
    np.testing.assert_allclose(serve(path), new, atol=1e-5)
    # A folder holding anything else is refused and left alone.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"'notes\.txt'.*nothing was written"):
        kal.export_merged(model, str(other))
    assert _listing(other) == ["notes.txt"] and (other / "notes.txt").read_text() == "keep"
    assert _listing(tmp_path) == ["notes", "saved_model"]


def test_replacing_folder_swaps_all_or_nothing(tmp_path, monkeypatch):
    """The folder swap of `export_merged`, under every backend."""
    target = tmp_path / "out"
    entries = ["saved_model.pb", "variables"]

    def write(folder, text):
        os.makedirs(os.path.join(folder, "variables"))
        with open(os.path.join(folder, "saved_model.pb"), "w") as f:
            f.write(text)

    def content():
        assert _listing(tmp_path) == ["out"]  # no temporary or old folder left
        return (target / "saved_model.pb").read_text()

    with replacing_folder(target, entries) as temp:
        assert not os.path.exists(temp) and os.path.dirname(temp) == os.path.realpath(tmp_path)
        write(temp, "one")
    assert content() == "one"
    # Failing while writing: the old folder stays.
    with pytest.raises(RuntimeError, match="halfway"):
        with replacing_folder(target, entries) as temp:
            write(temp, "half")
            raise RuntimeError("halfway")
    assert content() == "one"
    # Failing to rename the new folder in: the old one is renamed back.
    rename = os.rename

    def failing_rename(src, dst):
        if ".tmp-" in os.path.basename(src):
            raise OSError("rename failed")
        return rename(src, dst)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        with replacing_folder(target, entries) as temp:
            write(temp, "two")
    monkeypatch.undo()
    assert content() == "one"
    with replacing_folder(target, entries) as temp:
        write(temp, "three")
    assert content() == "three"
    # Refused before anything is written: a file at the path, a folder
    # holding other entries.
    (target / "notes.txt").write_text("keep")
    with pytest.raises(ValueError, match="'notes.txt'"):
        with replacing_folder(target, entries):
            pytest.fail("the block ran")
    assert (target / "notes.txt").read_text() == "keep"
    with pytest.raises(ValueError, match="not a folder"):
        with replacing_folder(target / "notes.txt", entries):
            pytest.fail("the block ran")
