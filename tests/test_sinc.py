"""SincLoRA (LR-LoRA): the transfer function, the merged-weight adapter and the
stable-rank diagnostic, against numpy oracles, on the backend in KERAS_BACKEND."""

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
from keras_adaptive_lora.backend import sin_cos_polynomial
from keras_adaptive_lora.methods.sinc import sinc_grid, sinc_transfer

BACKEND = keras.backend.backend()
UNIT_LOGIT = math.log(math.e - 1.0)


# --------------------------------------------------------------------------
# numpy oracles (float64)
# --------------------------------------------------------------------------
def np_transfer(x, a, b, grid):
    """f(x) = sum_k a_k sinc(b_k (x - g_k)) with numpy's normalized sinc."""
    x = np.asarray(x, np.float64)
    return sum(a[k] * np.sinc(b[k] * (x - g)) for k, g in enumerate(grid))


def np_softplus(x):
    return np.logaddexp(0.0, x)


def finite_differences(fn, arrays, eps=1e-6):
    """Central differences of the scalar `fn(*arrays)` w.r.t. every array (float64)."""
    arrays = [np.array(a, np.float64) for a in arrays]
    grads = []
    for i, array in enumerate(arrays):
        grad = np.zeros_like(array)
        for idx in np.ndindex(array.shape):
            plus = [a.copy() for a in arrays]
            minus = [a.copy() for a in arrays]
            plus[i][idx] += eps
            minus[i][idx] -= eps
            grad[idx] = (fn(*plus) - fn(*minus)) / (2 * eps)
        grads.append(grad)
    return grads


# --------------------------------------------------------------------------
# Backend autodiff under jit / tf.function (test-only backend code)
# --------------------------------------------------------------------------
def value_and_grads(fn, arrays):
    """`fn(*tensors)` (a scalar) and its gradients w.r.t. all inputs, as numpy.

    Compiled as training would be: `jax.jit` on jax, `tf.function` on
    tensorflow, eager autograd on torch.
    """
    arrays = [np.asarray(a, np.float32) for a in arrays]
    if BACKEND == "jax":
        import jax

        value, grads = jax.jit(jax.value_and_grad(fn, argnums=tuple(range(len(arrays)))))(*arrays)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def run(*tensors):
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                value = fn(*tensors)
            return value, tape.gradient(value, tensors)

        value, grads = run(*[tf.constant(a) for a in arrays])
    else:
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
        value = fn(*tensors)
        grads = torch.autograd.grad(value, tensors)
    return float(to_numpy(value)), [to_numpy(g) for g in grads]


def largest_intermediate(fn, arrays):
    """Element count of the largest tensor created while computing `fn` and
    its gradients w.r.t. all inputs (forward and backward)."""
    arrays = [np.asarray(a, np.float32) for a in arrays]
    if BACKEND == "jax":
        import jax

        jaxpr = jax.make_jaxpr(jax.grad(fn, argnums=tuple(range(len(arrays)))))(*arrays)

        def walk(jaxpr):
            for eqn in jaxpr.eqns:
                for var in eqn.outvars:
                    yield int(np.prod(var.aval.shape))
                for param in eqn.params.values():
                    for sub in param if isinstance(param, (list, tuple)) else [param]:
                        inner = getattr(sub, "jaxpr", None)
                        if inner is not None:
                            yield from walk(getattr(inner, "jaxpr", inner))

        return max(walk(jaxpr.jaxpr))
    if BACKEND == "tensorflow":
        import tensorflow as tf

        @tf.function
        def run(*tensors):
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                value = fn(*tensors)
            return tape.gradient(value, tensors)

        graph = run.get_concrete_function(*[tf.TensorSpec(a.shape, tf.float32) for a in arrays]).graph
        sizes = [
            int(np.prod(out.shape.as_list()))
            for op in graph.get_operations()
            for out in op.outputs
            if out.shape.rank is not None and None not in out.shape.as_list()
        ]
        return max(sizes)
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


# --------------------------------------------------------------------------
# The transfer function f
# --------------------------------------------------------------------------
GRID = sinc_grid(7, 3.0)


def transfer_inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4, 4, size=(5, 6))
    x[0, :4] = GRID[:4]  # exactly on grid points: b (x - g) = 0
    x[1, 0] = 0.0
    x[1, 1] = GRID[2] + 1e-4  # near a grid point: the Taylor branch
    a = rng.normal(size=7)
    b = np_softplus(rng.normal(size=7))
    return x.astype("float32"), a.astype("float32"), b.astype("float32")


def test_grid_is_uniform_on_the_range():
    np.testing.assert_allclose(sinc_grid(50, 3.0), np.linspace(-3, 3, 50))
    assert sinc_grid(3, 2.0) == [-2.0, 0.0, 2.0]


def test_transfer_value_matches_numpy():
    x, a, b = transfer_inputs()
    got = to_numpy(sinc_transfer(x, a, b, GRID))
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, np_transfer(x, a, b, GRID), atol=2e-6, rtol=1e-5)


def test_sinc_of_zero_is_one_with_finite_gradient():
    # One grid point at 0, unit bandwidth and amplitude: f(x) = sinc(x).
    x = np.array([0.0, 1e-30, -1e-7, 1e-3, 0.5, 1.0], "float32")
    one = np.ones((1,), "float32")
    got = to_numpy(sinc_transfer(x, one, one, [0.0]))
    np.testing.assert_allclose(got, np.sinc(x.astype(np.float64)), atol=1e-7)
    assert got[0] == 1.0
    value, (gx, ga, gb) = value_and_grads(
        lambda x, a, b: ops.sum(sinc_transfer(x, a, b, [0.0])), [x, one, one]
    )
    assert np.isfinite(value) and all(np.isfinite(g).all() for g in (gx, ga, gb))
    # d sinc / dx: 0 at 0, -pi^2 x / 3 near 0, -1 at x = 1.
    np.testing.assert_allclose(gx[:4], -(math.pi**2) / 3 * x[:4], atol=1e-6)
    np.testing.assert_allclose(gx[5], -1.0, rtol=1e-5)


@pytest.mark.parametrize("grid_size", [7, 23])
def test_transfer_gradients_match_finite_differences(grid_size):
    # 23 grid points: chunks of 8 with one padding point on jax.
    check_transfer_gradients(grid_size)


def check_transfer_gradients(grid_size):
    grid = sinc_grid(grid_size, 3.0)
    x, _, _ = transfer_inputs(seed=1)
    rng = np.random.default_rng(grid_size)
    a = rng.normal(size=grid_size).astype("float32")
    b = np_softplus(rng.normal(size=grid_size)).astype("float32")
    weights = np.random.default_rng(2).normal(size=x.shape).astype("float32")

    def loss(x, a, b):
        return ops.sum(ops.multiply(sinc_transfer(x, a, b, grid), weights))

    value, grads = value_and_grads(loss, [x, a, b])
    oracle = lambda x, a, b: float(np.sum(np_transfer(x, a, b, grid) * weights))  # noqa: E731
    np.testing.assert_allclose(value, oracle(x, a, b), rtol=1e-5)
    for got, want, name in zip(grads, finite_differences(oracle, [x, a, b]), "xab"):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


def test_transfer_keeps_no_grid_sized_tensor(monkeypatch):
    # 64 grid points on a (12, 10) input: a broadcast implementation would
    # create (64, 12, 10) tensors. Here temporaries are `(chunk, entries)`
    # with at most `_BLOCK_ELEMENTS` (here 40) entries, whatever the grid
    # size: nothing exceeds the input's size.
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", 40)
    grid = sinc_grid(64, 3.0)
    x = np.random.default_rng(0).normal(size=(12, 10))
    a = np.full(64, 0.1)
    b = np.ones(64)
    size = largest_intermediate(lambda x, a, b: ops.sum(sinc_transfer(x, a, b, grid)), [x, a, b])
    assert size == x.size


def test_sin_cos_polynomial_matches_numpy():
    # What the jax path evaluates instead of XLA's (slow) sin/cos; the
    # polynomial itself is plain keras.ops, so it is checked on every backend.
    t = np.concatenate(
        [
            np.linspace(-60, 60, 4001),
            np.arange(-40, 41) * np.pi / 2,  # quadrant boundaries
            [0.0, 1e-30, -1e-30, 1e-7, -3e-4, 2e4, -5e4, 51000.0],
        ]
    ).astype("float32")
    sin_t, cos_t = (to_numpy(v) for v in sin_cos_polynomial(ops.convert_to_tensor(t)))
    exact = t.astype(np.float64)
    np.testing.assert_allclose(sin_t, np.sin(exact), rtol=0, atol=2.5e-7)
    np.testing.assert_allclose(cos_t, np.cos(exact), rtol=0, atol=2.5e-7)
    # Exact where it matters for sinc: sin(t) = t for tiny t, cos(0) = 1.
    assert sin_t[-7] == np.float32(1e-30) and cos_t[t == 0].tolist() == [1.0] * int((t == 0).sum())


def test_blocked_assembles_pieces_with_a_shorter_last_block():
    # 7 positions in blocks of 3 (no divisor of 7 in [2, 3]): 3 + 3 + 1.
    # Output 1: rows, 2 per position, added onto an initial value; output 2:
    # zeros plus pieces along axis 1; and a sum over the blocks.
    init = np.arange(28, dtype="float32").reshape(14, 2)
    source = np.random.default_rng(0).normal(size=(3, 7)).astype("float32")
    tensor = ops.convert_to_tensor(source)

    def body(start, length):
        piece = backend_module.take_block(tensor, 1, start, length)
        rows = ops.reshape(ops.repeat(ops.transpose(piece), 2, axis=0)[:, :2], (2 * length, 2))
        return (rows, ops.multiply(piece, 2.0)), (ops.sum(piece, axis=1),)

    outputs = (
        backend_module.BlockOutput((14, 2), 0, unit=2, init=ops.convert_to_tensor(init)),
        backend_module.BlockOutput((3, 7), 1),
    )
    (rows, doubled), (total,) = backend_module.blocked(7, 3, body, outputs, ((3,),))
    want_rows = init + np.repeat(source.T, 2, axis=0)[:, :2]
    np.testing.assert_allclose(to_numpy(rows), want_rows, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(doubled), 2 * source, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(total), source.sum(axis=1), rtol=1e-5)


# --------------------------------------------------------------------------
# The adapter layer against a numpy oracle
# --------------------------------------------------------------------------
def gemma_query(bias_axes=None):
    """An EinsumDense like Gemma's query: kernel (n, d, h), contracted axis in the middle."""
    layer = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(None, 3, 4), bias_axes=bias_axes)
    layer.build((2, 5, 6))
    return layer


def np_gemma_query(x, kernel, bias, lora_a, lora_b, amplitudes, logits, grid, scale):
    """Oracle forward: ΔW (d, n*h) -> kernel (n, d, h), merged einsum, bias."""
    n, d, h = kernel.shape
    delta = scale * np_transfer(lora_a @ lora_b, amplitudes, np_softplus(logits), grid)
    delta = delta.reshape(d, n, h).transpose(1, 0, 2)
    y = np.einsum("btd,ndh->btnh", x, kernel + delta)
    return y if bias is None else y + bias


def randomize(adapter, seed=0, scale=0.5, variables=None):
    rng = np.random.default_rng(seed)
    for variable in adapter.trainable_weights if variables is None else variables:
        variable.assign(scale * rng.normal(size=variable.shape).astype("float32"))


def test_adapter_forward_and_gradients_match_numpy():
    layer = gemma_query(bias_axes="nh")
    layer.bias.assign(np.random.default_rng(5).normal(size=layer.bias.shape).astype("float32"))
    adapter = SincLoRAAdapter(layer, rank=2, alpha=3.0, grid_size=5, grid_range=2.0)
    randomize(adapter)
    assert [v.name for v in adapter.trainable_weights] == [
        "lora_a",
        "lora_b",
        "amplitudes",
        "bandwidth_logits",
    ]
    kernel, bias = to_numpy(layer.kernel), to_numpy(layer.bias)
    x = np.random.default_rng(3).normal(size=(2, 5, 6)).astype("float32")
    weights = np.random.default_rng(4).normal(size=(2, 5, 3, 4)).astype("float32")
    grid = sinc_grid(5, 2.0)
    trainable = [to_numpy(v) for v in adapter.trainable_weights]
    non_trainable = [v.value for v in adapter.non_trainable_weights]

    def loss(x, *params):
        y, _ = adapter.stateless_call(list(params), non_trainable, x)
        return ops.sum(ops.multiply(y, weights))

    def oracle(x, *params):
        return float(np.sum(np_gemma_query(x, kernel, bias, *params, grid, 1.5) * weights))

    np.testing.assert_allclose(
        to_numpy(adapter(x)), np_gemma_query(x, kernel, bias, *trainable, grid, 1.5), atol=1e-5
    )
    value, grads = value_and_grads(loss, [x] + trainable)
    np.testing.assert_allclose(value, oracle(x, *trainable), rtol=1e-5)
    names = ["x", "lora_a", "lora_b", "amplitudes", "bandwidth_logits"]
    for got, want, name in zip(grads, finite_differences(oracle, [x] + trainable), names):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4, err_msg=name)


def test_dense_adapter_on_3d_input_matches_numpy_gradients():
    layer = keras.layers.Dense(5, use_bias=False)
    layer.build((2, 3, 4))
    adapter = SincLoRAAdapter(layer, rank=1, grid_size=3)
    randomize(adapter, seed=7)
    kernel = to_numpy(layer.kernel)
    grid = sinc_grid(3, 3.0)
    x = np.random.default_rng(8).normal(size=(2, 3, 4)).astype("float32")
    params = [to_numpy(v) for v in adapter.trainable_weights]

    frozen = [v.value for v in adapter.non_trainable_weights]

    def loss(x, *params):
        y, _ = adapter.stateless_call(list(params), frozen, x)
        return ops.sum(ops.square(y))

    def oracle(x, a, b, amp, logits):
        delta = np_transfer(a @ b, amp, np_softplus(logits), grid)
        return float(np.sum(np.square(x @ (kernel + delta))))

    value, grads = value_and_grads(loss, [x] + params)
    np.testing.assert_allclose(value, oracle(x, *params), rtol=1e-5)
    for got, want in zip(grads, finite_differences(oracle, [x] + params)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_attention_output_adapter_matches_numpy_gradients():
    # `btnh,nhd->btd`: d_in = n * h, blocks along n (h rows of the matrix
    # view per index), the input sliced along its third axis.
    layer = keras.layers.EinsumDense("btnh,nhd->btd", output_shape=(None, 5))
    layer.build((2, 3, 4, 2))
    adapter = SincLoRAAdapter(layer, rank=2, alpha=4.0, grid_size=6)
    randomize(adapter, seed=11, scale=0.4)
    kernel = to_numpy(layer.kernel)
    grid = sinc_grid(6, 3.0)
    x = np.random.default_rng(12).normal(size=(2, 3, 4, 2)).astype("float32")
    params = [to_numpy(v) for v in adapter.trainable_weights]
    frozen = [v.value for v in adapter.non_trainable_weights]

    def loss(x, *params):
        y, _ = adapter.stateless_call(list(params), frozen, x)
        return ops.sum(ops.square(y))

    def oracle(x, a, b, amp, logits):
        delta = 2.0 * np_transfer(a @ b, amp, np_softplus(logits), grid)
        return float(np.sum(np.square(np.einsum("btnh,nhd->btd", x, kernel + delta.reshape(4, 2, 5)))))

    value, grads = value_and_grads(loss, [x] + params)
    np.testing.assert_allclose(value, oracle(x, *params), rtol=1e-5)
    for got, want in zip(grads, finite_differences(oracle, [x] + params)):
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)


def test_adapter_step_keeps_no_grid_sized_tensor(monkeypatch):
    # Row blocks of 4 x 10 entries, (chunk, 4) grid temporaries.
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", 40)
    layer = keras.layers.Dense(10, use_bias=False)
    layer.build((None, 12))
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=64)
    randomize(adapter, scale=0.1)
    x = np.random.default_rng(0).normal(size=(3, 12))
    params = [to_numpy(v) for v in adapter.trainable_weights]
    frozen = [v.value for v in adapter.non_trainable_weights]

    def loss(x, *params):
        y, _ = adapter.stateless_call(list(params), frozen, x)
        return ops.sum(ops.square(y))

    size = largest_intermediate(loss, [x] + params)
    # Kernel-sized (12 x 10 = 120) at most; a broadcast version has 64 x 120.
    assert size == 120


def compiled_temp_bytes(adapter_cls, **kwargs):
    """XLA's temporary buffers for one training step of `x -> up -> down`
    (kernels 64x256 and 256x64, both adapted), compiled, not run."""
    import jax

    up = keras.layers.Dense(256, use_bias=False)
    up.build((None, 64))
    down = keras.layers.Dense(64, use_bias=False)
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
    # Blocks of 4096 entries (a kernel has 16384). LoRA's step needs no
    # kernel-sized temporary; SincLoRA's needs one merged kernel at a time
    # (measured: without the data dependency on x, XLA forms both merged
    # kernels first, LoRA + 2.4 kernels).
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", 4096)
    kernel_bytes = 64 * 256 * 4
    lora = compiled_temp_bytes(LoRAAdapter)
    small, large = (compiled_temp_bytes(SincLoRAAdapter, grid_size=k) for k in (20, 100))
    assert large <= small + kernel_bytes // 8
    assert large <= lora + 1.75 * kernel_bytes


# --------------------------------------------------------------------------
# Initialization, first step, rank, merge
# --------------------------------------------------------------------------
def test_init_delta_is_zero_outputs_unchanged_and_merge_matches():
    backbone = tiny_llama()
    batch = token_batch(vocab=10)
    before = backbone.predict_on_batch(batch)
    report = apply_adapters(backbone, SincLoRA(rank=2, grid_size=4))
    adapters = find_adapters(backbone)
    # All attention and MLP projections: q, k, v, o and the three MLP Dense.
    assert len(report) == len(adapters) == 7
    assert sorted(type(a.wrapped).__name__ for a in adapters) == ["Dense"] * 3 + ["EinsumDense"] * 4
    for adapter in adapters:
        assert adapter.scale == 1.0
        np.testing.assert_array_equal(to_numpy(adapter.amplitudes), 0.0)
        np.testing.assert_allclose(to_numpy(adapter.bandwidths()), 1.0, rtol=1e-6)
        np.testing.assert_array_equal(to_numpy(adapter.delta_kernel()), 0.0)
        assert adapter.trainable_parameter_count() == 2 * (adapter.d_in + adapter.d_out) + 8
    np.testing.assert_allclose(backbone.predict_on_batch(batch), before, atol=1e-6)
    # Nonzero parameters: merging every adapter gives the same outputs.
    for i, adapter in enumerate(adapters):
        randomize(adapter, seed=i, scale=0.3)
    adapted = backbone.predict_on_batch(batch)
    assert np.abs(adapted - before).max() > 1e-3
    assert merge_adapters(backbone) == 7
    assert find_adapters(backbone) == []
    merged = backbone.predict_on_batch(batch)
    np.testing.assert_allclose(merged, adapted, atol=1e-5 * np.abs(adapted).max())


def one_step_model(optimizer):
    layer = keras.layers.Dense(6)
    layer.build((None, 8))
    adapter = SincLoRAAdapter(layer, rank=2, alpha=4.0, grid_size=9)
    model = keras.Sequential([keras.Input((8,)), adapter])
    model.compile(optimizer=optimizer, loss="mse")
    return model, adapter


def test_first_step_moves_amplitudes_and_makes_delta_nonzero():
    model, adapter = one_step_model(keras.optimizers.SGD(0.1))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(16, 8)).astype("float32"), rng.normal(size=(16, 6)).astype("float32")
    lora_a = to_numpy(adapter.lora_a)
    model.train_on_batch(x, y)
    amplitudes = to_numpy(adapter.amplitudes)
    # Paper App. E: dL/da_k = sum(G * sinc(-b_k g_k)) is nonzero, and differs
    # across grid points; A, B and b get no gradient while a = 0.
    assert np.all(amplitudes != 0.0)
    assert len(np.unique(np.round(amplitudes, 7))) > 1
    np.testing.assert_array_equal(to_numpy(adapter.lora_b), 0.0)
    np.testing.assert_array_equal(to_numpy(adapter.lora_a), lora_a)
    np.testing.assert_allclose(to_numpy(adapter.bandwidths()), 1.0, rtol=1e-6)
    # A B = 0, so ΔW = s f(0) = s sum_k a_k sinc(-g_k) everywhere.
    f0 = np_transfer(0.0, amplitudes, np.ones(9), sinc_grid(9, 3.0))
    delta = to_numpy(adapter.delta_kernel())
    assert abs(f0) > 1e-4
    np.testing.assert_allclose(delta, np.full((8, 6), 2.0 * f0), rtol=1e-5, atol=1e-7)
    # Paper App. E expects the symmetry to break from the second step. In
    # exact arithmetic it never does: with A B = 0, dL/da_k = s sum(G)
    # sinc(b g_k) is the same for g_k and -g_k (grid symmetric about 0,
    # equal b_k), so f stays even, f'(0) = 0 and dL/dB = A^T (G * f'(A B))
    # = 0. B leaves 0 only through float round-off (README, SincLoRA).
    model.train_on_batch(x, y)
    amplitudes = to_numpy(adapter.amplitudes)
    np.testing.assert_allclose(amplitudes, amplitudes[::-1], rtol=1e-5, atol=1e-9)
    assert np.abs(to_numpy(adapter.lora_b)).max() < 1e-5


def test_first_adam_step_moves_amplitudes():
    model, adapter = one_step_model(keras.optimizers.Adam(1e-2))
    rng = np.random.default_rng(1)
    model.train_on_batch(rng.normal(size=(8, 8)), rng.normal(size=(8, 6)))
    assert np.all(to_numpy(adapter.amplitudes) != 0.0)
    assert np.abs(to_numpy(adapter.delta_kernel())).max() > 0


def test_rank_of_update_exceeds_lora_rank_and_merge_matches():
    layer = gemma_query()
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=8)
    randomize(adapter, seed=3)
    delta = to_numpy(adapter.delta_kernel()).astype(np.float64)
    assert delta.shape == (6, 12)
    params = [to_numpy(v) for v in adapter.trainable_weights]
    oracle = np_transfer(params[0] @ params[1], params[2], np_softplus(params[3]), sinc_grid(8, 3.0))
    np.testing.assert_allclose(delta, oracle, atol=1e-5)
    assert np.linalg.matrix_rank(delta) > 2
    assert np.linalg.matrix_rank(params[0] @ params[1]) == 2
    merged = adapter.merge()
    assert type(merged) is keras.layers.EinsumDense
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    out = to_numpy(adapter(x))
    np.testing.assert_allclose(to_numpy(merged(x)), out, atol=1e-5 * np.abs(out).max())


# --------------------------------------------------------------------------
# Mixed precision
# --------------------------------------------------------------------------
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_transfer_parameters_float32(policy):
    keras.mixed_precision.set_global_policy(policy)
    layer = gemma_query(bias_axes="nh")
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=5)
    assert adapter.compute_dtype == policy.split("_")[1]
    assert all(v.dtype == "float32" for v in adapter.weights)
    randomize(adapter, seed=2, scale=0.3)
    x = np.random.default_rng(0).normal(size=(2, 5, 6)).astype("float32")
    out = adapter(x)
    assert keras.backend.standardize_dtype(out.dtype) == adapter.compute_dtype
    params = [to_numpy(v) for v in adapter.trainable_weights]
    want = np_gemma_query(x, to_numpy(layer.kernel), to_numpy(layer.bias), *params, sinc_grid(5, 3.0), 1.0)
    tol = 0.05 if policy == "mixed_bfloat16" else 0.01
    np.testing.assert_allclose(to_numpy(out).astype("float32"), want, atol=tol * np.abs(want).max())
    model = keras.Sequential([keras.Input((5, 6)), adapter, keras.layers.Flatten()])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    amplitudes = to_numpy(adapter.amplitudes)
    # mixed_float16 skips steps while the dynamic loss scale adapts.
    history = model.fit(x, np.zeros((2, 60), "float32"), epochs=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert all(v.dtype == "float32" for v in adapter.trainable_weights)
    assert np.abs(to_numpy(adapter.amplitudes) - amplitudes).max() > 0


# --------------------------------------------------------------------------
# Training through apply_adapters, diagnostics
# --------------------------------------------------------------------------
def test_fit_on_tiny_backbone_and_stable_rank_diagnostic():
    backbone = tiny_llama()
    batch = token_batch(vocab=10, batch=4)
    report = apply_adapters(backbone, SincLoRA(rank=2, grid_size=4))
    adapters = find_adapters(backbone)
    assert len(report) == 7
    assert report.trainable_params == sum(2 * (a.d_in + a.d_out) + 8 for a in adapters)
    ranks = update_stable_ranks(backbone)
    assert list(ranks) == [a.path for a in adapters]
    assert set(ranks.values()) == {0.0}  # ΔW = 0 at initialization
    model = keras.Model(backbone.input, backbone.output)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    target = np.random.default_rng(0).normal(size=(4, 6, 8)).astype("float32")
    history = model.fit(batch, target, batch_size=4, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    ranks = update_stable_ranks(backbone)
    for adapter in adapters:
        assert np.abs(to_numpy(adapter.amplitudes)).max() > 0
        delta = to_numpy(adapter.delta_kernel()).astype(np.float64)
        sigma = np.linalg.svd(delta, compute_uv=False)
        srank = np.sum(sigma**2) / sigma[0] ** 2
        assert ranks[adapter.path] == pytest.approx(srank, rel=5e-3)


def test_stable_rank_diagnostic_covers_every_method():
    inputs = keras.Input((6,))
    outputs = keras.layers.Dense(7, name="down")(keras.layers.Dense(10, name="up")(inputs))
    model = keras.Model(inputs, outputs)
    apply_adapters(model, LoRA(rank=3), targets=["up"])
    apply_adapters(model, SincLoRA(rank=2, grid_size=4), targets=["down"])
    lora, sinc = find_adapters(model)
    assert (type(lora), type(sinc)) == (LoRAAdapter, SincLoRAAdapter)
    assert update_stable_ranks(model) == {lora.path: 0.0, sinc.path: 0.0}
    # The second apply_adapters froze the first adapter: set its factors directly.
    randomize(lora, seed=1, variables=[lora.lora_a, lora.lora_b])
    randomize(sinc, seed=2)
    ranks = update_stable_ranks(model)
    assert list(ranks) == [lora.path, sinc.path]
    for adapter in (lora, sinc):
        sigma = np.linalg.svd(to_numpy(adapter.delta_kernel()).astype(np.float64), compute_uv=False)
        assert ranks[adapter.path] == pytest.approx(np.sum(sigma**2) / sigma[0] ** 2, rel=5e-3)
    assert 1.0 <= ranks[lora.path] <= 3.0 + 1e-6
    assert update_stable_ranks(sinc) == {sinc.path: ranks[sinc.path]}


# --------------------------------------------------------------------------
# Config and validation
# --------------------------------------------------------------------------
def test_config_round_trip():
    method = SincLoRA(rank=3, alpha=6.0, grid_size=11, grid_range=2.5)
    assert SincLoRA.from_config(method.get_config()) == method
    assert method.name == "sinc"
    assert set(method.default_targets["llama"]) >= {"query", "attention_output", "feedforward_gate_dense"}
    adapter = method.wrap(gemma_query(bias_axes="nh"))
    randomize(adapter)
    config = adapter.get_config()
    assert {k: config[k] for k in ("rank", "alpha", "grid_size", "grid_range")} == {
        "rank": 3,
        "alpha": 6.0,
        "grid_size": 11,
        "grid_range": 2.5,
    }
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(adapter))
    assert type(clone) is SincLoRAAdapter
    assert clone.get_config() == config
    assert clone.grid == adapter.grid and clone.scale == 2.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rank": 0}, "`rank` must be a positive integer"),
        ({"alpha": -1.0}, "`alpha` must be a positive number"),
        ({"grid_size": 1}, "`grid_size` must be at least 2"),
        ({"grid_size": 2.5}, "`grid_size` must be a positive integer"),
        ({"grid_range": 0.0}, "`grid_range` must be a positive finite number"),
        ({"grid_range": float("inf")}, "`grid_range` must be a positive finite number"),
        ({"grid_range": True}, "`grid_range` must be a positive finite number"),
    ],
)
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SincLoRA(**kwargs)
    with pytest.raises(ValueError, match=match):
        SincLoRAAdapter(gemma_query(), **{"rank": 2, **kwargs})


def test_rank_too_large_and_unsupported_equation_raise():
    with pytest.raises(ValueError, match=r"rank=7 is out of range.*\(6, 12\) matrix"):
        SincLoRAAdapter(gemma_query(), rank=7)
    layer = keras.layers.EinsumDense("abc,cd->ad", output_shape=(4,))
    layer.build((2, 3, 5))
    with pytest.raises(ValueError, match=r"sums over input axes \['b'\]"):
        SincLoRAAdapter(layer, rank=1)


@pytest.mark.parametrize("block_elements", [7, 24])
def test_row_blocks_give_the_same_values_and_gradients(monkeypatch, block_elements):
    # The elementwise work runs on row blocks of about `_BLOCK_ELEMENTS`
    # entries, and the grid sums on `(chunk, entries)` temporaries of at most
    # as many entries; the tests above use one block. Here: one row (or one
    # head) per block and single-entry temporaries, then a few of each.
    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", block_elements)
    test_transfer_value_matches_numpy()
    check_transfer_gradients(7)
    check_transfer_gradients(23)
    test_adapter_forward_and_gradients_match_numpy()
    test_dense_adapter_on_3d_input_matches_numpy_gradients()
    test_attention_output_adapter_matches_numpy_gradients()


def tensorflow_step_graph_nodes(block_elements, monkeypatch):
    """Nodes (with nested function bodies) of a traced loss-and-gradient step."""
    import tensorflow as tf

    monkeypatch.setattr(backend_module, "BLOCK_ELEMENTS", block_elements)
    layer = keras.layers.Dense(64)
    layer.build((None, 32))
    adapter = SincLoRAAdapter(layer, rank=2, grid_size=6)
    randomize(adapter)
    x = tf.constant(np.ones((3, 32), "float32"))

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            loss = ops.sum(ops.square(adapter(x)))
        return tape.gradient(loss, adapter.trainable_variables)

    graph = step.get_concrete_function(x).graph.as_graph_def()
    return len(graph.node) + sum(len(f.node_def) for f in graph.library.function)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tensorflow keeps memory per graph node; jax loops are compiled")
def test_tensorflow_graph_does_not_grow_with_the_number_of_blocks(monkeypatch):
    # 32 x 64 kernel: blocks of 2 rows (16 blocks) vs 8 rows (4 blocks). The
    # blocks must run in one while loop, not one unrolled copy of the work
    # per block (tensorflow holds tens of kB per graph node, so unrolling
    # costs memory in proportion to the kernel size).
    few, many = (tensorflow_step_graph_nodes(n, monkeypatch) for n in (8 * 64, 2 * 64))
    assert many == few
