"""Model surgery on keras-hub backbones, task models and plain Keras models."""


import keras
import keras_hub
import numpy as np
import pytest
from conftest import (
    image_batch,
    tiny_gemma,
    tiny_gemma2,
    tiny_gemma3,
    tiny_llama,
    tiny_vit,
    to_numpy,
    token_batch,
)

import keras_adaptive_lora as kal

# name -> (builder, inputs, per-block projection count for "all-linear", blocks)
BACKBONES = {
    "vit": (tiny_vit, image_batch, 6, 1),
    "gemma": (tiny_gemma, token_batch, 7, 1),
    "gemma2": (tiny_gemma2, token_batch, 7, 1),
    "gemma3": (tiny_gemma3, token_batch, 7, 2),
    "llama": (tiny_llama, lambda: token_batch(vocab=10), 7, 1),
    "llama3": (
        lambda: tiny_llama(keras_hub.models.Llama3Backbone),
        lambda: token_batch(vocab=10),
        7,
        1,
    ),
}


def randomize_adapters(model, seed=0):
    rng = np.random.default_rng(seed)
    for adapter in kal.find_adapters(model):
        adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape).astype("float32") * 0.2)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_backbone_defaults_all_linear_names_and_regex(name):
    make, inputs, per_block, blocks = BACKBONES[name]

    def build():  # the same weights every time
        keras.utils.set_random_seed(7)
        return make()

    x = inputs()
    model = build()
    y0 = to_numpy(model(x))

    report = kal.apply_adapters(model, kal.LoRA(rank=2))  # defaults: query, value
    assert len(report) == 2 * blocks
    assert sorted({row["path"].rsplit("/", 1)[-1] for row in report.rows}) == ["query", "value"]
    np.testing.assert_array_equal(to_numpy(model(x)), y0)  # unchanged at init
    assert report.trainable_params == report.adapter_params == sum(
        a.trainable_parameter_count() for a in kal.find_adapters(model)
    )
    assert "trainable%" in str(report) and report.rows[0]["path"] in str(report)

    randomize_adapters(model)
    y1 = to_numpy(model(x))
    assert not np.allclose(y1, y0)
    assert kal.merge_adapters(model) == 2 * blocks
    assert kal.find_adapters(model) == []
    np.testing.assert_allclose(to_numpy(model(x)), y1, rtol=1e-4, atol=1e-5)

    model = build()
    report = kal.apply_adapters(model, kal.LoRA(rank=1), targets="all-linear")
    assert len(report) == per_block * blocks
    np.testing.assert_array_equal(to_numpy(model(x)), y0)

    model = build()
    report = kal.apply_adapters(model, kal.LoRA(rank=1), targets=["key", "attention_output"])
    assert len(report) == 2 * blocks

    model = build()
    block = "transformer_block_1" if name == "vit" else "_0"
    report = kal.apply_adapters(model, kal.LoRA(rank=1), targets=[rf".*{block}/.*(query|key)"])
    assert [r["path"].rsplit("/", 1)[-1] for r in report.rows] == ["query", "key"]


def test_vit_regex_targets_block_numbering():
    model = tiny_vit()
    report = kal.apply_adapters(model, kal.LoRA(rank=1), targets=[r".*transformer_block_1/mlp/dense_\d"])
    assert [r["path"].rsplit("/", 1)[-1] for r in report.rows] == ["dense_1", "dense_2"]


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="relu", name="hidden")
        self.blocks = [keras.layers.Dense(8, name=f"block_{i}") for i in range(2)]
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        x = self.hidden(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def functional_model():
    inputs = keras.Input((6,))
    x = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    x = keras.layers.EinsumDense("bd,df->bf", output_shape=8, name="mix")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(x))


@pytest.mark.parametrize("kind", ["functional", "subclassed", "sequential"])
def test_plain_models_fit_merge_and_weights_file(kind, tmp_path):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 3)).astype("float32")

    def build():
        if kind == "functional":
            return functional_model()
        if kind == "sequential":
            return keras.Sequential(
                [keras.Input((6,)), keras.layers.Dense(8, name="hidden"), keras.layers.Dense(3, name="head")]
            )
        model = Subclassed()
        model(x[:1])
        return model

    model = build()
    y0 = to_numpy(model(x))
    with pytest.raises(ValueError, match="no default targets for"):
        kal.apply_adapters(model, kal.LoRA(rank=2))
    report = kal.apply_adapters(model, kal.LoRA(rank=2), targets="all-linear", train_also=["head"])
    expected = {"functional": 2, "sequential": 1, "subclassed": 3}[kind]
    assert len(report) == expected
    assert "head" not in [r["path"] for r in report.rows]
    np.testing.assert_allclose(to_numpy(model(x)), y0, atol=1e-6)

    before = {v.path: to_numpy(v).copy() for v in model.weights}
    adapter_paths = {v.path for a in kal.find_adapters(model) for v in a.trainable_weights}
    head = [layer for layer in model._flatten_layers() if layer.name == "head"][0]
    head_paths = {v.path for v in head.weights}
    assert {v.path for v in model.trainable_weights} == adapter_paths | head_paths
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    for v in model.weights:
        changed = not np.array_equal(to_numpy(v), before[v.path])
        assert changed == (v.path in adapter_paths | head_paths), v.path

    y1 = to_numpy(model(x))
    assert kal.merge_adapters(model) == expected
    assert not any(isinstance(layer, kal.AdapterLayer) for layer in model._flatten_layers())
    np.testing.assert_allclose(to_numpy(model(x)), y1, rtol=1e-5, atol=1e-5)
    path = str(tmp_path / "merged.weights.h5")
    model.save_weights(path)
    fresh = build()
    fresh.load_weights(path)
    np.testing.assert_allclose(to_numpy(fresh(x)), y1, rtol=1e-5, atol=1e-5)
    if kind != "subclassed":  # graph models serialize to .keras after a merge
        model.save(str(tmp_path / "merged.keras"))
        loaded = keras.saving.load_model(str(tmp_path / "merged.keras"))
        np.testing.assert_allclose(to_numpy(loaded(x)), y1, rtol=1e-5, atol=1e-5)


def test_vit_classifier_fit_changes_only_adapters_and_head():
    model = keras_hub.models.ViTImageClassifier(backbone=tiny_vit(), num_classes=3, preprocessor=None)
    x = image_batch(batch=4)
    y = np.array([0, 1, 2, 1])
    model(x)
    report = kal.apply_adapters(model, kal.LoRA(rank=2), train_also=["predictions"])
    assert len(report) == 2 and report.train_also_params == 48 * 3 + 3
    before = {v.path: to_numpy(v).copy() for v in model.weights}
    keep = {v.path for v in model.trainable_weights}
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit(x, y, epochs=2, verbose=0)
    changed = {v.path for v in model.weights if not np.array_equal(to_numpy(v), before[v.path])}
    assert changed == keep


def test_gemma_causal_lm_fit_generate_merge_and_presets(tmp_path):
    backbone = tiny_gemma()
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    x = token_batch(batch=4, seq=6)
    y = np.random.default_rng(2).integers(0, 20, (4, 6))
    lm(x)
    report = kal.apply_adapters(lm, kal.LoRA(rank=2), targets="all-linear")
    assert len(report) == 7
    before = {v.path: to_numpy(v).copy() for v in lm.weights}
    adapter_paths = {v.path for a in kal.find_adapters(lm) for v in a.trainable_weights}
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lm.fit(x, y, epochs=2, verbose=0)
    changed = {v.path for v in lm.weights if not np.array_equal(to_numpy(v), before[v.path])}
    assert changed == adapter_paths

    prompt = token_batch(batch=2, seq=6)
    prompt["padding_mask"][:, 3:] = 0
    generated = lm.generate(prompt, max_length=6, stop_token_ids=None)
    assert generated["token_ids"].shape == (2, 6)
    logits = to_numpy(lm(x))

    kal.merge_adapters(lm)
    assert type(lm.backbone) is keras_hub.models.GemmaBackbone
    np.testing.assert_allclose(to_numpy(lm(x)), logits, rtol=1e-4, atol=1e-4)
    preset = str(tmp_path / "preset")
    lm.backbone.save_to_preset(preset)
    reloaded = keras_hub.models.GemmaBackbone.from_preset(preset)
    np.testing.assert_allclose(
        to_numpy(reloaded(x)), to_numpy(lm.backbone(x)), rtol=1e-5, atol=1e-5
    )
    keras_path = str(tmp_path / "merged.keras")
    lm.backbone.save(keras_path)
    loaded = keras.saving.load_model(keras_path)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(lm.backbone(x)), rtol=1e-5, atol=1e-5)


def test_adapter_variables_are_module_parameters_on_torch():
    if keras.backend.backend() != "torch":
        pytest.skip("torch-specific: there a Layer is a torch.nn.Module")
    model = Subclassed()
    model(np.ones((2, 6), "float32"))
    # keras-hub backbones are functional (their layers are not torch
    # submodules); the attention layer holding the adapters is a subclassed one.
    llama = tiny_llama()
    attention = llama.transformer_layers[0]._self_attention_layer
    was_module = {
        id(module): {layer.name for layer in module.modules() if isinstance(layer, keras.layers.Dense)}
        | {layer.name for layer in module.modules() if isinstance(layer, keras.layers.EinsumDense)}
        for module in (model, attention)
    }
    kal.apply_adapters(model, kal.LoRA(rank=2), targets="all-linear")
    kal.apply_adapters(llama, kal.LoRA(rank=2))
    for module in (model, attention):
        params = {id(p) for p in module.parameters()}
        adapters = [a for a in kal.find_adapters(module) if a.name in was_module[id(module)]]
        assert adapters
        for a in adapters:
            assert any(m is a for m in module.modules())
            assert all(id(v.value) in params for v in a.trainable_weights)


# Errors ---------------------------------------------------------------------
def test_errors():
    model = tiny_gemma()
    with pytest.raises(ValueError, match=r"'qurey' matched no layer.*\['attention_output', 'ffw_gating'"):
        kal.apply_adapters(model, kal.LoRA(rank=1), targets=["query", "qurey"])
    with pytest.raises(ValueError, match=r"'decoder_block_0/attention' \(CachedGemmaAttention\).*not a"):
        kal.apply_adapters(model, kal.LoRA(rank=1), targets=["attention"])
    with pytest.raises(ValueError, match="`train_also` entry 'nope' matched no layer"):
        kal.apply_adapters(model, kal.LoRA(rank=1), train_also=["nope"])
    with pytest.raises(ValueError, match="must be an adapter method spec"):
        kal.apply_adapters(model, "lora")
    assert kal.find_adapters(model) == []  # nothing half-applied
    kal.apply_adapters(model, kal.LoRA(rank=1))
    with pytest.raises(ValueError, match="'decoder_block_0/attention/query' already has an adapter"):
        kal.apply_adapters(model, kal.LoRA(rank=1), targets=["query", "key"])
    assert len(kal.find_adapters(model)) == 2
    with pytest.raises(ValueError, match="rank=17 is out of range"):
        kal.apply_adapters(tiny_gemma(), kal.LoRA(rank=17))


def test_training_step_updates_adapters_on_every_backend():
    """The optimizer really updates the swapped-in variables (torch included)."""
    model = tiny_llama()
    kal.apply_adapters(model, kal.LoRA(rank=2))
    x = token_batch(vocab=10, batch=4)
    y = np.random.default_rng(3).normal(size=(4, 6, 8)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    b_before = [to_numpy(a.lora_b).copy() for a in kal.find_adapters(model)]
    model.fit(x, y, epochs=1, verbose=0)
    for a, b0 in zip(kal.find_adapters(model), b_before):
        assert np.abs(to_numpy(a.lora_b) - b0).max() > 0


def test_plain_models_names_and_regex_targets():
    model = functional_model()
    report = kal.apply_adapters(model, kal.LoRA(rank=2), targets=[r"mi.", "hidden"])
    assert [r["path"] for r in report.rows] == ["hidden", "mix"]
    sub = Subclassed()
    sub(np.ones((1, 6), "float32"))
    report = kal.apply_adapters(sub, kal.LoRA(rank=2), targets=[r".*block_\d"])
    assert [r["path"].rsplit("/", 1)[-1] for r in report.rows] == ["block_0", "block_1"]
    assert [type(b).__name__ for b in sub.blocks] == ["LoRAAdapter", "LoRAAdapter"]


def test_second_apply_on_other_layers_keeps_first_adapters_trainable():
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(8, name="up"), keras.layers.Dense(4, name="down")]
    )
    x = np.random.default_rng(5).normal(size=(3, 4)).astype("float32")
    y0 = to_numpy(model(x))
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["up"])
    report = kal.apply_adapters(model, kal.LoRA(rank=2), targets=["down"])
    assert len(report) == 1
    adapters = kal.find_adapters(model)
    assert [a.name for a in adapters] == ["up", "down"]
    assert {v.path for v in model.trainable_weights} == {
        v.path for a in adapters for v in a.trainable_weights
    }
    np.testing.assert_allclose(to_numpy(model(x)), y0, atol=1e-6)
    randomize_adapters(model)
    y1 = to_numpy(model(x))
    assert kal.merge_adapters(model) == 2
    np.testing.assert_allclose(to_numpy(model(x)), y1, rtol=1e-5, atol=1e-5)
