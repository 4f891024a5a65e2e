"""`keras_adaptive_lora.backend`'s loops, block assembly, per-bin sums and row
lookups on every backend, against numpy.

(`torch_data_parallel` is tested in test_distribution.py.)
"""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import to_numpy
from keras_adaptive_lora import backend
from keras_adaptive_lora.backend import sequential_fori_loop

BACKEND = keras.backend.backend()


def squares_and_rows(start, stop):
    """Carry (sum of i^2, a (stop, 2) matrix with row i set to (i, -i))."""

    def body(i, carry):
        total, rows = carry
        i_float = ops.cast(i, "float32")
        row = ops.reshape(ops.stack([i_float, -i_float]), (1, 2))
        mask = ops.reshape(ops.cast(ops.equal(ops.arange(stop), i), "float32"), (stop, 1))
        return ops.add(total, ops.square(i_float)), ops.add(rows, mask * row)

    return sequential_fori_loop(start, stop, body, (ops.zeros(()), ops.zeros((stop, 2))))


def test_sequential_fori_loop_matches_numpy():
    total, rows = squares_and_rows(2, 6)
    want_rows = np.zeros((6, 2), "float32")
    want_rows[2:, 0] = np.arange(2, 6)
    want_rows[2:, 1] = -np.arange(2, 6)
    assert float(to_numpy(total)) == 4 + 9 + 16 + 25
    np.testing.assert_array_equal(to_numpy(rows), want_rows)


def test_sequential_fori_loop_with_no_iterations_returns_the_carry():
    total, rows = squares_and_rows(3, 3)
    assert float(to_numpy(total)) == 0.0
    np.testing.assert_array_equal(to_numpy(rows), np.zeros((3, 2)))


@pytest.mark.skipif(BACKEND != "tensorflow", reason="parallel_iterations is a tensorflow while-loop attribute")
def test_tensorflow_graph_loop_runs_one_iteration_at_a_time():
    import tensorflow as tf

    graph_fn = tf.function(lambda: squares_and_rows(0, 4))
    concrete = graph_fn.get_concrete_function()
    loops = [op for op in concrete.graph.get_operations() if op.type in ("While", "StatelessWhile")]
    assert len(loops) == 1
    assert loops[0].get_attr("parallel_iterations") == 1
    total, _ = graph_fn()
    assert float(total) == 0 + 1 + 4 + 9


def test_bin_sums_match_numpy():
    # Sums of three weight columns per bin; bins 0 and 6 empty, bin 3 many.
    rng = np.random.default_rng(0)
    index = np.concatenate([rng.integers(1, 6, 40), np.full(25, 3)]).astype("int32")
    columns = [rng.normal(size=index.size).astype("float32") for _ in range(3)]
    got = to_numpy(backend.bin_sums([ops.convert_to_tensor(c) for c in columns], ops.convert_to_tensor(index), 7))
    want = np.zeros((7, 3))
    for c, column in enumerate(columns):
        np.add.at(want[:, c], index, column.astype(np.float64))
    assert got.shape == (7, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_take_columns_and_horner_match_numpy():
    table = np.arange(20, dtype="float32").reshape(4, 5)
    index = np.array([[4, 0, 2], [1, 1, 3]], "int32")
    columns = backend.take_columns(ops.convert_to_tensor(table), ops.convert_to_tensor(index))
    np.testing.assert_array_equal(to_numpy(columns), table[:, index])
    # c0 + t (c1 + t (c2 + t c3)) at each entry, against numpy's polyval (highest degree first).
    t = np.array([[0.0, 0.5, 1.0], [0.25, -2.0, 3.0]], "float32")
    got = to_numpy(backend.horner(columns, ops.convert_to_tensor(t)))
    want = np.polyval(table[::-1, index].astype("float64"), t.astype("float64"))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_blocked_assembles_pieces_with_a_shorter_last_block():
    # 7 positions in blocks of 3 (no divisor of 7 in [2, 3]): 3 + 3 + 1.
    # Output 1: rows, 2 per position, added onto an initial value (which must
    # stay unchanged); output 2: pieces along axis 1; and a sum over the blocks.
    init = np.arange(28, dtype="float32").reshape(14, 2)
    init_tensor = ops.convert_to_tensor(init)
    source = np.random.default_rng(0).normal(size=(3, 7)).astype("float32")
    tensor = ops.convert_to_tensor(source)

    def body(start, length):
        piece = backend.take_block(tensor, 1, start, length)
        rows = ops.reshape(ops.repeat(ops.transpose(piece), 2, axis=0)[:, :2], (2 * length, 2))
        return (rows, ops.multiply(piece, 2.0)), (ops.sum(piece, axis=1),)

    outputs = (backend.BlockOutput((14, 2), 0, unit=2, init=init_tensor), backend.BlockOutput((3, 7), 1))
    (rows, doubled), (total,) = backend.blocked(7, 3, body, outputs, ((3,),))
    np.testing.assert_allclose(to_numpy(rows), init + np.repeat(source.T, 2, axis=0)[:, :2], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(doubled), 2 * source, rtol=1e-6)
    np.testing.assert_allclose(to_numpy(total), source.sum(axis=1), rtol=1e-5)
    np.testing.assert_array_equal(to_numpy(init_tensor), init)


@pytest.mark.skipif(BACKEND == "torch", reason="`jit_compile()` is Keras's 'auto' on torch: eager, as without it")
@pytest.mark.parametrize("method", ["lora", "sr-lora", "flexlora", "sinc"])
def test_jit_compile_trains_every_method_as_the_plain_step_does(method):
    """`backend.jit_compile()` (XLA on tensorflow, also on CPU, where Keras's
    'auto' leaves it off; XLA on jax) gives the numbers of the step compiled
    without it: 6 SGD steps, same losses and weights within float32 noise."""
    import keras_adaptive_lora as kal

    specs = {
        "lora": kal.LoRA(rank=3),
        "sr-lora": kal.StableRankLoRA(max_rank=3, seed=1),
        "flexlora": kal.FlexLoRA(rank=2, max_rank=4, seed=2),
        "sinc": kal.SincLoRA(rank=2, grid_size=8),
    }
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 12)).astype("float32")
    y = rng.integers(0, 4, size=(16,))

    def trained(jit_compile):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((12,))
        hidden = keras.layers.Dense(16, activation="tanh", name="up")(inputs)
        model = keras.Model(inputs, keras.layers.Dense(4, name="down")(hidden))
        model.set_weights([rng_weights.astype("float32") for rng_weights in start])
        kal.apply_adapters(model, specs[method], targets="all-linear")
        for adapter in kal.find_adapters(model):  # a non-zero update from step 0
            for variable in adapter.trainable_weights:
                shape = tuple(variable.shape)
                variable.assign(np.random.default_rng(len(shape)).normal(0, 0.3, shape).astype("float32"))
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        assert model.jit_compile == (jit_compile is not False)  # XLA on, not refused
        before = [to_numpy(w) for w in model.trainable_weights]
        history = model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0)
        after = [to_numpy(w) for w in model.trainable_weights]
        assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 1e-3  # it trained
        return history.history["loss"], after

    start = [np.random.default_rng(i).normal(0, 0.4, s) for i, s in enumerate([(12, 16), (16,), (16, 4), (4,)])]
    jitted_losses, jitted = trained(backend.jit_compile())
    plain_losses, plain = trained(False)
    np.testing.assert_allclose(jitted_losses, plain_losses, rtol=2e-5)
    for a, b in zip(jitted, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_import_tensorflow_names_the_user_and_the_install_when_missing(monkeypatch):
    import sys

    from keras_adaptive_lora.data import pipeline

    monkeypatch.setitem(sys.modules, "tensorflow", None)  # `import tensorflow` raises ImportError
    with pytest.raises(ImportError, match=r"keras_adaptive_lora.data builds tf.data pipelines and needs TensorFlow: pip install 'keras-adaptive-lora\[data\]' tensorflow"):
        pipeline._import_tf()
    with pytest.raises(ImportError, match="needs TensorFlow: pip install x"):
        backend.import_tensorflow("my job", "pip install x")
