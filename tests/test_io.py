"""Adapter-only files (`save_adapters`/`load_adapters`), the `.keras` guard,
merged save/export (`save_merged`, `export_merged`, `cli export`) and a
cross-backend adapter move. Runs under every KERAS_BACKEND."""

import json
import os
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.adapters.flexlora import rank_pattern
from keras_adaptive_lora.callbacks import FlexLoRAScheduler
from keras_adaptive_lora.io import _own_variables

from conftest import image_batch, tiny_gemma, tiny_vit, to_numpy, token_batch

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = {
    "lora": lambda: kal.LoRA(rank=2, alpha=4.0),
    "stable_rank": lambda: kal.StableRankLoRA(seed=3),
    "flexlora": lambda: kal.FlexLoRA(rank=2, seed=5),
    "sinc": lambda: kal.SincLoRA(rank=2, grid_size=5),
}


def _lm(backbone):
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _lm_data(n=4, seq=6, vocab=20):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (n, seq + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, seq), "int32")}
    return x, tokens[:, 1:]


def _fit(model, x, y, callbacks=()):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, batch_size=2, epochs=3, verbose=0, callbacks=list(callbacks))


def _state(model):
    """`{layer path::variable: value}` of every adapter variable."""
    return {
        f"{a.path}::{name}": to_numpy(v)
        for a in kal.find_adapters(model)
        for name, v in _own_variables(a)
    }


@pytest.fixture
def preset(tmp_path):
    """A tiny Gemma saved as a local preset (the base weights)."""
    path = str(tmp_path / "preset")
    tiny_gemma().save_to_preset(path)
    return path


def _base(preset):
    return keras_hub.models.GemmaBackbone.from_preset(preset)


# --------------------------------------------------------------------------
# save_adapters / load_adapters
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(METHODS))
def test_fit_save_load_gives_equal_outputs(name, preset, tmp_path):
    lm = _lm(_base(preset))
    kal.apply_adapters(lm, METHODS[name]())
    x, y = _lm_data()
    callbacks = []
    if name == "flexlora":
        callbacks = [FlexLoRAScheduler(6, b0=2, warmup_steps=1, final_steps=1, interval=1, verbose=0)]
    _fit(lm, x, y, callbacks)
    path = str(tmp_path / "adapters.npz")
    metadata = kal.save_adapters(lm, path)

    fresh = _lm(_base(preset))
    before = to_numpy(fresh(x, training=False))
    report = kal.load_adapters(fresh, path)

    want = to_numpy(lm(x, training=False))
    got = to_numpy(fresh(x, training=False))
    assert np.abs(want - before).max() > 1e-4  # training changed the outputs
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    # Every adapter variable, non-trainable state included, is restored.
    saved, loaded = _state(lm), _state(fresh)
    assert saved.keys() == loaded.keys()
    for key in saved:
        np.testing.assert_array_equal(loaded[key], saved[key], err_msg=key)
    # Same adapted layers, ranks and trainable variables; the base is frozen.
    assert [r["path"] for r in report.rows] == [layer["path"] for layer in metadata["layers"]]
    assert [a.rank() for a in kal.find_adapters(fresh)] == [a.rank() for a in kal.find_adapters(lm)]
    assert {v.path for v in fresh.trainable_variables} == {v.path for v in lm.trainable_variables}
    assert type(report.method) is type(METHODS[name]())
    if name == "flexlora":
        assert rank_pattern(fresh) == rank_pattern(lm)
        assert sorted(set(rank_pattern(lm).values())) != [2]  # the schedule moved ranks
    if name == "stable_rank":
        assert any("seed_generator_state" in key for key in saved)


def test_file_is_small_and_keyed_by_path(preset, tmp_path):
    lm = _lm(_base(preset))
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


def test_vit_classifier_with_train_also_head(tmp_path):
    def classifier(backbone):
        return keras_hub.models.ViTImageClassifier(
            backbone=backbone, num_classes=3, preprocessor=None
        )

    preset = str(tmp_path / "vit")
    tiny_vit().save_to_preset(preset)
    model = classifier(keras_hub.models.ViTBackbone.from_preset(preset))
    kal.apply_adapters(model, kal.LoRA(rank=2), train_also=["predictions"])
    images = image_batch(batch=4)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(images, np.array([0, 1, 2, 0]), batch_size=2, epochs=2, verbose=0)
    path = str(tmp_path / "adapters.npz")
    metadata = kal.save_adapters(model, path)
    assert {e["path"] for e in metadata["train_also"]} == {"predictions/kernel", "predictions/bias"}

    fresh = classifier(keras_hub.models.ViTBackbone.from_preset(preset))
    kal.load_adapters(fresh, path)
    np.testing.assert_allclose(
        to_numpy(fresh(images, training=False)), to_numpy(model(images, training=False)), atol=1e-5
    )
    assert {v.path for v in fresh.trainable_variables} == {v.path for v in model.trainable_variables}


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
# Export
# --------------------------------------------------------------------------
def _adapted_gemma():
    backbone = tiny_gemma()
    kal.apply_adapters(backbone, kal.LoRA(rank=2))
    for a in kal.find_adapters(backbone):
        a.lora_b.assign(np.random.default_rng(1).normal(size=a.lora_b.shape).astype("float32"))
    return backbone


@pytest.mark.skipif(BACKEND != "tensorflow", reason="SavedModel export runs on the tensorflow backend")
def test_export_merged_serves_adapted_outputs(tmp_path):
    import tensorflow as tf

    backbone = _adapted_gemma()
    x = token_batch()
    want = to_numpy(backbone(x, training=False))
    path = str(tmp_path / "saved_model")
    kal.export_merged(backbone, path)
    loaded = tf.saved_model.load(path)
    got = loaded.serve(x).numpy()
    assert np.abs(got - want).max() <= 1e-5
    assert len(kal.find_adapters(backbone)) == 2  # the model keeps its adapters
    np.testing.assert_array_equal(to_numpy(backbone(x, training=False)), want)


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the in-process export covers tensorflow")
def test_export_from_other_backend_via_cli(tmp_path):
    backbone = _adapted_gemma()
    x = token_batch()
    with pytest.raises(ValueError, match="save_merged.*cli export"):
        kal.export_merged(backbone, str(tmp_path / "nope"))
    want = to_numpy(backbone(x, training=False))
    merged = str(tmp_path / "merged.keras")
    kal.save_merged(backbone, merged)
    np.save(str(tmp_path / "want.npy"), want)
    np.savez(str(tmp_path / "x.npz"), **x)
    env = dict(os.environ, KERAS_BACKEND="tensorflow", PYTHONPATH=ROOT)
    out = str(tmp_path / "saved_model")
    check = textwrap.dedent(
        f"""
        import sys
        import numpy as np, tensorflow as tf
        from keras_adaptive_lora.cli import main
        assert main(["export", {merged!r}, {out!r}]) == 0
        x = dict(np.load({str(tmp_path / "x.npz")!r}))
        loaded = tf.saved_model.load({out!r})
        diff = np.abs(loaded.serve(x).numpy() - np.load({str(tmp_path / "want.npy")!r})).max()
        print("DIFF", diff)
        sys.exit(0 if diff <= 1e-5 else 1)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert "DIFF" in result.stdout


# --------------------------------------------------------------------------
# Cross-backend
# --------------------------------------------------------------------------
def test_adapters_move_to_another_backend(preset, tmp_path):
    other = "jax" if BACKEND != "jax" else "torch"
    backbone = _base(preset)
    kal.apply_adapters(backbone, kal.FlexLoRA(rank=2, seed=5))
    for a in kal.find_adapters(backbone):
        a.flex_lambda.assign(np.linspace(0.5, 1.0, a.max_rank).astype("float32"))
    x = token_batch()
    want = to_numpy(backbone(x, training=False))
    path = str(tmp_path / "adapters.npz")
    kal.save_adapters(backbone, path)
    np.save(str(tmp_path / "want.npy"), want)
    np.savez(str(tmp_path / "x.npz"), **x)
    check = textwrap.dedent(
        f"""
        import sys
        import keras, keras_hub, numpy as np
        import keras_adaptive_lora as kal
        assert keras.backend.backend() == {other!r}
        model = keras_hub.models.GemmaBackbone.from_preset({preset!r})
        kal.load_adapters(model, {path!r})
        x = dict(np.load({str(tmp_path / "x.npz")!r}))
        got = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
        diff = np.abs(got - np.load({str(tmp_path / "want.npy")!r})).max()
        print("DIFF", diff, len(kal.find_adapters(model)))
        sys.exit(0 if diff <= 1e-5 and len(kal.find_adapters(model)) == 7 else 1)
        """
    )
    env = dict(os.environ, KERAS_BACKEND=other, PYTHONPATH=ROOT)
    result = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
