"""The contract every registered adapter method must pass.

`MethodContract` holds the tests; a test class derives from it and provides
a `method_name` fixture (`test_contract.py` parameterizes it over every
registered method; `test_toy_method.py` gives a toy fifth method). Nothing
here names a method: what differs per method comes from the registry and
from the spec's own options.

Oracles: numpy (`np.einsum` of the layer's own equation with `W + ΔW` for
the output, the base layer's own output for identity at init), Keras's
deserialization and weights files for round trips.
"""

import keras
import numpy as np
import pytest
from conftest import to_numpy

import keras_adaptive_lora as kal
from keras_adaptive_lora.core.method import get_method

#: A Gemma-style query projection: the contracted axis in the middle.
EINSUM = ("btd,ndh->btnh", (3, 12, 4), (2, 5, 12))


def make_dense(activation="tanh", name="proj"):
    layer = keras.layers.Dense(10, activation=activation, name=name)
    layer.build((None, 12))
    return layer


def make_einsum(name="query"):
    equation, kernel_shape, input_shape = EINSUM
    layer = keras.layers.EinsumDense(
        equation, output_shape=(None, 3, 4), bias_axes="nh", activation="relu", name=name
    )
    layer.build(input_shape)
    rng = np.random.default_rng(3)
    layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    return layer


def make_model():
    inputs = keras.Input((12,))
    hidden = keras.layers.Dense(12, activation="tanh", name="p0")(inputs)
    outputs = keras.layers.Dense(6, name="p1")(hidden)
    return keras.Model(inputs, outputs)


def perturb(adapter, seed=0, scale=0.2):
    """Random values in every trainable adapter variable, so that `ΔW != 0`."""
    rng = np.random.default_rng(seed)
    for variable in adapter.trainable_weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * scale)


def numpy_activation(name, y):
    return {"tanh": np.tanh, "relu": lambda v: np.maximum(v, 0.0), "linear": lambda v: v}[name](y)


def oracle(layer, adapter, x, activation):
    """`act(x (W + ΔW) + b)` in numpy, in the layer's own axes."""
    delta = to_numpy(adapter.view.from_matrix(adapter.delta_kernel()))
    kernel = to_numpy(layer.kernel) + delta
    if isinstance(layer, keras.layers.EinsumDense):
        y = np.einsum(layer.equation, x, kernel)
    else:
        y = x @ kernel
    if layer.bias is not None:
        y = y + to_numpy(layer.bias)
    return numpy_activation(activation, y)


class MethodContract:
    """Tests every registered method must pass (see the module docstring)."""

    # The spec -------------------------------------------------------------------
    @pytest.fixture
    def spec_class(self, method_name):
        return get_method(method_name)

    @pytest.fixture
    def spec(self, spec_class):
        """The spec at small sizes: rank 2 where the method has a rank."""
        return spec_class.from_options(strict=False, rank=2)

    def test_registry_entry(self, spec_class, method_name):
        assert spec_class.name == method_name
        assert method_name in kal.method_names()
        assert isinstance(spec_class.title, str) and spec_class.title
        assert issubclass(spec_class.layer_class, kal.AdapterLayer)
        assert keras.saving.get_registered_object(
            keras.saving.get_registered_name(spec_class.layer_class)
        ) is spec_class.layer_class

    def test_spec_config_equality_hash_repr(self, spec, spec_class):
        again = spec_class.from_config(spec.get_config())
        assert again == spec and hash(again) == hash(spec)
        assert repr(spec).startswith(f"{spec_class.__name__}(")
        assert set(spec.get_config()) == set(spec_class.option_names())
        with pytest.raises(Exception):  # frozen
            setattr(spec, spec_class.option_names()[0], None)

    # The forward pass -------------------------------------------------------------
    @pytest.mark.parametrize("kind", ["dense", "einsum"])
    def test_output_matches_numpy_oracle_and_merge(self, spec, kind):
        layer = make_dense() if kind == "dense" else make_einsum()
        activation = "tanh" if kind == "dense" else "relu"
        adapter = spec.wrap(layer)
        perturb(adapter)
        shape = (4, 12) if kind == "dense" else EINSUM[2]
        x = np.random.default_rng(1).normal(size=shape).astype("float32")
        y = to_numpy(adapter(x))
        want = oracle(layer, adapter, x, activation)
        assert np.abs(to_numpy(adapter.delta_kernel())).max() > 1e-3  # a real update
        np.testing.assert_allclose(y, want, atol=1e-5 * max(1.0, np.abs(want).max()))
        merged = adapter.merge()
        assert type(merged) is type(layer) and merged.name == layer.name
        assert keras.activations.serialize(merged.activation) == activation
        np.testing.assert_allclose(to_numpy(merged(x)), y, atol=1e-5 * max(1.0, np.abs(y).max()))

    def test_identity_at_init(self, spec, spec_class):
        if not spec_class.identity_at_init:
            pytest.skip(f"{spec_class.name} does not promise ΔW = 0 at init")
        layer = make_einsum()
        x = np.random.default_rng(2).normal(size=EINSUM[2]).astype("float32")
        before = to_numpy(layer(x))
        adapter = spec.wrap(layer)
        assert np.abs(to_numpy(adapter.delta_kernel())).max() == 0.0
        np.testing.assert_allclose(to_numpy(adapter(x)), before, atol=1e-6)

    def test_plan_matches_what_is_built(self, spec):
        layers = [make_dense(name="a"), make_einsum(name="b")]
        plan = spec.plan(layers)
        adapters = spec.wrap_all(layers)
        for entry, adapter in zip(plan, adapters):
            assert entry.rank == adapter.rank()
            assert entry.capacity == adapter.capacity()
            assert entry.params == adapter.trainable_parameter_count()

    # Config and files -----------------------------------------------------------------
    def test_layer_config_round_trip(self, spec):
        adapter = spec.wrap(make_dense())
        perturb(adapter)
        clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(adapter))
        assert type(clone) is type(adapter)
        assert clone.get_config() == adapter.get_config()
        clone.set_weights(adapter.get_weights())  # the config holds no weights
        x = np.random.default_rng(4).normal(size=(3, 12)).astype("float32")
        np.testing.assert_allclose(to_numpy(clone(x)), to_numpy(adapter(x)), atol=1e-6)

    def _adapted_model(self, spec, seed=0):
        """The same base model every time (SR-LoRA's ranks follow its weights),
        adapters perturbed with `seed`."""
        keras.utils.set_random_seed(11)
        model = make_model()
        kal.apply_adapters(model, spec, targets=["p0", "p1"])
        for adapter in kal.find_adapters(model):
            perturb(adapter, seed=seed + 7)
        return model

    def test_weights_only_reload(self, spec, tmp_path):
        model = self._adapted_model(spec, seed=1)
        x = np.random.default_rng(5).normal(size=(3, 12)).astype("float32")
        path = str(tmp_path / "w.weights.h5")
        model.save_weights(path)
        fresh = self._adapted_model(spec, seed=2)
        assert not np.allclose(to_numpy(fresh(x)), to_numpy(model(x)))
        fresh.load_weights(path)
        np.testing.assert_allclose(to_numpy(fresh(x)), to_numpy(model(x)), atol=1e-6)

    def test_adapter_file_round_trip(self, spec, spec_class, tmp_path):
        model = self._adapted_model(spec, seed=1)
        x = np.random.default_rng(5).normal(size=(3, 12)).astype("float32")
        path = str(tmp_path / "adapters.npz")
        kal.save_adapters(model, path)
        keras.utils.set_random_seed(12)
        base = make_model()
        base.set_weights(_base_weights(model))
        report = kal.load_adapters(base, path)
        assert isinstance(report.method, spec_class) and report.method == spec
        assert [type(a) for a in kal.find_adapters(base)] == [spec_class.layer_class] * 2
        np.testing.assert_allclose(to_numpy(base(x)), to_numpy(model(x)), atol=1e-6)

    # Bases and precisions -------------------------------------------------------------
    def test_int8_base(self, spec):
        model = make_model()
        x = np.random.default_rng(6).normal(size=(3, 12)).astype("float32")
        model.quantize("int8")
        quantized = to_numpy(model(x))
        kal.apply_adapters(model, spec, targets=["p0", "p1"])
        adapters = kal.find_adapters(model)
        if get_method(spec.name).identity_at_init:
            np.testing.assert_allclose(to_numpy(model(x)), quantized, atol=1e-6)
        # The update is a float path on top of the int8 base: x ΔW, exactly.
        first = adapters[0]
        perturb(first, seed=3)
        h_base = to_numpy(first.wrapped(x))  # the int8 projection, linear
        delta = to_numpy(first.delta_kernel())
        bias = 0.0  # the base's bias is inside `h_base`
        want = np.tanh(h_base + x @ delta + bias)
        np.testing.assert_allclose(to_numpy(first(x)), want, atol=1e-5)
        merged = first.merge()
        assert merged.quantization_mode is None
        np.testing.assert_allclose(to_numpy(merged(x)), want, atol=0.05)

    @pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
    def test_mixed_precision(self, spec, policy):
        keras.mixed_precision.set_global_policy(policy)
        model = make_model()
        kal.apply_adapters(model, spec, targets=["p0", "p1"])
        adapter = kal.find_adapters(model)[0]
        assert adapter.compute_dtype == policy.split("_")[1]
        assert all(v.dtype == "float32" for v in adapter.trainable_weights)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        rng = np.random.default_rng(7)
        x, y = rng.normal(size=(8, 12)).astype("float32"), rng.normal(size=(8, 6)).astype("float32")
        history = model.fit(x, y, epochs=2, batch_size=4, verbose=0)
        assert np.isfinite(history.history["loss"]).all()
        assert all(v.dtype == "float32" for v in adapter.trainable_weights)
        out = adapter(x)
        assert keras.backend.standardize_dtype(out.dtype) == adapter.compute_dtype
        merged = adapter.merge()
        assert merged.kernel.dtype == adapter.wrapped.kernel.dtype

    # Errors -------------------------------------------------------------------------------
    def test_refuses_to_stack(self, spec, spec_class):
        adapter = spec.wrap(make_dense(name="twice"))
        with pytest.raises(
            ValueError,
            match=f"'twice' is already wrapped by a {spec_class.layer_class.__name__}.*cannot be stacked",
        ):
            spec.wrap(adapter)

    def test_clear_error_for_a_rank_out_of_range(self, spec_class):
        if "rank" not in spec_class.option_names():
            pytest.skip(f"{spec_class.name} has no `rank` option (its ranks are derived)")
        layer = make_dense(name="tiny_proj")  # a (12, 10) matrix
        spec = spec_class.from_options(strict=False, rank=11)
        with pytest.raises(ValueError, match=r"Layer 'tiny_proj': rank=11 is out of range.*= 10"):
            spec.wrap(layer)
        with pytest.raises(ValueError, match=r"Layer 'tiny_proj': rank=11 is out of range"):
            spec.plan([layer])
        with pytest.raises(ValueError, match="`rank` must be a positive integer, got 0"):
            spec_class.from_options(rank=0)


def _base_weights(model):
    """The adapted model's base weights, in the order of a plain model's weights."""
    weights = []
    for layer in model.layers:
        base = getattr(layer, "wrapped", layer)
        weights.extend(to_numpy(w) for w in base.weights)
    return weights
