"""The adapter core and plain LoRA, against numpy and against Keras's own LoRA."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_adaptive_lora as kal

# (equation, kernel shape, input shape) of every projection kind in keras-hub
# ViT, Gemma and Llama, with small sizes.
EQUATIONS = {
    "vit_query": ("abc,cde->abde", (8, 2, 3), (2, 5, 8)),
    "vit_attention_output": ("abcd,cde->abe", (2, 3, 8), (2, 5, 2, 3)),
    "gemma_query": ("btd,ndh->btnh", (4, 8, 3), (2, 5, 8)),
    "gemma_key_value": ("bsd,kdh->bskh", (1, 8, 3), (2, 5, 8)),
    "gemma_attention_output": ("btnh,nhd->btd", (4, 3, 8), (2, 5, 4, 3)),
    "gemma_ffw_gating": ("btd,df->btf", (8, 12), (2, 5, 8)),
    "gemma_ffw_linear": ("btf,fd->btd", (12, 8), (2, 5, 12)),
    "llama_query": ("bqm,muh->bquh", (8, 4, 3), (2, 5, 8)),
    "llama_key_value": ("bkm,mvh->bkvh", (8, 2, 3), (2, 5, 8)),
    "llama_attention_output": ("bquh,uhm->bqm", (4, 3, 8), (2, 5, 4, 3)),
}


def make_einsum(equation, kernel_shape, input_shape, bias_axes=None, activation=None):
    out = equation.split("->")[1]
    ker = equation.split(",")[1].split("->")[0]
    lhs = equation.split(",")[0]
    sizes = dict(zip(ker, kernel_shape))
    sizes.update(zip(lhs, input_shape))
    output_shape = tuple(sizes[c] for c in out[1:])
    layer = keras.layers.EinsumDense(
        equation, output_shape=output_shape, bias_axes=bias_axes, activation=activation
    )
    layer.build(input_shape)
    return layer


def numpy_delta_kernel(equation, a, b, scale):
    """Independent oracle: the kernel-shaped update by a letter-level einsum."""
    lhs, rest = equation.split(",")
    ker, out = rest.split("->")
    in_letters = "".join(c for c in ker if c in lhs and c not in out)
    out_letters = "".join(c for c in ker if c in out and c not in lhs)
    return scale * np.einsum(f"{in_letters}z,z{out_letters}->{ker}", a, b)


def shape_of(equation, kernel_shape):
    lhs, rest = equation.split(",")
    ker, out = rest.split("->")
    in_dims = [d for c, d in zip(ker, kernel_shape) if c in lhs and c not in out]
    out_dims = [d for c, d in zip(ker, kernel_shape) if c in out and c not in lhs]
    return in_dims, out_dims


def randomize(adapter, rng, std=0.3):
    adapter.lora_a.assign(rng.normal(size=adapter.lora_a.shape).astype("float32") * std)
    adapter.lora_b.assign(rng.normal(size=adapter.lora_b.shape).astype("float32") * std)


@pytest.mark.parametrize("kind", sorted(EQUATIONS))
def test_einsum_projection_matches_numpy_oracle(kind):
    equation, kernel_shape, input_shape = EQUATIONS[kind]
    rng = np.random.default_rng(0)
    layer = make_einsum(equation, kernel_shape, input_shape)
    x = rng.normal(size=input_shape).astype("float32")
    y_before = to_numpy(layer(x))
    adapter = kal.LoRA(rank=2, alpha=3.0).wrap(layer)
    np.testing.assert_array_equal(to_numpy(adapter(x)), y_before)

    randomize(adapter, rng)
    in_dims, out_dims = shape_of(equation, kernel_shape)
    assert (adapter.d_in, adapter.d_out) == (np.prod(in_dims), np.prod(out_dims))
    a = to_numpy(adapter.lora_a).reshape(*in_dims, 2)
    b = to_numpy(adapter.lora_b).reshape(2, *out_dims)
    kernel = to_numpy(layer.kernel) + numpy_delta_kernel(equation, a, b, 3.0 / 2)
    expected = np.einsum(equation, x, kernel)
    np.testing.assert_allclose(to_numpy(adapter(x)), expected, rtol=1e-5, atol=1e-5)

    merged = adapter.merge()
    assert type(merged) is keras.layers.EinsumDense
    assert merged.name == layer.name and merged.equation == equation
    np.testing.assert_allclose(to_numpy(merged(x)), to_numpy(adapter(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("input_shape", [(4, 6), (2, 3, 6), (2, 3, 2, 6)])
def test_dense_any_input_rank_matches_numpy(input_shape):
    rng = np.random.default_rng(1)
    layer = keras.layers.Dense(5, activation="gelu")
    layer.build(input_shape)
    x = rng.normal(size=input_shape).astype("float32")
    y_before = to_numpy(layer(x))
    adapter = kal.LoRA(rank=3).wrap(layer)
    np.testing.assert_allclose(to_numpy(adapter(x)), y_before, atol=1e-6)
    randomize(adapter, rng)
    w = to_numpy(layer.kernel) + to_numpy(adapter.lora_a) @ to_numpy(adapter.lora_b)  # alpha=r
    pre = x @ w + to_numpy(layer.bias)
    gelu = to_numpy(keras.activations.gelu(pre))
    np.testing.assert_allclose(to_numpy(adapter(x)), gelu, rtol=1e-5, atol=1e-5)
    merged = adapter.merge()
    assert type(merged) is keras.layers.Dense
    assert merged.get_config()["activation"] == "gelu"
    assert merged.name == layer.name
    np.testing.assert_allclose(to_numpy(merged(x)), to_numpy(adapter(x)), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(to_numpy(merged.bias), to_numpy(layer.bias))


def test_einsum_with_bias_and_activation_merges():
    rng = np.random.default_rng(2)
    layer = make_einsum("btd,df->btf", (8, 6), (2, 3, 8), bias_axes="f", activation="relu")
    layer.bias.assign(rng.normal(size=(6,)).astype("float32"))
    x = rng.normal(size=(2, 3, 8)).astype("float32")
    adapter = kal.LoRA(rank=2).wrap(layer)
    randomize(adapter, rng)
    merged = adapter.merge()
    np.testing.assert_allclose(to_numpy(merged(x)), to_numpy(adapter(x)), atol=1e-5)
    assert merged.get_config()["activation"] == "relu"


@pytest.mark.parametrize("layer_kind", ["dense", "einsum_2d"])
def test_same_outputs_as_keras_builtin_lora(layer_kind):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 4, 8)).astype("float32")

    def build():
        if layer_kind == "dense":
            layer = keras.layers.Dense(6)
            layer.build((2, 4, 8))
        else:
            layer = make_einsum("btd,df->btf", (8, 6), (2, 4, 8), bias_axes="f")
        return layer

    ours_base, peer = build(), build()
    peer.set_weights(ours_base.get_weights())
    rank, alpha = 3, 5.0
    peer.enable_lora(rank, lora_alpha=alpha)
    ours = kal.LoRA(rank=rank, alpha=alpha).wrap(ours_base)
    a = rng.normal(size=(8, rank)).astype("float32")
    b = rng.normal(size=(rank, 6)).astype("float32")
    peer.lora_kernel_a.assign(a)
    peer.lora_kernel_b.assign(b)
    ours.lora_a.assign(a)
    ours.lora_b.assign(b)
    np.testing.assert_allclose(to_numpy(ours(x)), to_numpy(peer(x)), rtol=1e-5, atol=1e-5)


def test_rslora_scale():
    layer = keras.layers.Dense(4)
    layer.build((None, 9))
    adapter = kal.LoRA(rank=4, alpha=8.0, rslora=True).wrap(layer)
    assert adapter.scale == pytest.approx(8.0 / 2.0)
    other = keras.layers.Dense(4)
    other.build((None, 9))
    assert kal.LoRA(rank=4, alpha=8.0).wrap(other).scale == pytest.approx(2.0)


def test_freezes_base_and_counts_parameters():
    layer = make_einsum("btd,ndh->btnh", (4, 8, 3), (2, 5, 8), bias_axes="nh")
    adapter = kal.LoRA(rank=2).wrap(layer)
    assert not layer.trainable
    trainable = {v.path for v in adapter.trainable_weights}
    assert trainable == {adapter.lora_a.path, adapter.lora_b.path}
    assert adapter.trainable_parameter_count() == 2 * (8 + 12)
    assert all(v.path not in trainable for v in layer.weights)
    adapter.trainable = True  # toggling the adapter never unfreezes the base
    assert not any(v.trainable for v in layer.weights)


def test_fit_changes_only_adapter_variables():
    rng = np.random.default_rng(4)
    inputs = keras.Input((5, 8))
    dense = keras.layers.Dense(6, name="proj")
    einsum = keras.layers.EinsumDense("btd,df->btf", output_shape=(None, 4), bias_axes="f", name="ein")
    model = keras.Model(inputs, einsum(dense(inputs)))
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["proj", "ein"])
    adapters = kal.find_adapters(model)
    assert len(adapters) == 2
    frozen = {v.path: to_numpy(v).copy() for a in adapters for v in a.wrapped.weights}
    lora = {v.path: to_numpy(v).copy() for a in adapters for v in a.trainable_weights}
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = rng.normal(size=(8, 5, 8)).astype("float32")
    y = rng.normal(size=(8, 5, 4)).astype("float32")
    model.fit(x, y, epochs=3, batch_size=4, verbose=0)
    for a in adapters:
        for v in a.wrapped.weights:
            np.testing.assert_array_equal(to_numpy(v), frozen[v.path])
        for v in a.trainable_weights:
            assert not np.allclose(to_numpy(v), lora[v.path]), v.path


def test_config_round_trip():
    rng = np.random.default_rng(5)
    layer = keras.layers.Dense(6, activation="tanh")
    layer.build((None, 7))
    adapter = kal.LoRA(rank=3, alpha=2.0, dropout=0.1, rslora=True).wrap(layer)
    randomize(adapter, rng)
    config = adapter.get_config()
    clone = kal.LoRAAdapter.from_config(config)
    assert clone.get_config() == config
    clone.set_weights(adapter.get_weights())
    x = rng.normal(size=(3, 7)).astype("float32")
    np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(adapter(x)), atol=1e-6)
    # Registered: generic Keras deserialization finds the class.
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(adapter))
    assert isinstance(again, kal.LoRAAdapter) and again.lora_rank == 3
    assert kal.LoRA.from_config(kal.LoRA(rank=4).get_config()) == kal.LoRA(rank=4)


def test_dropout_only_in_training():
    rng = np.random.default_rng(6)
    layer = keras.layers.Dense(6)
    layer.build((None, 16))
    adapter = kal.LoRA(rank=4, dropout=0.5).wrap(layer)
    randomize(adapter, rng)
    x = rng.normal(size=(4, 16)).astype("float32")
    infer1, infer2 = to_numpy(adapter(x)), to_numpy(adapter(x, training=False))
    np.testing.assert_array_equal(infer1, infer2)
    assert not np.allclose(to_numpy(adapter(x, training=True)), infer1)


def test_extra_call_arguments_pass_through():
    class ScaledDense(keras.layers.Dense):
        def call(self, inputs, training=None, scale=1.0):
            return super().call(inputs) * scale

    layer = ScaledDense(3)
    layer.build((None, 4))
    adapter = kal.LoRA(rank=2).wrap(layer)
    x = np.ones((2, 4), "float32")
    np.testing.assert_allclose(
        to_numpy(adapter(x, scale=2.0)), 2.0 * to_numpy(adapter(x)), rtol=1e-6
    )


# Errors ---------------------------------------------------------------------
def test_error_rank_out_of_range():
    layer = keras.layers.Dense(4, name="tiny_proj")
    layer.build((None, 6))
    with pytest.raises(ValueError, match=r"tiny_proj.*rank=5.*\(6, 4\).*between 1 and .* = 4"):
        kal.LoRA(rank=5).wrap(layer)
    with pytest.raises(ValueError, match="`rank` must be a positive integer, got 0"):
        kal.LoRA(rank=0)
    with pytest.raises(ValueError, match="`alpha` must be a positive number"):
        kal.LoRA(rank=2, alpha=-1)
    with pytest.raises(ValueError, match=r"`dropout` must be a number in \[0, 1\)"):
        kal.LoRA(rank=2, dropout=1.0)


def test_error_unbuilt_layer():
    with pytest.raises(ValueError, match="'fresh' is not built yet"):
        kal.LoRA(rank=2).wrap(keras.layers.Dense(3, name="fresh"))


def test_error_kernel_axis_in_input_and_output():
    layer = keras.layers.EinsumDense("abc,bcd->abd", output_shape=(3, 5), name="batched")
    layer.build((2, 3, 4))
    with pytest.raises(ValueError, match="'batched'.*axis 'b'.*both the input and the output"):
        kal.LoRA(rank=1).wrap(layer)


def test_error_not_a_projection_and_builtin_lora():
    conv = keras.layers.Conv1D(2, 3, name="conv")
    conv.build((None, 8, 2))
    with pytest.raises(ValueError, match="'conv' is a Conv1D"):
        kal.LoRA(rank=1).wrap(conv)
    layer = keras.layers.Dense(4, name="builtin")
    layer.build((None, 6))
    layer.enable_lora(2)
    with pytest.raises(ValueError, match="'builtin' has Keras's built-in LoRA enabled"):
        kal.LoRA(rank=2).wrap(layer)


def test_kernel_view_round_trip_against_numpy():
    rng = np.random.default_rng(7)
    kernel = rng.normal(size=(4, 8, 3)).astype("float32")  # gemma query (n, d, h)
    view = kal.KernelView("btd,ndh->btnh", kernel.shape)
    matrix = to_numpy(view.to_matrix(kernel))
    expected = np.transpose(kernel, (1, 0, 2)).reshape(8, 12)
    np.testing.assert_array_equal(matrix, expected)
    np.testing.assert_array_equal(to_numpy(view.from_matrix(matrix)), kernel)
