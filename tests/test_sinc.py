"""SincLoRA (LR-LoRA): the tabulated transfer function, the merged-weight adapter,
its initializations and the stable-rank diagnostic, against float64 numpy oracles,
on the backend in KERAS_BACKEND."""

import math

import keras
import numpy as np
import pytest
from keras import ops

from conftest import tiny_llama, to_numpy, token_batch
from keras_adaptive_lora import (
    LoRA,
    LoRAAdapter,
    SincLoRA,
    SincLoRAAdapter,
    apply_adapters,
    find_adapters,
    merge_adapters,
    update_stable_ranks,
)
from keras_adaptive_lora import backend as backend_module
from keras_adaptive_lora.methods.sinc import sinc_grid, sinc_transfer
from keras_adaptive_lora.methods.sinc import transfer as transfer_module

BACKEND = keras.backend.backend()
UNIT_LOGIT = math.log(math.e - 1.0)


# --------------------------------------------------------------------------
# float64 numpy oracles
# --------------------------------------------------------------------------
def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_sinc_terms(x, grid, b):
    """`sinc(b_k (x − g_k))` and `sinc'` at the same points, shape `(K,) + x.shape`."""
    z = np.asarray(b, np.float64).reshape((-1,) + (1,) * np.ndim(x)) * (
        np.asarray(x, np.float64)[None] - np.asarray(grid, np.float64).reshape((-1,) + (1,) * np.ndim(x))
    )
    small = np.abs(z) < 1e-4
    safe = np.where(small, 1.0, z)
    slope = np.where(small, -(np.pi**2) * z / 3, (np.cos(np.pi * safe) - np.sinc(safe)) / safe)
    return np.sinc(z), slope


def np_transfer(x, a, b, grid):
    """f(x) = sum_k a_k sinc(b_k (x - g_k)), numpy's normalized sinc."""
    return np.tensordot(np.asarray(a, np.float64), np_sinc_terms(x, grid, b)[0], 1)


def np_update(lora_a, lora_b, amplitudes, logits, grid, scale):
    """ΔW and its derivatives: `(delta, f'(AB), df/da, df/db)` with the scale."""
    a, b = np.asarray(amplitudes, np.float64), np_softplus(np.asarray(logits, np.float64))
    product = np.asarray(lora_a, np.float64) @ np.asarray(lora_b, np.float64)
    v, q = np_sinc_terms(product, grid, b)
    diff = product[None] - np.asarray(grid).reshape(-1, 1, 1)
    return scale * np.tensordot(a, v, 1), scale * np.tensordot(a * b, q, 1), scale * v, scale * a.reshape(-1, 1, 1) * diff * q


def np_adapter_grads(case, x, weights, params, grid, scale):
    """Output `y` of an adapted layer and the gradients of `Σ weights · y` (x, A, B, a, β), analytic."""
    lora_a, lora_b, amplitudes, logits = (np.asarray(p, np.float64) for p in params)
    delta, slope, d_a, d_b = np_update(lora_a, lora_b, amplitudes, logits, grid, scale)
    kernel = case["kernel"] + case["to_kernel"](delta)
    x = np.asarray(x, np.float64)
    y = np.einsum(case["equation"], x, kernel) + case["bias"]
    lhs, ker, out = case["equation"].replace("->", ",").split(",")
    g = case["to_matrix"](np.einsum(f"{lhs},{out}->{ker}", x, weights))
    grad_product = g * slope
    sigmoid = 1.0 / (1.0 + np.exp(-logits))
    return y, [
        np.einsum(f"{out},{ker}->{lhs}", weights, kernel),
        grad_product @ lora_b.T,
        lora_a.T @ grad_product,
        np.tensordot(d_a, g, 2),
        np.tensordot(d_b, g, 2) * sigmoid,
    ]


# --------------------------------------------------------------------------
# Backend autodiff under jit / tf.function (test-only backend code)
# --------------------------------------------------------------------------
def value_and_grads(fn, arrays, first=0):
    """`fn(*tensors)` (a scalar) and its gradients w.r.t. the inputs from
    `first` on (those before are constants, as a model's input is), as numpy,
    compiled as training would be (`jax.jit`, `tf.function`, eager torch)."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    if BACKEND == "jax":
        import jax

        value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(first, len(arrays)))))(*arrays)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def run(*tensors):
            with tf.GradientTape() as tape:
                tape.watch(tensors[first:])
                value = fn(*tensors)
            return value, tape.gradient(value, tensors[first:])

        value, grads = run(*[tf.constant(a) for a in arrays])
    else:
        import torch

        tensors = [torch.tensor(a, requires_grad=i >= first) for i, a in enumerate(arrays)]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors[first:])
    return float(to_numpy(value)), [to_numpy(g) for g in grads]


def relative_error(got, want):
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


# --------------------------------------------------------------------------
# Layers: Dense, Gemma's query (contracted axis in the middle), attention output
# --------------------------------------------------------------------------
def layer_case(kind):
    if kind == "dense":
        layer = keras.layers.Dense(5)
        layer.build((2, 3, 4))
        matrix = (lambda k: k, lambda m: m)
        equation, x_shape = "btd,de->bte", (2, 3, 4)
    elif kind == "gemma_query":
        layer = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4), bias_axes="nh")
        layer.build((2, 5, 6))
        matrix = (lambda k: k.transpose(1, 0, 2).reshape(6, 12), lambda m: m.reshape(6, 3, 4).transpose(1, 0, 2))
        equation, x_shape = layer.equation, (2, 5, 6)
    else:
        layer = keras.layers.EinsumDense("btnh,nhd->btd", output_shape=(None, 5))
        layer.build((2, 3, 4, 2))
        matrix = (lambda k: k.reshape(8, 5), lambda m: m.reshape(4, 2, 5))
        equation, x_shape = layer.equation, (2, 3, 4, 2)
    rng = np.random.default_rng(5)
    if layer.bias is not None:
        layer.bias.assign(rng.normal(size=layer.bias.shape).astype("float32"))
    bias = 0.0 if layer.bias is None else to_numpy(layer.bias).astype(np.float64)
    case = dict(equation=equation, kernel=to_numpy(layer.kernel).astype(np.float64), bias=bias)
    case.update(to_matrix=matrix[0], to_kernel=matrix[1], x_shape=x_shape)
    return layer, case


def set_adapter(adapter, lora_a, lora_b, amplitudes, logits):
    for variable, value in zip(adapter.trainable_weights, (lora_a, lora_b, amplitudes, logits)):
        variable.assign(np.asarray(value, "float32"))


def extreme_params(d_in, d_out, grid, bandwidths, seed=0):
    """Rank-2 factors whose product `X_ij = v_i + w_j` has entries exactly on grid
    points (`w_0 = 0`, `v` holds grid points) and beyond the grid (|X| up to 4.5)."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(-4.0, 4.0, d_in).astype("float32")
    v[: min(d_in, 3)] = np.asarray(grid, "float32")[[0, len(grid) // 2, -1]][: min(d_in, 3)]
    w = rng.uniform(-0.5, 0.5, d_out).astype("float32")
    w[0] = 0.0
    lora_a = np.stack([v, np.ones(d_in, "float32")], 1)
    lora_b = np.stack([np.ones(d_out, "float32"), w], 0)
    amplitudes = rng.normal(size=len(grid)).astype("float32")
    logits = np.log(np.expm1(np.asarray(bandwidths, np.float64))).astype("float32")
    return lora_a, lora_b, amplitudes, logits


BANDWIDTHS = {"narrow": (0.2, 0.2), "unit": (0.5, 1.5), "mixed": (0.2, 8.0), "wide": (4.0, 8.0)}


# --------------------------------------------------------------------------
# The transfer function f: value and gradients, against the exact sum
# --------------------------------------------------------------------------
def assert_transfer_matches_exact_sum(x, a, b, grid, rng):
    """`f(x)` within 1e-6 and the gradients of `sum(w f(x))` (random `w`) by
    x, a, b within 1e-5 of the float64 oracle, relative to their largest entry."""
    weights = rng.normal(size=x.shape).astype("float32")
    _, grads = value_and_grads(lambda x, a, b: ops.sum(ops.multiply(sinc_transfer(x, a, b, grid), weights)), [x, a, b])
    assert relative_error(to_numpy(sinc_transfer(x, a, b, grid)), np_transfer(x, a, b, grid)) < 1e-6
    v, q = np_sinc_terms(x, grid, b)
    want = [weights * np.tensordot(a * b, q, 1), np.tensordot(v, weights, 2)]
    want.append(np.tensordot(q * (x[None] - np.reshape(grid, (-1, 1, 1))), weights, 2) * a)
    for got, expected, name in zip(grads, want, "xab"):
        assert relative_error(got, expected) < 1e-5, name


def test_grid_is_uniform_and_shiftable():
    np.testing.assert_allclose(sinc_grid(50, 3.0), np.linspace(-3, 3, 50))
    assert sinc_grid(3, 2.0) == [-2.0, 0.0, 2.0]
    assert sinc_grid(3, 2.0, shift=0.5) == [-1.0, 1.0, 3.0]


@pytest.mark.parametrize("regime", sorted(BANDWIDTHS))
def test_transfer_value_and_gradients_match_exact_sum(regime):
    # 50 grid points; x from -4.5 to 4.5 (beyond the grid) and exactly on grid points.
    grid = sinc_grid(50, 3.0)
    rng = np.random.default_rng(1)
    x = rng.uniform(-4.5, 4.5, size=(12, 20)).astype("float32")
    x.flat[:50] = np.asarray(grid, "float32")
    a = rng.normal(size=50).astype("float32")
    b = rng.uniform(*BANDWIDTHS[regime], size=50).astype("float32")
    assert_transfer_matches_exact_sum(x, a, b, grid, rng)


def test_sinc_of_zero_is_one_with_finite_gradient():
    # One grid point at 0, unit bandwidth and amplitude: f(x) = sinc(x).
    x = np.array([0.0, 1e-30, -1e-7, 1e-3, 0.5, 1.0], "float32")
    one = np.ones((1,), "float32")
    got = to_numpy(sinc_transfer(x, one, one, [0.0]))
    np.testing.assert_allclose(got, np.sinc(x.astype(np.float64)), atol=2e-7)
    _, (gx, ga, gb) = value_and_grads(lambda x, a, b: ops.sum(sinc_transfer(x, a, b, [0.0])), [x, one, one])
    assert all(np.isfinite(g).all() for g in (gx, ga, gb))
    np.testing.assert_allclose(gx[:4], -(math.pi**2) / 3 * x[:4], atol=1e-6)
    np.testing.assert_allclose(gx[5], -1.0, rtol=1e-5)


def test_table_follows_bandwidth_and_range():
    # h = 2^floor(log2(resolution / (pi max b))); as many chunks of the table are
    # filled as [-4.5, 4.5] needs at that h: b = 8 most of it, b = 0.2 one chunk.
    filled = {}
    for b in (8.0, 0.2):
        low, high = ops.convert_to_tensor(-4.5), ops.convert_to_tensor(4.5)
        values, _, place = transfer_module.transfer_table(low, high, np.ones(3, "float32"), np.full(3, b, "float32"), [-1.0, 0.0, 1.0])
        h = 1.0 / float(to_numpy(place)[1])
        assert h == 2.0 ** math.floor(math.log2(transfer_module._RESOLUTION / (math.pi * b)))
        needed = math.floor(4.5 / h) - math.floor(-4.5 / h) + 2
        filled[b] = int(np.sum(np.any(to_numpy(values) != 0, axis=0)))
        assert filled[b] == transfer_module.CHUNK * math.ceil(needed / transfer_module.CHUNK)
    assert filled[0.2] <= 2 * transfer_module.CHUNK < 1024 < filled[8.0] < transfer_module.TABLE_ROWS


def test_transfer_stays_accurate_over_a_wide_range_at_high_bandwidths():
    # |x| up to 10 with bandwidths up to 8: about 5,000 intervals at the
    # spacing the bandwidths ask for (h = 2^-8), more than the table's 4,096,
    # so h doubles; the interpolant must still hold the accuracy.
    grid = sinc_grid(50, 3.0)
    rng = np.random.default_rng(3)
    x = rng.uniform(-10.0, 10.0, size=(40, 50)).astype("float32")
    a = rng.normal(size=50).astype("float32")
    b = rng.uniform(4.0, 8.0, size=50).astype("float32")
    assert_transfer_matches_exact_sum(x, a, b, grid, rng)


# --------------------------------------------------------------------------
# The adapter layer: ΔW, outputs and gradients against the float64 oracle
# --------------------------------------------------------------------------
@pytest.mark.parametrize("regime", sorted(BANDWIDTHS))
def test_update_matches_exact_sum_in_merged_forward_and_delta_kernel(regime):
    layer = keras.layers.Dense(16, use_bias=False, kernel_initializer="zeros")
    layer.build((None, 9))
    adapter = SincLoRAAdapter(layer, rank=2, alpha=3.0)
    bandwidths = np.random.default_rng(2).uniform(*BANDWIDTHS[regime], size=50)
    params = extreme_params(9, 16, adapter.grid, bandwidths)
    set_adapter(adapter, *params)
    want = np_update(*params, adapter.grid, 1.5)[0]
    # The merged forward on the identity: y = 0 + ΔW.
    assert relative_error(to_numpy(adapter(np.eye(9, dtype="float32"))), want) < 1e-6
    assert relative_error(to_numpy(adapter.delta_kernel()), want) < 1e-6


@pytest.mark.parametrize("kind", ["dense", "gemma_query", "attention_output"])
def test_adapter_outputs_and_gradients_match_oracle(kind):
    layer, case = layer_case(kind)
    adapter = SincLoRAAdapter(layer, rank=2, alpha=3.0, grid_size=50)
    assert [v.name for v in adapter.trainable_weights] == ["lora_a", "lora_b", "amplitudes", "bandwidth_logits"]
    bandwidths = np.random.default_rng(3).uniform(0.2, 8.0, size=50)
    params = extreme_params(adapter.d_in, adapter.d_out, adapter.grid, bandwidths, seed=4)
    set_adapter(adapter, *params)
    rng = np.random.default_rng(6)
    x = rng.normal(size=case["x_shape"]).astype("float32")
    weights = rng.normal(size=to_numpy(adapter(x)).shape).astype("float32")
    frozen = [v.value for v in adapter.non_trainable_weights]

    def loss(x, *params):
        y, _ = adapter.stateless_call(list(params), frozen, x)
        return ops.sum(ops.multiply(y, weights))

    _, grads = value_and_grads(loss, [x, *params])
    want_y, want = np_adapter_grads(case, x, weights, params, adapter.grid, 1.5)
    assert relative_error(to_numpy(adapter(x)), want_y) < 3e-6  # a float32 matmul (ΔW alone: 1e-6, above)
    for got, expected, name in zip(grads, want, ["x", "lora_a", "lora_b", "amplitudes", "logits"]):
        assert relative_error(got, expected) < 1e-5, name
    # The input as a constant (a model's input: on torch the backward pass then skips dL/dx).
    _, grads = value_and_grads(loss, [x, *params], first=1)
    for got, expected, name in zip(grads, want[1:], ["lora_a", "lora_b", "amplitudes", "logits"]):
        assert relative_error(got, expected) < 1e-5, name


@pytest.mark.parametrize("block_elements", [7, 40])
def test_row_blocks_give_the_same_outputs_and_gradients(monkeypatch, block_elements):
    # One row (or one head) per block, then a few: the same numbers as one block.
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", block_elements)
    test_adapter_outputs_and_gradients_match_oracle("gemma_query")
    test_adapter_outputs_and_gradients_match_oracle("attention_output")


def largest_intermediate(fn, arrays):
    """Element count of the largest tensor created while computing `fn` and its
    gradients (jax: every equation of the jaxpr, both branches of a switch;
    tensorflow: every op of the graph; torch: every dispatched op)."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    if BACKEND == "jax":
        import jax

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                yield from (int(np.prod(v.aval.shape)) for v in eqn.outvars)
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (list, tuple)) else [param]:
                        inner = getattr(sub, "jaxpr", None)
                        if inner is not None:
                            yield from walk(getattr(inner, "jaxpr", inner))

        return max(walk(jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(arrays)))))(*arrays).jaxpr))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def run(*tensors):
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                value = fn(*tensors)
            return tape.gradient(value, tensors)

        graph = run.get_concrete_function(*[tf.TensorSpec(a.shape, tf.float32) for a in arrays]).graph
        shapes = [o.shape.as_list() for op in graph.get_operations() for o in op.outputs if o.shape.rank is not None]
        return max(int(np.prod(s)) for s in shapes if None not in s)
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        size = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor):
                    Largest.size = max(Largest.size, t.numel())
            return out

    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    with Largest():
        torch.autograd.grad(fn(*tensors), tensors)
    return Largest.size


def test_step_keeps_nothing_grid_sized_per_entry(monkeypatch):
    # 64 grid points on a 12 x 10 kernel, blocks of 4 rows: a broadcast
    # implementation creates (64, 12, 10) tensors. Here the largest tensor is
    # a kernel, a table or a chunk of it (17 nodes x 64 grid points here).
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", 40)
    monkeypatch.setattr(transfer_module, "TABLE_ROWS", 128)
    monkeypatch.setattr(transfer_module, "CHUNK", 16)
    layer = keras.layers.Dense(10, use_bias=False)
    layer.build((None, 12))
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=64)
    set_adapter(adapter, *extreme_params(12, 10, adapter.grid, np.ones(64)))
    frozen = [v.value for v in adapter.non_trainable_weights]

    def loss(x, *params):
        y, _ = adapter.stateless_call(list(params), frozen, x)
        return ops.sum(ops.square(y))

    size = largest_intermediate(loss, [np.ones((3, 12)), *[to_numpy(v) for v in adapter.trainable_weights]])
    assert size <= 17 * 64 < 64 * 12 * 10


def compiled_temp_bytes(adapter_cls, **kwargs):
    """XLA's temporary buffers for one training step of `x -> up -> down`
    (kernels 64x256 and 256x64, both adapted), compiled, not run."""
    import jax

    up, down = keras.layers.Dense(256, use_bias=False), keras.layers.Dense(64, use_bias=False)
    up.build((None, 64))
    down.build((None, 256))
    adapters = [adapter_cls(layer, rank=2, **kwargs) for layer in (up, down)]
    params = [[v.value for v in a.trainable_weights] for a in adapters]
    frozen = [[v.value for v in a.non_trainable_weights] for a in adapters]

    def loss(params, x):
        for adapter, trainable, fixed in zip(adapters, params, frozen):
            x, _ = adapter.stateless_call(list(trainable), fixed, x)
        return ops.sum(ops.square(x))

    compiled = jax.jit(jax.grad(loss)).lower(params, np.ones((8, 64), "float32")).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(BACKEND != "jax", reason="XLA buffer assignment is jax-only")
def test_compiled_step_holds_one_merged_kernel_whatever_the_grid_size(monkeypatch):
    # Blocks of 4096 entries (a kernel has 16384), small tables: one merged
    # kernel at a time on top of LoRA's step (measured: without the data
    # dependency on x, XLA forms both merged kernels first).
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", 4096)
    monkeypatch.setattr(transfer_module, "TABLE_ROWS", 128)
    monkeypatch.setattr(transfer_module, "CHUNK", 16)
    kernel_bytes = 64 * 256 * 4
    lora = compiled_temp_bytes(LoRAAdapter)
    small, large = (compiled_temp_bytes(SincLoRAAdapter, grid_size=k) for k in (20, 100))
    assert large <= small + kernel_bytes // 4
    assert large <= lora + kernel_bytes + 12 * 4096 * 4  # a merged kernel, a dozen block temporaries


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tensorflow keeps memory per graph node; jax loops are compiled")
def test_tensorflow_graph_does_not_grow_with_the_number_of_blocks(monkeypatch):
    import tensorflow as tf

    def nodes(block_elements):
        monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", block_elements)
        layer = keras.layers.Dense(64)
        layer.build((None, 32))
        adapter = SincLoRAAdapter(layer, rank=2, grid_size=6)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = ops.sum(ops.square(adapter(x)))
            return tape.gradient(loss, adapter.trainable_variables)

        graph = step.get_concrete_function(tf.constant(np.ones((3, 32), "float32"))).graph.as_graph_def()
        return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)

    # 32 x 64 kernel: 16 blocks of 2 rows vs 4 blocks of 8: one while loop.
    assert nodes(2 * 64) == nodes(8 * 64)


# --------------------------------------------------------------------------
# Initialization
# --------------------------------------------------------------------------
def np_adam_training(init, steps, params, x, y, grid, scale, kernel, bias, lr=1e-2):
    """`steps` Keras-Adam steps on the MSE of `x (W + ΔW) + bias`, float64; returns
    the final loss and ΔW."""
    params = [np.asarray(p, np.float64) for p in params]
    m, v = [np.zeros_like(p) for p in params], [np.zeros_like(p) for p in params]
    case = dict(equation="nd,de->ne", kernel=kernel, bias=bias, to_matrix=lambda k: k, to_kernel=lambda k: k)
    for step in range(1, steps + 1):
        delta = np_update(*params, grid, scale)[0]
        residual = 2.0 * (x @ (kernel + delta) + bias - y) / y.size
        _, grads = np_adapter_grads(case, x, residual, params, grid, scale)
        alpha = lr * math.sqrt(1 - 0.999**step) / (1 - 0.9**step)
        for i, g in enumerate(grads[1:]):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            params[i] = params[i] - alpha * m[i] / (np.sqrt(v[i]) + 1e-7)
    delta = np_update(*params, grid, scale)[0]
    return float(np.mean((x @ (kernel + delta) + bias - y) ** 2)), delta, params


def training_problem(init, seed=0):
    """A Dense 8 -> 6 adapter at rank 2 set from numpy, and a batch of 16."""
    rng = np.random.default_rng(seed)
    layer = keras.layers.Dense(6)
    layer.build((None, 8))
    layer.kernel.assign(rng.normal(size=(8, 6)).astype("float32") * 0.3)
    layer.bias.assign(rng.normal(size=6).astype("float32") * 0.1)
    adapter = SincLoRAAdapter(layer, rank=2, alpha=4.0, init=init)
    initial = [to_numpy(v) for v in adapter.trainable_weights]
    initial[0] = rng.uniform(-0.8, 0.8, size=(8, 2)).astype("float32")
    if init == "random":
        initial[1] = rng.normal(size=(2, 6)).astype("float32") * 0.1
    set_adapter(adapter, *initial)
    x, y = rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 6)).astype("float32")
    return layer, adapter, initial, x, y


def test_adam_training_matches_float64_oracle():
    # The same numbers on every backend: each matches the float64 oracle
    # (default init; from "random" the float64 trajectory itself moves by 2e-5
    # when the initial weights move by 1e-7, so float32 cannot follow it).
    init = SincLoRA().init
    layer, adapter, initial, x, y = training_problem(init)
    model = keras.Sequential([keras.Input((8,)), adapter])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    for _ in range(20):
        model.train_on_batch(x, y)
    loss = float(model.evaluate(x, y, verbose=0))
    kernel, bias = to_numpy(layer.kernel).astype(np.float64), to_numpy(layer.bias).astype(np.float64)
    want_loss, want_delta, _ = np_adam_training(init, 20, initial, x.astype(np.float64), y, adapter.grid, 2.0, kernel, bias)
    assert abs(loss - want_loss) <= 1e-5 * want_loss
    assert relative_error(to_numpy(adapter.delta_kernel()), want_delta) <= 1e-5
    assert np.abs(want_delta).max() > 1e-3


@pytest.mark.parametrize("init", ["default", "paper"])
def test_factors_train_from_the_first_steps(init):
    # 5 plain SGD steps (a rate at which the loss decreases): A and B move by
    # more than 1e-4 from the default init, by round-off only from the paper's.
    init = SincLoRA().init if init == "default" else init
    layer, adapter, initial, x, y = training_problem(init, seed=1)
    model = keras.Sequential([keras.Input((8,)), adapter])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    np.testing.assert_array_equal(to_numpy(adapter.delta_kernel()), 0.0)
    loss = float(model.evaluate(x, 100.0 * y, verbose=0))
    for _ in range(5):
        model.train_on_batch(x, 100.0 * y)
    assert float(model.evaluate(x, 100.0 * y, verbose=0)) < loss
    moves = [np.abs(to_numpy(v) - start).max() for v, start in zip(adapter.trainable_weights[:2], initial[:2])]
    if init == "paper":
        assert max(moves) < 1e-5
    else:
        assert min(moves) > 1e-4, moves


def test_paper_init_leaves_the_factors_to_round_off():
    # B = 0, a = 0, symmetric grid: dL/da_k = s sum(G) sinc(b g_k) is the same
    # at g_k and -g_k, f stays even, f'(0) = 0: A and B get no gradient in exact
    # arithmetic (float64 oracle: they do not move), only float round-off.
    layer, adapter, initial, x, y = training_problem("paper", seed=1)
    model = keras.Sequential([keras.Input((8,)), adapter])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    for _ in range(2):
        model.train_on_batch(x, y)
    amplitudes = to_numpy(adapter.amplitudes)
    assert np.abs(amplitudes).min() > 0 and len(np.unique(np.round(amplitudes, 6))) > 1
    np.testing.assert_allclose(amplitudes, amplitudes[::-1], rtol=1e-4, atol=1e-8)
    assert np.abs(to_numpy(adapter.lora_b)).max() < 1e-5
    kernel, bias = to_numpy(layer.kernel).astype(np.float64), to_numpy(layer.bias).astype(np.float64)
    _, _, params = np_adam_training("paper", 3, initial, x.astype(np.float64), y, adapter.grid, 2.0, kernel, bias)
    assert np.abs(params[1]).max() < 1e-8  # float64 round-off, amplified by Adam


def test_init_options_keep_delta_zero_and_set_grid_and_b():
    grids = {}
    for init in ("shifted", "random", "paper"):
        layer = keras.layers.Dense(24)
        layer.build((None, 32))
        adapter = SincLoRA(rank=4, init=init, seed=3).wrap(layer)
        np.testing.assert_array_equal(to_numpy(adapter.delta_kernel()), 0.0)
        product = to_numpy(adapter.lora_a) @ to_numpy(adapter.lora_b)
        grids[init] = np.asarray(adapter.grid)
        if init == "random":
            assert 0.5 * 6 / 49 < product.std() < 2 * 6 / 49
        else:
            np.testing.assert_array_equal(product, 0.0)
    np.testing.assert_allclose(grids["shifted"] - grids["paper"], 3.0 / 49, atol=1e-12)
    np.testing.assert_array_equal(grids["random"], grids["paper"])


# --------------------------------------------------------------------------
# Backbone: identity at init, merge, fit, stable ranks, mixed precision
# --------------------------------------------------------------------------
def test_backbone_init_merge_fit_and_stable_ranks():
    backbone = tiny_llama()
    batch = token_batch(vocab=10, batch=4)
    before = backbone.predict_on_batch(batch)
    report = apply_adapters(backbone, SincLoRA(rank=2, grid_size=4))
    adapters = find_adapters(backbone)
    assert len(report) == len(adapters) == 7
    assert report.trainable_params == sum(2 * (a.d_in + a.d_out) + 8 for a in adapters)
    np.testing.assert_allclose(backbone.predict_on_batch(batch), before, atol=1e-6)
    assert set(update_stable_ranks(backbone).values()) == {0.0}
    model = keras.Model(backbone.input, backbone.output)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    target = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")
    losses = model.fit(batch, target, batch_size=4, epochs=3, verbose=0).history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    ranks = update_stable_ranks(backbone)
    for adapter in adapters:
        assert np.abs(to_numpy(adapter.lora_b)).max() > 0
        sigma = np.linalg.svd(to_numpy(adapter.delta_kernel()).astype(np.float64), compute_uv=False)
        assert ranks[adapter.path] == pytest.approx(np.sum(sigma**2) / sigma[0] ** 2, rel=5e-3)
    adapted = backbone.predict_on_batch(batch)
    assert merge_adapters(backbone) == 7 and find_adapters(backbone) == []
    np.testing.assert_allclose(backbone.predict_on_batch(batch), adapted, atol=1e-5 * np.abs(adapted).max())


def test_rank_of_update_exceeds_lora_rank():
    layer, case = layer_case("gemma_query")
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=8)
    rng = np.random.default_rng(3)
    params = [rng.normal(size=v.shape).astype("float32") * 0.5 for v in adapter.trainable_weights]
    set_adapter(adapter, *params)
    delta = to_numpy(adapter.delta_kernel()).astype(np.float64)
    assert relative_error(delta, np_update(*params, adapter.grid, 1.0)[0]) < 1e-6
    assert np.linalg.matrix_rank(delta) > 2 == np.linalg.matrix_rank(params[0] @ params[1])


def test_stable_rank_diagnostic_covers_every_method():
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(7, name="down")(keras.layers.Dense(10, name="up")(inputs))
    model = keras.Model(inputs, outputs)
    apply_adapters(model, LoRA(rank=3), targets=["up"])
    apply_adapters(model, SincLoRA(rank=2, grid_size=4), targets=["down"])
    lora, sinc = find_adapters(model)
    assert (type(lora), type(sinc)) == (LoRAAdapter, SincLoRAAdapter)
    assert update_stable_ranks(model) == {lora.path: 0.0, sinc.path: 0.0}
    rng = np.random.default_rng(1)
    for adapter in (lora, sinc):
        for v in adapter.trainable_weights[:2] if adapter is lora else adapter.trainable_weights:
            v.assign(rng.normal(size=v.shape).astype("float32") * 0.4)
    ranks = update_stable_ranks(model)
    for adapter in (lora, sinc):
        sigma = np.linalg.svd(to_numpy(adapter.delta_kernel()).astype(np.float64), compute_uv=False)
        assert ranks[adapter.path] == pytest.approx(np.sum(sigma**2) / sigma[0] ** 2, rel=5e-3)
    assert update_stable_ranks(sinc) == {sinc.path: ranks[sinc.path]}


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_adapter_float32(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer, case = layer_case("gemma_query")
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=5)
    assert adapter.compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in adapter.weights)
    rng = np.random.default_rng(2)
    params = [rng.normal(size=v.shape).astype("float32") * 0.3 for v in adapter.trainable_weights]
    set_adapter(adapter, *params)
    x = rng.normal(size=case["x_shape"]).astype("float32")
    out = adapter(x)
    assert keras.backend.standardize_dtype(out.dtype) == adapter.compute_dtype
    delta = case["to_kernel"](np_update(*params, adapter.grid, 1.0)[0])
    want = np.einsum(case["equation"], x, case["kernel"] + delta) + case["bias"]
    tol = 0.05 if policy == "mixed_bfloat16" else 0.01
    np.testing.assert_allclose(to_numpy(out).astype("float32"), want, atol=tol * np.abs(want).max())
    model = keras.Sequential([keras.Input(case["x_shape"][1:]), adapter, keras.layers.Flatten()])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    history = model.fit(x, np.zeros((2, 60), "float32"), epochs=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert np.abs(to_numpy(adapter.amplitudes) - params[2]).max() > 0


# --------------------------------------------------------------------------
# Config and validation
# --------------------------------------------------------------------------
def test_config_round_trip():
    method = SincLoRA(rank=3, alpha=6.0, grid_size=11, grid_range=2.5, init="paper", seed=7)
    assert SincLoRA.from_config(method.get_config()) == method
    assert SincLoRA().init == "shifted"
    assert set(method.default_targets["llama"]) >= {"query", "attention_output", "feedforward_gate_dense"}
    adapter = method.wrap(layer_case("gemma_query")[0])
    config = adapter.get_config()
    keys = ("rank", "alpha", "grid_size", "grid_range", "init", "seed")
    assert {k: config[k] for k in keys} == dict(zip(keys, (3, 6.0, 11, 2.5, "paper", 7)))
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(adapter))
    assert type(clone) is SincLoRAAdapter and clone.get_config() == config
    assert clone.grid == adapter.grid and clone.scale == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "`rank` must be a positive integer"),
        ({"alpha": -1.0}, "`alpha` must be a positive number"),
        ({"grid_size": 1}, "`grid_size` must be an integer >= 2, got 1"),
        ({"grid_size": 2.5}, "`grid_size` must be an integer >= 2, got 2.5"),
        ({"grid_range": 0.0}, "`grid_range` must be a finite number > 0, got 0.0"),
        ({"grid_range": float("inf")}, "`grid_range` must be a finite number > 0, got inf"),
        ({"grid_range": True}, "`grid_range` must be a finite number > 0, got True"),
        ({"init": "zeros"}, "`init` must be one of 'shifted', 'random', 'paper', got 'zeros'"),
        ({"seed": -1}, "`seed` must be None or a non-negative integer"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SincLoRA(**kwargs)
    with pytest.raises(ValueError, match=match):
        SincLoRAAdapter(layer_case("gemma_query")[0], **{"rank": 2, **kwargs})


def test_rank_too_large_and_unsupported_equation_raise():
    with pytest.raises(ValueError, match=r"rank=7 is out of range.*\(6, 12\) matrix"):
        SincLoRAAdapter(layer_case("gemma_query")[0], rank=7)
    layer = keras.layers.EinsumDense("abc,cd->ad", output_shape=(4,))
    layer.build((2, 3, 5))
    with pytest.raises(ValueError, match=r"sums over input axes \['b'\]"):
        SincLoRAAdapter(layer, rank=1)
