"""The LR-LoRA transfer `f(x) = Σ_k a_k sinc(b_k (x − g_k))`, evaluated in O(1) per entry.

Each step tabulates `f`, `f'` and `f''` on a uniform table over the data's range
(a `(T, K)` computation, `transfer_table`) and every entry is a cubic Hermite
interpolation: the value from the `f`, `f'` nodes, the slope `f'` from its own
`f'`, `f''` nodes (`cubic`). The interval width `h` is a power of two with
`π · max(b) · h <= _RESOLUTION` (error about 1e-7 of `Σ|a_k|`); the nodes are
integer multiples of `h`, so the local coordinate `t = x / h − floor(x / h)` is
exact in float32. `T` is the smallest of `TABLE_SIZES` that covers the data at
that `h` (`keras.ops.switch`); beyond the largest, `h` grows with the range.
"""

import math

import numpy as np
from keras import ops

#: Table sizes (intervals); the smallest that covers the data is used.
TABLE_SIZES = (16, 64, 256, 1024, 4096)
#: `π · max(b) · h` at most this: cubic Hermite error ~1e-7 of Σ|a| (measured).
_RESOLUTION = 0.2
#: Below this |t| the sinc derivatives come from their Taylor series.
_TAYLOR_BELOW = 0.5


def sinc_grid(grid_size, grid_range, shift=0.0):
    """`grid_size` uniformly spaced points on `[-grid_range, grid_range]`, each
    moved by `shift` spacings (0.5: the half-shifted grid, see `SincLoRA`)."""
    spacing = 2.0 * grid_range / (grid_size - 1)
    return [float(g) + shift * spacing for g in np.linspace(-grid_range, grid_range, grid_size)]


def sinc_derivatives(t):
    """`v = sin(t)/t` and its first two derivatives in `t` (Taylor series near 0,
    where the closed forms cancel in float32)."""
    small = ops.less(ops.abs(t), _TAYLOR_BELOW)
    safe = ops.where(small, 1.0, t)
    inverse = 1.0 / safe
    v = ops.sin(safe) * inverse
    v1 = (ops.cos(safe) - v) * inverse
    v2 = -v - 2.0 * v1 * inverse
    s = ops.square(t)
    taylor = (
        1.0 + s * (-1 / 6 + s * (1 / 120 + s * (-1 / 5040 + s / 362880))),
        t * (-1 / 3 + s * (1 / 30 + s * (-1 / 840 + s / 45360))),
        -1 / 3 + s * (1 / 10 + s * (-1 / 168 + s / 6480)),
    )
    return tuple(ops.where(small, approx, exact) for approx, exact in zip(taylor, (v, v1, v2)))


def hermite(y, slope, h):
    """Per interval, the cubic in `t ∈ [0, 1]` through `y` with slopes `slope` at the nodes."""
    y0, y1, m0, m1 = y[:-1], y[1:], h * slope[:-1], h * slope[1:]
    return ops.stack([y0, m0, 3.0 * (y1 - y0) - 2.0 * m0 - m1, 2.0 * (y0 - y1) + m0 + m1], axis=1)


def _pow2(x, rounding):
    return ops.power(2.0, rounding(ops.log2(x)))


def transfer_table(low, high, amplitudes, bandwidths, grid):
    """The table of `f` over `[low, high]`, differentiable in `amplitudes`, `bandwidths`.

    Returns:
        `(coefficients, place)`: `(TABLE_SIZES[-1], 8)` float32 rows, the value
        cubic then the slope cubic of each interval (unused rows zero), and
        `place = (first, 1 / h)`: interval `i` spans `[(first + i) h, (first + i + 1) h]`.
    """
    grid = ops.convert_to_tensor(np.asarray(grid, "float32"))
    low, high = ops.stop_gradient(low), ops.stop_gradient(high)
    largest = TABLE_SIZES[-1]
    h = _pow2(_RESOLUTION / (math.pi * ops.stop_gradient(ops.max(bandwidths))), ops.floor)
    h = ops.maximum(h, _pow2(ops.maximum((high - low) / (largest - 3), 1e-30), ops.ceil))
    first = ops.floor(low / h)
    needed = ops.floor(high / h) - first + 2.0  # a spare interval for round-off
    branch = ops.sum(ops.cast(ops.greater(needed, np.asarray(TABLE_SIZES[:-1], "float32")), "int32"))

    def build(size):
        def table(first, h, amplitudes, bandwidths):
            nodes = (first + ops.arange(size + 1, dtype="float32")) * h
            pi_b = math.pi * bandwidths
            v, v1, v2 = sinc_derivatives(ops.expand_dims(nodes, 1) * pi_b - grid * pi_b)
            f, f1, f2 = (ops.matmul(d, c) for d, c in ((v, amplitudes), (v1, amplitudes * pi_b), (v2, amplitudes * pi_b * pi_b)))
            rows = ops.concatenate([hermite(f, f1, h), hermite(f1, f2, h)], axis=1)
            return ops.pad(rows, ((0, largest - size), (0, 0)))

        return table

    coefficients = ops.switch(branch, [build(s) for s in TABLE_SIZES], first, h, amplitudes, bandwidths)
    return coefficients, ops.stack([first, 1.0 / h])


def locate(x, place):
    """Interval index (int32, clipped to the table) and local coordinate `t` of `x`."""
    u = x * place[1]
    m = ops.floor(u)
    index = ops.clip(ops.cast(m - place[0], "int32"), 0, TABLE_SIZES[-1] - 1)
    return index, u - m


def cubic(coefficients, index, t):
    """The cubics `coefficients (T, 4)` of the intervals `index`, at `t`."""
    c = ops.take(coefficients, index, axis=0)
    return c[..., 0] + t * (c[..., 1] + t * (c[..., 2] + t * c[..., 3]))


def sinc_transfer(x, amplitudes, bandwidths, grid):
    """The LR-LoRA transfer function `f(x) = Σ_k a_k sinc(b_k (x − g_k))`, elementwise.

    Evaluated from a table over `x`'s range (see the module docstring): within
    about 1e-7 of `Σ|a_k|` of the exact sum. Differentiable in `x` (through
    the interpolated `f'`, `f(x) + (x − x₀) f'(x₀)` at `x₀ = x`), `amplitudes`
    and `bandwidths` (through the table), by plain autodiff. `sinc(0) = 1`.

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
    grid = sinc_grid(5, 3.0)
    y = sinc_transfer(np.zeros((2, 3), "float32"), np.ones(5, "float32"),
                      np.ones(5, "float32"), grid)
    ```
    """
    x, amplitudes, bandwidths = (ops.cast(v, "float32") for v in (x, amplitudes, bandwidths))
    fixed = ops.stop_gradient(x)
    coefficients, place = transfer_table(ops.min(fixed), ops.max(fixed), amplitudes, bandwidths, grid)
    index, t = locate(fixed, place)
    slope = ops.stop_gradient(cubic(coefficients[:, 4:], index, t))
    return cubic(coefficients[:, :4], index, t) + (x - fixed) * slope
