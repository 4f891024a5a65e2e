"""The LR-LoRA transfer function `f(x) = Σ_k a_k sinc(b_k (x − g_k))`,
elementwise, memory-safe and differentiable (`sinc_transfer`).

Normalized `sinc(z) = sin(πz) / (πz)`, `sinc(0) = 1`. The sum is accumulated
a few grid points at a time on blocks of `x` (`keras_adaptive_lora.backend.
blocked`), and the backward pass recomputes the terms: no `(K,) + x.shape`
tensor is ever formed.
"""

import math

import numpy as np
from keras import ops

from keras_adaptive_lora import backend

#: Below this |π z| the sinc value and derivative come from their Taylor series
#: (the closed form of the derivative cancels in float32 near 0).
_TAYLOR_BELOW = 0.05
#: softplus(_UNIT_BANDWIDTH) = 1: the initial bandwidth logit.
_UNIT_BANDWIDTH = math.log(math.e - 1.0)


def sinc_grid(grid_size, grid_range):
    """The fixed grid: `grid_size` uniformly spaced points on `[-grid_range, grid_range]`."""
    return [float(g) for g in np.linspace(-grid_range, grid_range, grid_size)]


class Coefficients:
    """The per-grid-point coefficients, padded to whole chunks, `(count, chunk)` each.

    Padding points have amplitude 0 (they add nothing; their gradients are
    dropped). `amplitudes` may carry the update's scale (folded in).
    """

    def __init__(self, grid, amplitudes, bandwidths):
        self.size = len(grid)
        self.chunk = backend.grid_chunk(self.size)
        self.count = -(-self.size // self.chunk)
        self.amplitudes = amplitudes
        pi_b = ops.multiply(bandwidths, math.pi)
        self.grid = self._chunked(ops.convert_to_tensor(np.asarray(grid, "float32")), 0.0)
        self.pi_b = self._chunked(pi_b, math.pi)
        self.amp = self._chunked(amplitudes, 0.0)
        self.slope = self._chunked(ops.multiply(pi_b, amplitudes), 0.0)

    def _chunked(self, values, fill):
        pad = self.chunk * self.count - self.size
        if pad:
            values = ops.concatenate([values, ops.full((pad,), fill, "float32")])
        return ops.reshape(values, (self.count, self.chunk))

    def column(self, coefficients, j):
        """Chunk `j` of `coefficients` as a `(chunk, 1)` column."""
        return ops.reshape(ops.take(coefficients, j, axis=0), (self.chunk, 1))

    def combine(self, coefficients, j, terms):
        """`Σ_k c_k terms_k` over chunk `j`: `(chunk, m)` terms -> `(1, m)`."""
        if self.chunk == 1:
            return ops.multiply(self.column(coefficients, j), terms)
        row = ops.reshape(ops.take(coefficients, j, axis=0), (1, self.chunk))
        return ops.matmul(row, terms)

    def reduce(self, j, terms, upstream):
        """`Σ_i terms_ki upstream_i` per grid point of chunk `j`, placed in
        row `j` of a `(count, chunk)` matrix of zeros.

        `upstream` is `(1, m)`. A matmul when chunk > 1 (XLA then computes
        the terms once, not once per consumer); one grid point: a dot of
        vectors (torch runs a `(1, m) @ (m, 1)` matmul ~10x slower).
        """
        if self.chunk == 1:
            sums = ops.dot(ops.reshape(terms, (-1,)), ops.reshape(upstream, (-1,)))
        else:
            sums = ops.matmul(terms, ops.transpose(upstream))
        here = ops.reshape(ops.cast(ops.equal(ops.arange(self.count), j), "float32"), (self.count, 1))
        return ops.multiply(here, ops.reshape(sums, (1, self.chunk)))

    def sum_shape(self):
        return (self.count, self.chunk)

    def unpad(self, sums):
        return ops.reshape(sums, (-1,))[: self.size]


def transfer_values(p, coef):
    """`f(p)` of a flat float32 vector `p` (the scale folded into `coef`)."""

    def sub_block(start, length):
        pb = ops.reshape(backend.take_block(p, 0, start, length), (1, length))

        def body(j, value):
            t = ops.multiply(ops.subtract(pb, coef.column(coef.grid, j)), coef.column(coef.pi_b, j))
            sin_t, _ = backend.sin_cos(t, with_cos=False)
            # sinc(0) = 1; the 0/0 there is discarded.
            terms = ops.where(ops.equal(t, 0.0), 1.0, ops.divide(sin_t, t))
            return ops.add(value, coef.combine(coef.amp, j, terms))

        value = backend.loop(coef.count, body, ops.zeros_like(pb))
        return (ops.reshape(value, (length,)),), ()

    m = int(p.shape[0])
    (value,), _ = backend.blocked(m, backend.BLOCK_ELEMENTS // coef.chunk, sub_block, (backend.BlockOutput((m,), 0),))
    return value


def transfer_terms(p, upstream, coef, with_value):
    """`f(p)`, `f'(p)` and the gradients of `sum(upstream · f(p))` w.r.t. `a`, `b`.

    With `t = π b_k (p − g_k)`, `v = sinc = sin(t)/t` and `q = dv/dt =
    (cos t − v)/t` (Taylor series for |t| < `_TAYLOR_BELOW`):
    `f' = Σ_k a_k π b_k q`, `df/da_k = v`, `df/db_k = a_k π (p − g_k) q`.

    Args:
        p: flat float32 vector.
        upstream: same shape.
        coef: `Coefficients`.
        with_value: also return `f(p)` (else `None`).

    Returns:
        `(value, slope, grad_amplitudes, grad_bandwidths)`; the last two of
        the unpadded grid size.
    """

    def sub_block(start, length):
        pb = ops.reshape(backend.take_block(p, 0, start, length), (1, length))
        ub = ops.reshape(backend.take_block(upstream, 0, start, length), (1, length))

        def body(j, carry):
            value, slope, grad_a, grad_b = carry
            d = ops.subtract(pb, coef.column(coef.grid, j))
            t = ops.multiply(d, coef.column(coef.pi_b, j))
            sin_t, cos_t = backend.sin_cos(t)
            t2 = ops.square(t)
            small = ops.less(t2, _TAYLOR_BELOW**2)
            inverse = ops.divide(1.0, ops.where(small, 1.0, t))
            # 1 - t^2/6 (+ t^4/120 < 6e-8 below the threshold), and its t-derivative.
            v = ops.where(small, 1.0 - t2 * (1.0 / 6.0), ops.multiply(sin_t, inverse))
            q = ops.where(small, t * (t2 * (1.0 / 30.0) - 1.0 / 3.0), (cos_t - v) * inverse)
            if with_value:
                value = ops.add(value, coef.combine(coef.amp, j, v))
            slope = ops.add(slope, coef.combine(coef.slope, j, q))
            grad_a = ops.add(grad_a, coef.reduce(j, v, ub))
            grad_b = ops.add(grad_b, coef.reduce(j, ops.multiply(d, q), ub))
            return value, slope, grad_a, grad_b

        zeros = ops.zeros(coef.sum_shape(), "float32")
        row = ops.zeros_like(pb)
        value, slope, grad_a, grad_b = backend.loop(
            coef.count, body, (row if with_value else ops.zeros((), "float32"), row, zeros, zeros)
        )
        pieces = (ops.reshape(slope, (length,)),)
        if with_value:
            pieces = (ops.reshape(value, (length,)),) + pieces
        return pieces, (grad_a, grad_b)

    m = int(p.shape[0])
    outputs = (backend.BlockOutput((m,), 0),) * (2 if with_value else 1)
    sums = (coef.sum_shape(),) * 2
    pieces, (grad_a, grad_b) = backend.blocked(m, backend.BLOCK_ELEMENTS // coef.chunk, sub_block, outputs, sums)
    value, slope = pieces if with_value else (None,) + pieces
    grad_b = ops.multiply(coef.unpad(grad_b), ops.multiply(coef.amplitudes, math.pi))
    return value, slope, coef.unpad(grad_a), grad_b


def read(variable):
    """The variable's value as a tensor (read outside a custom gradient: on
    tensorflow a variable read inside one must be declared to it)."""
    return ops.cast(variable, "float32")


def upstream_of(args, upstream):
    # torch passes the upstream gradient as a keyword, tensorflow and jax
    # positionally.
    return args[0] if upstream is None else upstream


def flat(x):
    return ops.reshape(x, (-1,))


def sinc_transfer(x, amplitudes, bandwidths, grid):
    """The LR-LoRA transfer function `f(x) = Σ_k a_k sinc(b_k (x − g_k))`, elementwise.

    Memory-safe and differentiable in `x`, `amplitudes` and `bandwidths`: the
    sum is accumulated a few grid points at a time on blocks of `x`, and the
    backward pass recomputes the terms, so no `(len(grid),) + x.shape`
    tensor is ever formed and nothing but the inputs is kept for the backward
    pass. `sinc(0) = 1`, with finite value and gradient there.

    Args:
        x: a float tensor of any shape.
        amplitudes: `a`, shape `(len(grid),)`.
        bandwidths: `b`, shape `(len(grid),)`.
        grid: the grid points `g`, a sequence of Python floats (see `sinc_grid`).

    Returns:
        `f(x)`, same shape as `x`, float32 (the transfer function is always
        evaluated in float32).

    Example:
    ```python
    import numpy as np
    from keras_adaptive_lora.methods.sinc import sinc_grid, sinc_transfer
    grid = sinc_grid(5, 3.0)
    y = sinc_transfer(np.zeros((2, 3), "float32"), np.ones(5, "float32"),
                      np.ones(5, "float32"), grid)
    ```
    """
    grid = [float(g) for g in grid]

    @ops.custom_gradient
    def transfer(x, amplitudes, bandwidths):
        shape = tuple(x.shape)
        coef = Coefficients(grid, amplitudes, bandwidths)

        def grad(*args, upstream=None):
            upstream = flat(upstream_of(args, upstream))
            _, slope, grad_a, grad_b = transfer_terms(flat(x), upstream, coef, False)
            return ops.reshape(ops.multiply(upstream, slope), shape), grad_a, grad_b

        return ops.reshape(transfer_values(flat(x), coef), shape), grad

    return transfer(*(ops.cast(t, "float32") for t in (x, amplitudes, bandwidths)))


