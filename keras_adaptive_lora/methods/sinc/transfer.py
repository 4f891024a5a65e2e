"""The LR-LoRA transfer `f(x) = Σ_k a_k sinc(b_k (x − g_k))` in O(1) per entry: a
per-step table of cubics over the data's range, interpolated (docs/methods.md,
"Evaluation of f": node spacing, accuracy, gradients).
"""

import math

import numpy as np
from keras import ops

from keras_adaptive_lora import backend

#: Table rows (intervals), filled `CHUNK` at a time.
TABLE_ROWS, CHUNK = 4096, 64
#: `π max(b) h` in (0.05, 0.1]: interpolation error under float32's (docs/methods.md).
_RESOLUTION = 0.1
#: Below this |t| the sinc derivatives come from their Taylor series.
_TAYLOR_BELOW = 0.5


def sinc_grid(grid_size, grid_range, shift=0.0):
    """`grid_size` uniform points on `[-grid_range, grid_range]`, moved by `shift` spacings."""
    spacing = 2.0 * grid_range / (grid_size - 1)
    return [float(g) + shift * spacing for g in np.linspace(-grid_range, grid_range, grid_size)]


def sinc_derivatives(t):
    """`sin(t)/t` and its first two derivatives (Taylor series near 0, where the closed forms cancel)."""
    small = ops.less(ops.abs(t), _TAYLOR_BELOW)
    safe = ops.where(small, 1.0, t)
    inverse = 1.0 / safe
    v = ops.sin(safe) * inverse
    v1 = (ops.cos(safe) - v) * inverse
    s = ops.square(t)
    series = (
        1.0 + s * (-1 / 6 + s * (1 / 120 + s * (-1 / 5040 + s / 362880))),
        t * (-1 / 3 + s * (1 / 30 + s * (-1 / 840 + s / 45360))),
        -1 / 3 + s * (1 / 10 + s * (-1 / 168 + s / 6480)),
    )
    return tuple(ops.where(small, a, b) for a, b in zip(series, (v, v1, -v - 2.0 * v1 * inverse)))


def hermite(y, slope, h):
    """Per interval, the cubic in `t ∈ [0, 1]` through `y` with slopes `slope` at its nodes."""
    y0, y1, m0, m1 = y[:-1], y[1:], h * slope[:-1], h * slope[1:]
    return ops.stack([y0, m0, 3.0 * (y1 - y0) - 2.0 * m0 - m1, 2.0 * (y0 - y1) + m0 + m1], axis=1)


def transfer_table(low, high, amplitudes, bandwidths, grid):
    """`(values, slopes, place)`: the `(4, TABLE_ROWS)` cubics of `f` and of `f'`
    per interval over `[low, high]` (coefficient `p` of interval `i` at `[p, i]`,
    unfilled intervals zero), and `place = (first, 1/h, chunks)`: interval `i`
    spans `[(first + i) h, (first + i + 1) h]`. The node spacing `h` is a power
    of two with `π max(b) h <= _RESOLUTION` (so `x/h − floor(x/h)` is exact),
    grown past `TABLE_ROWS` intervals; `CHUNK` intervals are filled at a time,
    as many as the data needs. Differentiable in `amplitudes` and `bandwidths`
    through `values` only, by a custom gradient that recomputes the `(T, K)`
    terms chunk by chunk instead of keeping them.
    """
    grid = ops.convert_to_tensor(np.asarray(grid, "float32"))
    low, high, b_max = (ops.stop_gradient(v) for v in (low, high, ops.max(bandwidths)))
    h = ops.power(2.0, ops.floor(ops.log2(_RESOLUTION / (math.pi * b_max))))
    h = ops.maximum(h, ops.power(2.0, ops.ceil(ops.log2(ops.maximum((high - low) / (TABLE_ROWS - 3), 1e-30)))))
    first = ops.floor(low / h)
    needed = ops.floor(high / h) - first + 2.0  # a spare interval for round-off
    place = ops.stop_gradient(ops.stack([first, 1.0 / h, ops.minimum(ops.ceil(needed / CHUNK), TABLE_ROWS // CHUNK)]))

    def terms(chunk, bandwidths):
        nodes = place[0] + ops.cast(chunk * CHUNK, "float32") + ops.arange(CHUNK + 1, dtype="float32")
        diff = ops.expand_dims(nodes / place[1], 1) - grid
        return diff, math.pi * bandwidths, sinc_derivatives(diff * (math.pi * bandwidths))

    @ops.custom_gradient
    def tables(amplitudes, bandwidths):
        count = ops.clip(ops.cast(place[2], "int32"), 1, TABLE_ROWS // CHUNK)  # bounded, NaN or not
        out = backend.BlockOutput((TABLE_ROWS, 8), 0)

        def fill(chunk, rows):
            _, pi_b, derivatives = terms(chunk, bandwidths)
            f, f1, f2 = (ops.matmul(d, amplitudes * pi_b**p) for p, d in enumerate(derivatives))
            piece = ops.concatenate([hermite(f, f1, 1.0 / place[1]), hermite(f1, f2, 1.0 / place[1])], axis=1)
            return out.update(rows, chunk * CHUNK, piece)

        def grad(*args, upstream=None):
            g0, g1, g2, g3 = ops.unstack((args[0] if upstream is None else upstream)[:, :4], axis=1)
            # Per interval, through its value cubic: d/dy0, d/dy1, d/df'0, d/df'1.
            per_row = ops.stack([g0 - 3.0 * g2 + 2.0 * g3, 3.0 * g2 - 2.0 * g3, g1 - 2.0 * g2 + g3, g3 - g2], axis=1)

            def accumulate(chunk, total):
                diff, pi_b, (v, v1, v2) = terms(chunk, bandwidths)
                r = backend.take_block(per_row, 0, chunk * CHUNK, CHUNK)
                d_f = ops.pad(r[:, 0], ((0, 1),)) + ops.pad(r[:, 1], ((1, 0),))  # per node
                d_f1 = (ops.pad(r[:, 2], ((0, 1),)) + ops.pad(r[:, 3], ((1, 0),))) / place[1]
                d_a = ops.matmul(d_f, v) + ops.matmul(d_f1, v1) * pi_b
                d_b = ops.matmul(d_f, diff * v1) + ops.matmul(d_f1, v1 + diff * pi_b * v2)
                return total + ops.stack([d_a, amplitudes * math.pi * d_b])

            d_ab = backend.sequential_fori_loop(0, count, accumulate, ops.zeros((2, int(amplitudes.shape[0]))))
            return d_ab[0], d_ab[1]

        return backend.sequential_fori_loop(0, count, fill, out.initial()), grad

    columns = ops.transpose(tables(amplitudes, bandwidths))  # each coefficient contiguous
    return columns[:4], columns[4:], place


def locate(u, place, rows):
    """Interval index (int32, clipped to `rows`) and local coordinate of `u = x / h`."""
    m = ops.floor(u)
    return ops.clip(ops.cast(m - place[0], "int32"), 0, rows - 1), u - m


def cubic(table, index, t):
    """The cubics `table (4, T)` of the intervals `index`, at `t`."""
    return backend.horner(backend.take_columns(table, index), t)


def sinc_transfer(x, amplitudes, bandwidths, grid):
    """The LR-LoRA transfer `f(x) = Σ_k a_k sinc(b_k (x − g_k))` (normalized sinc,
    `sinc(0) = 1`), elementwise, interpolated from a table over `x`'s range:
    float32-accurate (docs/methods.md). Differentiable by plain autodiff: in `x`
    through the interpolated `f'` (`f(x₀) + (x − x₀) f'(x₀)` at `x₀ = x`), in
    `amplitudes` and `bandwidths` through the table.

    Args:
        x: a float tensor of any shape.
        amplitudes, bandwidths: `a`, `b`, shape `(len(grid),)`.
        grid: the grid points `g`, Python floats (`sinc_grid`).

    Returns:
        `f(x)`, float32, the shape of `x`.

    Example:
    ```python
    import numpy as np
    from keras_adaptive_lora.methods.sinc import sinc_grid, sinc_transfer
    y = sinc_transfer(np.zeros((2, 3), "float32"), np.ones(5, "float32"),
                      np.ones(5, "float32"), sinc_grid(5, 3.0))
    ```
    """
    x, amplitudes, bandwidths = (ops.cast(v, "float32") for v in (x, amplitudes, bandwidths))
    fixed = ops.stop_gradient(x)
    values, slopes, place = transfer_table(ops.min(fixed), ops.max(fixed), amplitudes, bandwidths, grid)
    index, t = locate(fixed * place[1], place, int(values.shape[1]))
    return cubic(values, index, t) + (x - fixed) * ops.stop_gradient(cubic(slopes, index, t))
