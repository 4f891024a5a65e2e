"""The LR-LoRA transfer `f(x) = Σ_k a_k sinc(b_k (x − g_k))`, evaluated in O(1) per entry.

Each step tabulates `f`, `f'`, `f''` on a uniform table over the data's range (a
`(T, K)` computation, `transfer_table`); an entry is a cubic Hermite
interpolation, the value from the `f`, `f'` nodes and the slope `f'` from its
own `f'`, `f''` nodes (differentiating the value's cubic would lose float32
accuracy). The interval width `h` is a power of two with `π · max(b) · h <=
_RESOLUTION`, nodes are integer multiples of `h`, so `t = x/h − floor(x/h)`
is exact. `T` is the smallest of `TABLE_SIZES` covering the data at that `h`
(`keras.ops.switch`); past the largest, `h` grows with the range.
"""

import math

import numpy as np
from keras import ops

from keras_adaptive_lora import backend

#: Table sizes (intervals); the smallest that covers the data is used.
TABLE_SIZES = (16, 64, 256, 1024, 4096)
#: `π · max(b) · h` at most this: interpolation error ~1e-7 of Σ|a_k| (measured).
_RESOLUTION = 0.2
#: Below this |t| the sinc derivatives come from their Taylor series.
_TAYLOR_BELOW = 0.5


def sinc_grid(grid_size, grid_range, shift=0.0):
    """`grid_size` uniformly spaced points on `[-grid_range, grid_range]`, each
    moved by `shift` spacings (0.5: the half-shifted grid of `init="shifted"`)."""
    spacing = 2.0 * grid_range / (grid_size - 1)
    return [float(g) + shift * spacing for g in np.linspace(-grid_range, grid_range, grid_size)]


def sinc_derivatives(t):
    """`sin(t)/t` and its first two derivatives (Taylor series near 0, where the
    closed forms cancel in float32)."""
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


def _power_of_two(x, rounding):
    return ops.power(2.0, rounding(ops.log2(x)))


def transfer_table(low, high, amplitudes, bandwidths, grid):
    """The table of `f` over `[low, high]`, differentiable in `amplitudes` and `bandwidths`.

    Returns:
        `(values, slopes, place)`: two `(TABLE_SIZES[-1], 4)` float32 tables, the
        cubics of `f` and of `f'` per interval (unused rows zero), and `place =
        (first, 1/h)`: interval `i` spans `[(first + i) h, (first + i + 1) h]`.
    """
    grid = ops.convert_to_tensor(np.asarray(grid, "float32"))
    low, high, largest = ops.stop_gradient(low), ops.stop_gradient(high), TABLE_SIZES[-1]
    h = _power_of_two(_RESOLUTION / (math.pi * ops.stop_gradient(ops.max(bandwidths))), ops.floor)
    h = ops.maximum(h, _power_of_two(ops.maximum((high - low) / (largest - 3), 1e-30), ops.ceil))
    first = ops.floor(low / h)
    needed = ops.floor(high / h) - first + 2.0  # a spare interval for round-off
    branch = ops.sum(ops.cast(ops.greater(needed, np.asarray(TABLE_SIZES[:-1], "float32")), "int32"))

    def build(size):
        def table(first, h, amplitudes, bandwidths):
            pi_b = math.pi * bandwidths
            nodes = ops.expand_dims((first + ops.arange(size + 1, dtype="float32")) * h, 1)
            v, v1, v2 = sinc_derivatives((nodes - grid) * pi_b)
            f, f1, f2 = (ops.matmul(d, amplitudes * pi_b**p) for p, d in enumerate((v, v1, v2)))
            return tuple(ops.pad(hermite(y, m, h), ((0, largest - size), (0, 0))) for y, m in ((f, f1), (f1, f2)))

        return table

    values, slopes = ops.switch(branch, [build(s) for s in TABLE_SIZES], first, h, amplitudes, bandwidths)
    return values, slopes, ops.stack([first, 1.0 / h])


def locate(u, place, size):
    """Interval index (int32, clipped to a table of `size` rows) and local coordinate of `u = x / h`."""
    m = ops.floor(u)
    return ops.clip(ops.cast(m - place[0], "int32"), 0, size - 1), u - m


def cubic(table, index, t):
    """The cubics `table (T, 4)` of the intervals `index`, at `t`."""
    c = backend.take_rows(table, index)
    return c[..., 0] + t * (c[..., 1] + t * (c[..., 2] + t * c[..., 3]))


def sinc_transfer(x, amplitudes, bandwidths, grid):
    """The LR-LoRA transfer function `f(x) = Σ_k a_k sinc(b_k (x − g_k))`, elementwise.

    Interpolated from a table over `x`'s range (module docstring): within about
    1e-7 of `Σ|a_k|` of the exact sum. Differentiable in `x` (through the
    interpolated `f'`: `f(x₀) + (x − x₀) f'(x₀)` at `x₀ = x`), `amplitudes`
    and `bandwidths` (through the table) by plain autodiff. `sinc(0) = 1`.

    Args:
        x: a float tensor of any shape.
        amplitudes: `a`, shape `(len(grid),)`.
        bandwidths: `b`, shape `(len(grid),)`.
        grid: the grid points `g`, a sequence of Python floats (see `sinc_grid`).

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
    index, t = locate(fixed * place[1], place, int(values.shape[0]))
    return cubic(values, index, t) + (x - fixed) * ops.stop_gradient(cubic(slopes, index, t))
