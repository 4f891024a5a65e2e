"""`keras_adaptive_lora.backend.sequential_fori_loop` on every backend.

(`torch_data_parallel` is tested in test_distribution.py.)
"""

import keras
import numpy as np
import pytest
from keras import ops

from conftest import to_numpy
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
