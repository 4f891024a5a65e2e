"""Every method on Keras int8-quantized bases, and under mixed_bfloat16.

The oracles are numpy. Keras's int8 (`layer.quantize("int8")`) is re-done in
numpy from the float kernel kept before quantizing: abs-max per output
feature over the contracted axes, `q = round(W · 127 / max|W|)`,
`W_deq = q / scale`. Keras's int8 call also quantizes the *activations*, per
token (abs-max over the contracted input axes, 127 levels), multiplies the
int8 values and divides by both scales. Two tolerances follow:

- against that int8 computation emulated in numpy plus the float adapter path
  `x ΔW`: float32 round-off only, 1e-5 of the output scale;
- against dequantized float math `x W_deq + x ΔW`: each input entry is off by
  at most `max|x_row| / 254` (half a step), so output `(row, j)` is off by at
  most `max|x_row| / 254 · Σ_i |W_deq[i, j]|`. A merged float layer (which
  does not quantize its input) differs from the adapter by exactly that.
"""

import keras
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.core.quantization import dequantized_kernel
from conftest import tiny_gemma, to_numpy, token_batch

EPS = np.float32(1e-7)  # Keras's abs-max epsilon (backend.epsilon())
METHODS = {
    "lora": lambda: kal.LoRA(rank=2),
    "sr_lora": lambda: kal.StableRankLoRA(seed=3),
    "flexlora": lambda: kal.FlexLoRA(rank=2, seed=3),
    "sinc": lambda: kal.SincLoRA(rank=2, grid_size=6),
}
#: Gemma projections whose int8 scale layout differs from a Dense's: the
#: contracted axis in the middle of the kernel (query), two contracted axes
#: (attention_output).
GEMMA_LAYERS = ("query", "attention_output")


# --------------------------------------------------------------------------
# numpy oracles
# --------------------------------------------------------------------------
def np_absmax(x, axis):
    """Keras's abs-max int8 quantization in float32: `(q, scale)`, `x ≈ q / scale`."""
    x = np.asarray(x, "float32")
    scale = np.float32(127.0) / (np.max(np.abs(x), axis=axis, keepdims=True) + EPS)
    return np.clip(np.round(x * scale), -127, 127).astype("float32"), scale.astype("float32")


def np_int8_matmul(x2, w2):
    """Keras's int8 call on matrices: per-row activation and per-column kernel
    quantization, integer product, divided by both scales."""
    xq, sx = np_absmax(x2, axis=1)
    wq, sw = np_absmax(w2, axis=0)
    return (xq @ wq) / (sx * sw)


def activation_bound(x2, w2):
    """Max |int8-activation output − float output| per entry (see module doc)."""
    step = (np.abs(x2).max(axis=1, keepdims=True) + EPS) / 254.0
    return step * np.abs(w2).sum(axis=0, keepdims=True)


def to_matrix(name, kernel):
    """The `(d_in, d_out)` matrix of a kernel, written out per layer kind."""
    kernel = np.asarray(kernel, "float32")
    if name in ("query", "key", "value"):  # ndh / kdh: d is contracted
        return kernel.transpose(1, 0, 2).reshape(kernel.shape[1], -1)
    if name == "attention_output":  # nhd: n, h contracted
        return kernel.reshape(-1, kernel.shape[-1])
    return kernel  # Dense, ffw_* (df / fd)


def np_delta(adapter):
    """ΔW of any adapter from its variables, in numpy."""
    v = {w.path.rsplit("/", 1)[-1]: to_numpy(w).astype("float64") for w in adapter.weights}
    if isinstance(adapter, kal.SincLoRAAdapter):
        product = v["lora_a"] @ v["lora_b"]
        widths = np.log1p(np.exp(v["bandwidth_logits"]))
        # The spec's grid: K points on [-c, c], moved by half a spacing for
        # init="shifted" (the default).
        grid = np.linspace(-adapter.grid_range, adapter.grid_range, adapter.grid_size)
        grid = grid + (0.5 * (grid[1] - grid[0]) if adapter.init == "shifted" else 0.0)
        f = sum(a * np.sinc(b * (product - g)) for a, b, g in zip(v["amplitudes"], widths, grid))
        return adapter.alpha / adapter.lora_rank * f
    if isinstance(adapter, kal.FlexLoRAAdapter):
        gains = v["flex_lambda"] * v["flex_mask"] * adapter.alpha / adapter.initial_rank
        return (v["flex_a"] * gains) @ v["flex_b"]
    return adapter.alpha / adapter.lora_rank * (v["lora_a"] @ v["lora_b"])


def randomize(adapter, seed=0, scale=0.3):
    rng = np.random.default_rng(seed)
    for w in adapter.trainable_weights:
        w.assign(rng.normal(0.0, scale, w.shape).astype("float32"))


# --------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------
def gemma(batch=2):
    backbone = tiny_gemma()
    tokens = token_batch(batch=batch)
    backbone(tokens)
    return backbone, tokens


def projections(model):
    return {
        layer.path.rsplit("/", 1)[-1]: layer
        for layer in model._flatten_layers()
        if type(layer) in (keras.layers.Dense, keras.layers.EinsumDense)
    }


def dense_model():
    model = keras.Sequential(
        [keras.Input((8,)), keras.layers.Dense(12, activation="relu", name="up"), keras.layers.Dense(6, name="down")],
        name="mlp",
    )
    rng = np.random.default_rng(7)
    model.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def gemma_layers():
    """Config, build config and float weights of the tiny Gemma's projections
    (built once; each test rebuilds fresh layers from them)."""
    layers = projections(gemma()[0])
    return {
        name: (type(layer), layer.get_config(), layer.get_build_config(), layer.get_weights())
        for name, layer in layers.items()
        if name in GEMMA_LAYERS
    }


def quantized_layer(name, gemma_layers):
    """`(int8 layer, its float kernel as a matrix, input x)`: a fresh copy of
    a tiny-Gemma projection or a plain Dense with a bias, quantized with
    `layer.quantize("int8")`."""
    if name == "dense":
        layer = dense_model().get_layer("down")
    else:
        cls, config, build_config, weights = gemma_layers[name]
        layer = cls.from_config(config)
        layer.build_from_config(build_config)
        layer.set_weights(weights)
    float_matrix = to_matrix(name, to_numpy(layer.kernel))
    layer.quantize("int8")
    shape = [2 if d is None else d for d in layer.get_build_config()["input_shape"]]
    if name != "dense":
        shape[1] = 5
    x = np.random.default_rng(1).normal(size=shape).astype("float32")
    return layer, float_matrix, x


# --------------------------------------------------------------------------
# One adapted layer against numpy
# --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ("dense",) + GEMMA_LAYERS)
@pytest.mark.parametrize("method", sorted(METHODS))
def test_output_and_merge_match_dequantized_oracle(method, name, gemma_layers):
    layer, w, x = quantized_layer(name, gemma_layers)
    bias = 0.0 if layer.bias is None else to_numpy(layer.bias)
    wq, sw = np_absmax(w, axis=0)
    w_deq = wq / sw
    # Our reading of Keras's layout: its int8 kernel is the numpy oracle's,
    # and `dequantized_kernel` is `q / scale` of it.
    np.testing.assert_array_equal(to_matrix(name, to_numpy(layer.kernel)), wq)
    np.testing.assert_allclose(to_matrix(name, to_numpy(dequantized_kernel(layer))), w_deq, rtol=1e-6)

    adapter = METHODS[method]().wrap(layer)
    assert adapter.quantization_mode is None and adapter.compute_dtype == "float32"
    assert layer.quantization_mode == "int8"
    x2 = x.reshape(-1, w.shape[0])
    at_init = to_numpy(adapter(x)).reshape(x2.shape[0], -1)
    np.testing.assert_allclose(at_init, np_int8_matmul(x2, w) + bias, atol=1e-5 * np.abs(at_init).max())

    randomize(adapter, scale=1.0 if method == "flexlora" else 0.3)  # ΔW is cubic in Flex's scale
    delta = np_delta(adapter)
    out = to_numpy(adapter(x)).reshape(x2.shape[0], -1)
    scale = np.abs(out).max()
    assert np.abs(x2 @ delta).max() > 0.05 * scale  # the update is not negligible
    # The quantized base's own int8 output plus the float adapter path.
    np.testing.assert_allclose(out, np_int8_matmul(x2, w) + x2 @ delta + bias, atol=1e-5 * scale)
    base_out = to_numpy(layer(x)).reshape(out.shape)
    np.testing.assert_allclose(out, base_out + x2 @ delta, atol=1e-5 * scale)
    # Dequantized math, within the activation-rounding bound.
    float_math = x2 @ (w_deq + delta) + bias
    error = np.abs(out - float_math)
    assert np.all(error <= activation_bound(x2, w_deq) + 1e-5 * scale)
    assert error.max() > 0  # Keras does quantize the activations

    merged = adapter.merge()
    assert type(merged) is type(layer) and merged.quantization_mode is None
    assert merged.kernel.dtype == "float32"
    np.testing.assert_allclose(to_matrix(name, to_numpy(merged.kernel)), w_deq + delta, atol=1e-6 * np.abs(w_deq + delta).max())
    merged_out = to_numpy(merged(x)).reshape(out.shape)
    np.testing.assert_allclose(merged_out, float_math, atol=1e-5 * scale)

    requantized = adapter.merge(quantize="int8")
    assert requantized.quantization_mode == "int8" and requantized.kernel.dtype == "int8"
    target = w_deq + delta
    step = (np.abs(target).max(axis=0) + EPS) / 254.0  # half an int8 step per column
    deq = to_matrix(name, to_numpy(dequantized_kernel(requantized)))
    assert np.all(np.abs(deq - target) <= step * (1 + 1e-5))
    requantized_out = to_numpy(requantized(x)).reshape(out.shape)
    bound = activation_bound(x2, target) + np.abs(x2).sum(axis=1, keepdims=True) * step
    assert np.all(np.abs(requantized_out - (x2 @ target + bias)) <= bound + 1e-5 * scale)


# --------------------------------------------------------------------------
# Whole models
# --------------------------------------------------------------------------
#: One tiny Gemma holds every method, on different projections, so that one
#: compiled `fit` per precision trains them all (FlexLoRA needs at least two
#: layers to move rank between).
MIXED_TARGETS = {
    "lora": ["query"],
    "sr_lora": ["value"],
    "sinc": ["key", "attention_output"],
    "flexlora": ["ffw_gating", "ffw_gating_2", "ffw_linear"],
}


def apply_every_method(backbone):
    for method, targets in MIXED_TARGETS.items():
        kal.apply_adapters(backbone, METHODS[method](), targets=targets)
    adapters = kal.find_adapters(backbone)
    kinds = {type(a) for a in adapters}
    assert len(adapters) == 7 and len(kinds) == 4
    return adapters


@pytest.mark.parametrize(
    "policy, quantized", [("float32", True), ("mixed_bfloat16", False)], ids=["int8", "bfloat16"]
)
def test_fit_trains_only_adapters_then_merges(policy, quantized):
    """Every method on one tiny Gemma: an int8 base, or bfloat16 compute."""
    keras.mixed_precision.set_global_policy(policy)
    compute = "float32" if policy == "float32" else "bfloat16"
    backbone, tokens = gemma(batch=4)
    if quantized:
        backbone.quantize("int8")
    reference = to_numpy(backbone(tokens)).astype("float32")
    adapters = apply_every_method(backbone)
    for adapter in adapters:
        assert adapter.quantization_mode is None and adapter.compute_dtype == compute
        assert adapter.wrapped.quantization_mode == ("int8" if quantized else None)
        assert all(v.dtype == "float32" for v in adapter.trainable_weights)
    at_init = backbone(tokens)
    assert keras.backend.standardize_dtype(at_init.dtype) == compute
    at_init = to_numpy(at_init).astype("float32")
    np.testing.assert_allclose(at_init, reference, atol=1e-6 * np.abs(reference).max())

    inside = {id(v) for a in adapters for v in a.trainable_weights}
    frozen = [(v, to_numpy(v)) for v in backbone.weights if id(v) not in inside and "flex_" not in v.path]
    trained = {a.path: [(v, to_numpy(v)) for v in a.trainable_weights] for a in adapters}
    assert {id(v) for v in backbone.trainable_weights} == inside
    model = keras.Model(backbone.input, backbone.output)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    scheduler = kal.FlexLoRAScheduler(3, b0=2, warmup_steps=0, final_steps=0, interval=1, verbose=0)
    target = np.random.default_rng(0).normal(size=reference.shape).astype("float32")
    history = model.fit(tokens, target, batch_size=4, epochs=3, verbose=0, callbacks=[scheduler])
    assert np.isfinite(history.history["loss"]).all()
    for variable, value in frozen:  # int8 kernels and scales included
        np.testing.assert_array_equal(to_numpy(variable), value, err_msg=variable.path)
    for adapter in adapters:  # every method learned something
        assert all(v.dtype == "float32" for v in adapter.trainable_weights)
        assert any(not np.array_equal(to_numpy(v), value) for v, value in trained[adapter.path]), adapter.path
    flex = [a for a in adapters if isinstance(a, kal.FlexLoRAAdapter)]
    assert sum(a.rank() for a in flex) == 3 * 2  # FlexLoRA's budget is kept

    adapted = to_numpy(backbone(tokens)).astype("float32")
    assert kal.merge_adapters(backbone) == 7
    for layer in projections(backbone).values():
        assert layer.quantization_mode is None and layer.kernel.dtype == "float32"
        assert layer.compute_dtype == compute
    # int8: the merged float layers do not round their activations to int8;
    # bfloat16: the update is added before, not after, the bfloat16 matmul.
    tolerance = 0.03 if policy == "float32" else 0.05
    merged = to_numpy(backbone(tokens)).astype("float32")
    np.testing.assert_allclose(merged, adapted, atol=tolerance * np.abs(adapted).max())


def test_int8_base_under_mixed_bfloat16_fits_every_method():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = keras.Sequential(
        [keras.Input((8,))] + [keras.layers.Dense(8, activation="tanh", name=m) for m in sorted(METHODS)]
    )
    model.quantize("int8")
    assert all(layer.dtype_policy.name == "int8_from_mixed_bfloat16" for layer in model.layers)
    for method in sorted(METHODS):
        kal.apply_adapters(model, METHODS[method](), targets=[method])
    adapters = kal.find_adapters(model)
    assert all(a.compute_dtype == "bfloat16" and a.quantization_mode is None for a in adapters)
    trained = [(v, to_numpy(v)) for v in model.trainable_weights]
    frozen = [(v, to_numpy(v)) for a in adapters for v in a.wrapped.weights]
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.random.default_rng(3).normal(size=(16, 8)).astype("float32")
    history = model.fit(x, np.roll(x, 1, axis=1), batch_size=8, epochs=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(v.dtype == "float32" for v, _ in trained)
    for adapter in adapters:
        own = {id(v) for v in adapter.trainable_weights}
        assert any(not np.array_equal(to_numpy(v), b) for v, b in trained if id(v) in own), adapter.name
    for variable, value in frozen:
        np.testing.assert_array_equal(to_numpy(variable), value, err_msg=variable.path)
    adapted = to_numpy(model(x)).astype("float32")
    assert kal.merge_adapters(model) == 4
    merged = to_numpy(model(x)).astype("float32")
    np.testing.assert_allclose(merged, adapted, atol=0.05 * np.abs(adapted).max())


@pytest.mark.parametrize("quantized_base", [True, False])
def test_merge_adapters_can_requantize(quantized_base):
    model = dense_model()
    x = np.random.default_rng(2).normal(size=(5, 8)).astype("float32")
    if quantized_base:
        model.quantize("int8")
    kal.apply_adapters(model, kal.LoRA(rank=2), targets="all-linear")
    for i, adapter in enumerate(kal.find_adapters(model)):
        randomize(adapter, seed=i)
    adapted = to_numpy(model(x))
    assert kal.merge_adapters(model, quantize="int8") == 2
    layers = projections(model)
    assert len(layers) == 2 and all(layer.quantization_mode == "int8" for layer in layers.values())
    # Weight and activation rounding of two int8 layers.
    np.testing.assert_allclose(to_numpy(model(x)), adapted, atol=0.03 * np.abs(adapted).max())


@pytest.mark.parametrize("method", ["lora", "sinc"])  # the base class's call, Sinc's own
def test_quantizing_after_wrapping_equals_wrapping_the_quantized_model(method):
    first, second = dense_model(), dense_model()
    x = np.random.default_rng(2).normal(size=(5, 8)).astype("float32")
    first.quantize("int8")
    kal.apply_adapters(first, METHODS[method](), targets="all-linear")
    kal.apply_adapters(second, METHODS[method](), targets="all-linear")
    second.quantize("int8")  # quantizes the wrapped bases in place
    for i, (a, b) in enumerate(zip(kal.find_adapters(first), kal.find_adapters(second))):
        assert b.wrapped.quantization_mode == "int8" and b.quantization_mode is None
        randomize(a, seed=i)
        for va, vb in zip(a.weights, b.weights):
            vb.assign(va)
    want = to_numpy(first(x))
    np.testing.assert_allclose(to_numpy(second(x)), want, atol=1e-6 * np.abs(want).max())
    kal.merge_adapters(second)
    assert all(layer.quantization_mode is None for layer in projections(second).values())


def test_stable_rank_of_a_quantized_kernel_uses_the_dequantized_matrix():
    backbone, _ = gemma()
    floats = {name: to_matrix(name, to_numpy(layer.kernel)) for name, layer in projections(backbone).items()}
    backbone.quantize("int8")
    layers = projections(backbone)
    oracle, differs = {}, False
    for name, layer in layers.items():
        q, s = np_absmax(floats[name], axis=0)
        sv = np.linalg.svd((q / s).astype("float64"), compute_uv=False)
        oracle[name] = float((sv**2).sum() / sv[0] ** 2)
        assert kal.stable_rank(layer) == pytest.approx(oracle[name], rel=5e-3), name
        raw = np.linalg.svd(q.astype("float64"), compute_uv=False)
        differs |= abs((raw**2).sum() / raw[0] ** 2 - oracle[name]) > 0.02 * oracle[name]
    assert differs  # the int8 values alone would give other stable ranks
    method = kal.StableRankLoRA(seed=0)
    plan = kal.plan_ranks(backbone, method)
    names = [row["path"].rsplit("/", 1)[-1] for row in plan]
    assert sorted(names) == ["attention_output", "query", "value"]
    want = kal.allocate_ranks([oracle[n] for n in names], [r["shape"] for r in plan])
    assert plan.ranks == want
    kal.apply_adapters(backbone, method)
    adapters = kal.find_adapters(backbone)
    assert [a.rank() for a in adapters] == want
    for adapter in adapters:
        randomize(adapter)
    for adapter, srank in zip(adapters, kal.update_stable_ranks(backbone).values()):
        sv = np.linalg.svd(np_delta(adapter), compute_uv=False)
        assert srank == pytest.approx((sv**2).sum() / sv[0] ** 2, rel=5e-3)


def test_save_and_load_adapters_on_a_quantized_base(tmp_path):
    trained, fresh = dense_model(), dense_model()
    x = np.random.default_rng(2).normal(size=(5, 8)).astype("float32")
    trained.quantize("int8")
    fresh.quantize("int8")
    kal.apply_adapters(trained, kal.FlexLoRA(rank=2, seed=1), targets="all-linear")
    for i, adapter in enumerate(kal.find_adapters(trained)):
        randomize(adapter, seed=i)
        adapter.prune_component()  # rank state is saved too
    want = to_numpy(trained(x))
    base = [(v, to_numpy(v)) for v in fresh.weights]
    kal.save_adapters(trained, tmp_path / "adapters.npz")
    kal.load_adapters(fresh, tmp_path / "adapters.npz")
    loaded = kal.find_adapters(fresh)
    assert len(loaded) == 2 and all(a.wrapped.quantization_mode == "int8" for a in loaded)
    assert [a.rank() for a in loaded] == [1, 1]
    np.testing.assert_allclose(to_numpy(fresh(x)), want, atol=1e-6 * np.abs(want).max())
    for variable, value in base:  # int8 kernels and scales untouched
        np.testing.assert_array_equal(to_numpy(variable), value, err_msg=variable.path)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
def test_other_quantization_modes_raise():
    layer = dense_model().get_layer("down")
    layer.quantize("int4")
    with pytest.raises(ValueError, match=r"'down' is quantized with mode 'int4'.*int8"):
        kal.LoRA(rank=2).wrap(layer)
    model = dense_model()
    kal.apply_adapters(model, kal.SincLoRA(rank=2, grid_size=4), targets=["down"])
    model.get_layer("down").wrapped.quantize("int4")
    with pytest.raises(ValueError, match=r"'down' is quantized with mode 'int4'"):
        model(np.zeros((1, 8), "float32"))
    with pytest.raises(ValueError, match=r"'down' is quantized with mode 'int4'"):
        model.get_layer("down").merge()


def test_merge_quantize_argument_is_checked():
    model = dense_model()
    model.quantize("int8")
    kal.apply_adapters(model, kal.LoRA(rank=2), targets="all-linear")
    with pytest.raises(ValueError, match=r"'down': `quantize` must be None .* or 'int8', got 'int4'"):
        model.get_layer("down").merge(quantize="int4")
    with pytest.raises(ValueError, match="`quantize` must be None"):
        kal.merge_adapters(model, quantize="float8")
    assert len(kal.find_adapters(model)) == 2  # nothing was merged

    class ScaledDense(keras.layers.Dense):
        pass

    layer = ScaledDense(4, name="scaled")
    layer.build((None, 3))
    with pytest.raises(ValueError, match="'scaled': its ScaledDense cannot be quantized by Keras"):
        kal.LoRA(rank=2).wrap(layer).merge(quantize="int8")
    with pytest.raises(ValueError, match="'dropout' is a Dropout; only keras.layers.Dense"):
        dequantized_kernel(keras.layers.Dropout(0.1, name="dropout"))
