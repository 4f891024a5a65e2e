"""LR-LoRA, "sinc-transfer" LoRA: a LoRA product passed through a learnable
elementwise nonlinearity, so that the rank of the update is learned.

`ΔW = s · f(A B)` with `f(x) = Σ_k a_k · sinc(b_k (x − g_k))` (normalized
`sinc(z) = sin(πz) / (πz)`, `sinc(0) = 1`), see METHODS.md section 4 and the
LR-LoRA paper, section 3.3.

Memory: the forward pass forms `W + ΔW` once and runs one backbone-shaped
einsum. The whole step "form `ΔW`, add it to `W`, project" is one
`keras.ops.custom_gradient` that keeps nothing kernel-sized for the backward
pass (only the layer input, which every method keeps, and the frozen kernel,
which is resident anyway). Everything elementwise runs on row blocks of the
kernel's matrix view (about `_BLOCK_ELEMENTS` entries): the forward pass
writes each block of `ΔW` into the merged kernel (in place on jax); the
backward pass recomputes, block by block, `A_r B`, `f`, `f'` and `ΔW_r`
from the small adapter parameters and produces `dL/dA_r`, `dL/dB`, the
transfer parameters' gradients and the block's share of `dL/dx`
(`dL/dx = g Wᵀ + Σ_r g ΔW_rᵀ`): no `(grid_size, d_in, d_out)` tensor and no
second kernel-sized buffer exist in the forward or the backward pass.

Speed: the grid points are evaluated in chunks of up to `_GRID_CHUNK` (a
`(chunk, block)` tensor), so that the sums over the grid and over the block
are small matmuls; on jax `sin`/`cos` come from a polynomial that XLA fuses
into the loop (see `_sin_cos`).
"""

import math
import numbers
import string

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.adapters.base import PACKAGE, AdapterLayer, AdapterMethod, check_quantization
from keras_adaptive_lora.backend_shim import sequential_fori_loop
from keras_adaptive_lora.adapters.lora import check_alpha, check_positive_int, check_rank, lora_scale
from keras_adaptive_lora.targets import ALL_ROLES, role_targets

#: Below this |π z| the sinc value and derivative come from their Taylor series
#: (the closed form of the derivative cancels in float32 near 0).
_TAYLOR_BELOW = 0.05
#: softplus(_UNIT_BANDWIDTH) = 1: the initial bandwidth logit.
_UNIT_BANDWIDTH = math.log(math.e - 1.0)
#: Elementwise work on a `(d_in, d_out)` matrix runs on row blocks of about
#: this many entries (1 MiB in float32), and every `(chunk, entries)`
#: temporary of the grid sum has at most this many entries: temporaries are
#: block-sized, not kernel-sized, and stay in cache.
_BLOCK_ELEMENTS = 1 << 18
#: On jax, up to this many grid points are evaluated together (one
#: `(chunk, entries)` tensor; the sums over them are small matmuls, which XLA
#: runs far faster than one fused loop per grid point with full reductions).
#: Eager backends (torch, and tensorflow's executor) gain nothing from it:
#: one grid point at a time on whole blocks there.
_GRID_CHUNK = 10
#: π/2 split in three (Cody-Waite) for the argument reduction of `_sin_cos`:
#: the first two parts have few significant bits, so `n · part` is exact for
#: |n| < 2^15 (|t| < ~51000).
_HALF_PI_PARTS = (1.5703125, 4.837512969970703125e-4, 7.54978995489188216e-8)
#: Minimax polynomials on [-π/4, π/4] (Cephes `sinf`, `cosf`):
#: sin r = r + r^3 (S0 + r^2 (S1 + r^2 S2)),
#: cos r = 1 - r^2/2 + r^4 (C0 + r^2 (C1 + r^2 C2)).
_SIN_COEFFICIENTS = (-1.6666654611e-1, 8.3321608736e-3, -1.9515295891e-4)
_COS_COEFFICIENTS = (4.166664568298827e-2, -1.388731625493765e-3, 2.443315711809948e-5)


# --------------------------------------------------------------------------
# sin and cos
# --------------------------------------------------------------------------
def sin_cos_polynomial(t):
    """`(sin t, cos t)` of a float32 tensor from multiplies, adds and selects.

    Reduces `t = n π/2 + r` with `|r| <= π/4` (three-part π/2, exact for
    `|t| <` about 51000) and evaluates minimax polynomials (Cephes
    `sinf`/`cosf`); absolute error about 1e-7, like float32 `sin`/`cos`.
    """
    n = ops.round(ops.multiply(t, 2.0 / math.pi))
    r = t
    for part in _HALF_PI_PARTS:
        r = ops.subtract(r, ops.multiply(n, part))
    r2 = ops.square(r)
    s0, s1, s2 = _SIN_COEFFICIENTS
    c0, c1, c2 = _COS_COEFFICIENTS
    sin_r = r + r * r2 * (s0 + r2 * (s1 + r2 * s2))
    cos_r = 1.0 - 0.5 * r2 + r2 * r2 * (c0 + r2 * (c1 + r2 * c2))
    # Quadrant n mod 4: sin t = (sin r, cos r, -sin r, -cos r)[n mod 4],
    # cos t = (cos r, -sin r, -cos r, sin r)[n mod 4].
    quadrant = ops.subtract(n, ops.multiply(ops.floor(ops.multiply(n, 0.25)), 4.0))
    odd = ops.logical_or(ops.equal(quadrant, 1.0), ops.equal(quadrant, 3.0))
    sin_t = ops.where(odd, cos_r, sin_r)
    cos_t = ops.where(odd, sin_r, cos_r)
    sin_t = ops.where(ops.greater_equal(quadrant, 2.0), ops.negative(sin_t), sin_t)
    flip_cos = ops.logical_or(ops.equal(quadrant, 1.0), ops.equal(quadrant, 2.0))
    cos_t = ops.where(flip_cos, ops.negative(cos_t), cos_t)
    return sin_t, cos_t


def _sin_cos(t, with_cos=True):
    """`(sin t, cos t)` (`cos t` is `None` unless `with_cos`).

    On jax, `sin_cos_polynomial`: XLA fuses its ~30 multiplies and adds into
    the loop body, while XLA's CPU `sin`/`cos` (jax 0.10) cost about 10x the
    whole polynomial (measured: 9 ns against 0.8 ns per element). Elsewhere
    `ops.sin`/`ops.cos`, one vectorized kernel each (the polynomial would be
    ~30 eager ops).
    """
    if keras.backend.backend() == "jax":
        sin_t, cos_t = sin_cos_polynomial(t)
        return sin_t, (cos_t if with_cos else None)
    return ops.sin(t), (ops.cos(t) if with_cos else None)


# --------------------------------------------------------------------------
# Blocks
# --------------------------------------------------------------------------
def _take(x, axis, start, length):
    """`x[..., start : start + length, ...]` along `axis` (`start` may be traced)."""
    if isinstance(start, int):
        if (start, length) == (0, x.shape[axis]):
            return x
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(start, start + length)
        return x[tuple(index)]
    starts = [0] * len(x.shape)
    starts[axis] = start
    sizes = list(x.shape)
    sizes[axis] = length
    return ops.slice(x, starts, sizes)


class _Output:
    """An output assembled from per-block pieces along `axis`.

    Block `[start, start + length)` covers `[start · unit, (start + length) ·
    unit)` of the axis. `init` (optional) is added: the result is `init +`
    the pieces. `like` (optional) gives the shape when it is not static (a
    layer input with an unknown batch size on tensorflow).

    In a loop (`_blocked` on jax and tensorflow) the output is the loop carry
    and each block is written into it: on jax with `slice_update` (XLA
    updates the carry in place); on tensorflow, whose `slice_update` is an
    XLA-only op, with `scatter_update` of rows, so the carry is kept with
    `axis` first (`initial`, `final`).
    """

    def __init__(self, shape, axis, *, unit=1, init=None, like=None, dtype="float32"):
        self.shape, self.axis, self.unit, self.init, self.like, self.dtype = shape, axis, unit, init, like, dtype
        self.rows_first = keras.backend.backend() == "tensorflow" and axis != 0

    def initial(self):
        if self.init is not None:
            full = self.init
        elif self.like is not None:
            full = ops.zeros_like(self.like)
        else:
            full = ops.zeros(self.shape, self.dtype)
        return ops.moveaxis(full, self.axis, 0) if self.rows_first else full

    def final(self, full):
        return ops.moveaxis(full, 0, self.axis) if self.rows_first else full

    def update(self, full, start, piece):
        """`full` with the piece of the block at `start` written (added) in place."""
        if keras.backend.backend() == "tensorflow":
            if self.rows_first:
                piece = ops.moveaxis(piece, self.axis, 0)
            rows = ops.add(ops.arange(int(piece.shape[0]), dtype="int32"), ops.cast(start * self.unit, "int32"))
            if self.init is not None:
                piece = ops.add(ops.take(full, rows, axis=0), piece)
            return ops.scatter_update(full, ops.reshape(rows, (-1, 1)), piece)
        starts = [0] * len(full.shape)
        starts[self.axis] = start * self.unit
        if self.init is not None:
            piece = ops.add(ops.slice(full, starts, piece.shape), piece)
        return ops.slice_update(full, starts, piece)

    def with_init(self, start, piece):
        """The piece plus the matching block of `init` (eager assembly)."""
        if self.init is None:
            return piece
        return ops.add(_take(self.init, self.axis, start * self.unit, int(piece.shape[self.axis])), piece)


def _even_step(total, step):
    """A divisor of `total` in `[step / 2, step]` if there is one (no shorter
    last block to compile separately), else `step`."""
    return next((d for d in range(step, step // 2, -1) if total % d == 0), step)


def _blocked(total, step, body, outputs=(), sums=()):
    """Run `body(start, length) -> (pieces, partial_sums)` over blocks of `range(total)`.

    Blocks are `[start, start + length)`, `length = step` except for a
    shorter last one. Each piece is written into its output (`_Output`), the
    partial sums are added up (zeros of the shapes in `sums` to start).

    On jax and tensorflow the full-length blocks run in one loop, one block
    at a time (`sequential_fori_loop`), that writes the outputs into the loop
    carry (`_Output.update`), then the shorter last block: the graph holds
    one copy of `body` whatever the number of blocks (tensorflow keeps tens
    of kB per graph node for the life of the function, so unrolling the
    blocks would cost memory proportional to the kernel size). On torch
    (eager) a Python loop collects the pieces and concatenates them once
    (`slice_update` copies the whole tensor there).

    Returns:
        `(outputs, sums)`, two tuples of tensors.
    """
    step = _even_step(total, max(1, min(step, total)))
    count, tail = divmod(total, step)
    if keras.backend.backend() != "torch":

        def run(start, length, carry):
            fulls, totals = carry
            pieces, partials = body(start, length)
            fulls = tuple(o.update(f, start, p) for o, f, p in zip(outputs, fulls, pieces))
            totals = tuple(ops.add(t, p) for t, p in zip(totals, partials))
            return fulls, totals

        carry = (tuple(o.initial() for o in outputs), tuple(ops.zeros(s, "float32") for s in sums))
        if count == 1:
            carry = run(0, step, carry)
        else:
            carry = sequential_fori_loop(0, count, lambda i, c: run(i * step, step, c), carry)
        if tail:
            carry = run(count * step, tail, carry)
        fulls, totals = carry
        return tuple(o.final(f) for o, f in zip(outputs, fulls)), totals
    collected = [[] for _ in outputs]
    totals = [None] * len(sums)
    for start in range(0, total, step):
        pieces, partials = body(start, min(step, total - start))
        for output, pieces_so_far, piece in zip(outputs, collected, pieces):
            pieces_so_far.append(output.with_init(start, piece))
        totals = [p if t is None else ops.add(t, p) for t, p in zip(totals, partials)]
        del pieces, partials
    fulls = []
    for output, pieces in zip(outputs, collected):
        fulls.append(pieces[0] if len(pieces) == 1 else ops.concatenate(pieces, axis=output.axis))
        pieces.clear()
    return tuple(fulls), tuple(totals)


# --------------------------------------------------------------------------
# The transfer function f, a chunk of grid points at a time
# --------------------------------------------------------------------------
def sinc_grid(grid_size, grid_range):
    """The fixed grid: `grid_size` uniformly spaced points on `[-grid_range, grid_range]`."""
    return [float(g) for g in np.linspace(-grid_range, grid_range, grid_size)]


def _grid_chunk(size):
    """Grid points per chunk: up to `_GRID_CHUNK` on jax (evenly split), else 1."""
    if keras.backend.backend() != "jax":
        return 1
    count = -(-size // _GRID_CHUNK)
    return -(-size // count)


class _Coefficients:
    """The per-grid-point coefficients, padded to whole chunks, `(count, chunk)` each.

    Padding points have amplitude 0 (they add nothing; their gradients are
    dropped). `amplitudes` may carry the update's scale (folded in).
    """

    def __init__(self, grid, amplitudes, bandwidths):
        self.size = len(grid)
        self.chunk = _grid_chunk(self.size)
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


def _loop(count, body, carry):
    """`body(j, carry)` for `j` in `range(count)`; no loop at all for one chunk."""
    return body(0, carry) if count == 1 else sequential_fori_loop(0, count, body, carry)


def _transfer_values(p, coef):
    """`f(p)` of a flat float32 vector `p` (the scale folded into `coef`)."""

    def sub_block(start, length):
        pb = ops.reshape(_take(p, 0, start, length), (1, length))

        def body(j, value):
            t = ops.multiply(ops.subtract(pb, coef.column(coef.grid, j)), coef.column(coef.pi_b, j))
            sin_t, _ = _sin_cos(t, with_cos=False)
            # sinc(0) = 1; the 0/0 there is discarded.
            terms = ops.where(ops.equal(t, 0.0), 1.0, ops.divide(sin_t, t))
            return ops.add(value, coef.combine(coef.amp, j, terms))

        value = _loop(coef.count, body, ops.zeros_like(pb))
        return (ops.reshape(value, (length,)),), ()

    m = int(p.shape[0])
    (value,), _ = _blocked(m, _BLOCK_ELEMENTS // coef.chunk, sub_block, (_Output((m,), 0),))
    return value


def _transfer_terms(p, upstream, coef, with_value):
    """`f(p)`, `f'(p)` and the gradients of `sum(upstream · f(p))` w.r.t. `a`, `b`.

    With `t = π b_k (p − g_k)`, `v = sinc = sin(t)/t` and `q = dv/dt =
    (cos t − v)/t` (Taylor series for |t| < `_TAYLOR_BELOW`):
    `f' = Σ_k a_k π b_k q`, `df/da_k = v`, `df/db_k = a_k π (p − g_k) q`.

    Args:
        p: flat float32 vector.
        upstream: same shape.
        coef: `_Coefficients`.
        with_value: also return `f(p)` (else `None`).

    Returns:
        `(value, slope, grad_amplitudes, grad_bandwidths)`; the last two of
        the unpadded grid size.
    """

    def sub_block(start, length):
        pb = ops.reshape(_take(p, 0, start, length), (1, length))
        ub = ops.reshape(_take(upstream, 0, start, length), (1, length))

        def body(j, carry):
            value, slope, grad_a, grad_b = carry
            d = ops.subtract(pb, coef.column(coef.grid, j))
            t = ops.multiply(d, coef.column(coef.pi_b, j))
            sin_t, cos_t = _sin_cos(t)
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
        value, slope, grad_a, grad_b = _loop(
            coef.count, body, (row if with_value else ops.zeros((), "float32"), row, zeros, zeros)
        )
        pieces = (ops.reshape(slope, (length,)),)
        if with_value:
            pieces = (ops.reshape(value, (length,)),) + pieces
        return pieces, (grad_a, grad_b)

    m = int(p.shape[0])
    outputs = (_Output((m,), 0),) * (2 if with_value else 1)
    sums = (coef.sum_shape(),) * 2
    pieces, (grad_a, grad_b) = _blocked(m, _BLOCK_ELEMENTS // coef.chunk, sub_block, outputs, sums)
    value, slope = pieces if with_value else (None,) + pieces
    grad_b = ops.multiply(coef.unpad(grad_b), ops.multiply(coef.amplitudes, math.pi))
    return value, slope, coef.unpad(grad_a), grad_b


def _read(variable):
    """The variable's value as a tensor (read outside a custom gradient: on
    tensorflow a variable read inside one must be declared to it)."""
    return ops.cast(variable, "float32")


def _upstream(args, upstream):
    # torch passes the upstream gradient as a keyword, tensorflow and jax
    # positionally (DESIGN.md).
    return args[0] if upstream is None else upstream


def _flat(x):
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
    from keras_adaptive_lora.adapters.sinc import sinc_grid, sinc_transfer
    grid = sinc_grid(5, 3.0)
    y = sinc_transfer(np.zeros((2, 3), "float32"), np.ones(5, "float32"),
                      np.ones(5, "float32"), grid)
    ```
    """
    grid = [float(g) for g in grid]

    @ops.custom_gradient
    def transfer(x, amplitudes, bandwidths):
        shape = tuple(x.shape)
        coef = _Coefficients(grid, amplitudes, bandwidths)

        def grad(*args, upstream=None):
            upstream = _flat(_upstream(args, upstream))
            _, slope, grad_a, grad_b = _transfer_terms(_flat(x), upstream, coef, False)
            return ops.reshape(ops.multiply(upstream, slope), shape), grad_a, grad_b

        return ops.reshape(_transfer_values(_flat(x), coef), shape), grad

    return transfer(*(ops.cast(t, "float32") for t in (x, amplitudes, bandwidths)))


def _data_dependency(x):
    """A float32 zero computed from `x`'s data (graph backends; see `_merged_projection`)."""
    first = ops.reshape(ops.slice(_flat(x), (0,), (1,)), ())
    return ops.multiply(ops.cast(ops.isnan(first), "float32"), 0.0)


# --------------------------------------------------------------------------
# Projection with a full kernel, and with blocks of it
# --------------------------------------------------------------------------
class _Projection:
    """`y = x K` for a layer's equation, and the products of the backward
    pass with one row block of the kernel's matrix view at a time.

    A block is a slice of the kernel along its first contracted axis
    (`view.in_axes[0]`): `length` indices there are `length · rest`
    consecutive rows of the `(d_in, d_out)` matrix view.
    """

    def __init__(self, view, layer_name):
        self.view = view
        self.axis = view.in_axes[0]
        self.size = view.kernel_shape[self.axis]
        self.rest = view.d_in // self.size
        self.identity = view.perm == tuple(range(len(view.perm)))
        if view.equation is None:
            return
        inputs, self.out = view.equation.replace(" ", "").split("->")
        self.lhs, self.ker = inputs.split(",")
        lost = sorted(set(self.lhs) - set(self.out) - set(self.ker) - {"."})
        if lost:
            raise ValueError(
                f"Layer '{layer_name}': equation '{view.equation}' sums over input "
                f"axes {lost} that are in neither the kernel nor the output; "
                "SincLoRA's merged-weight backward pass does not support such "
                "equations. Exclude this layer from the targets."
            )

    def block_length(self):
        """Indices along the block axis per row block (about `_BLOCK_ELEMENTS` entries)."""
        return max(1, _BLOCK_ELEMENTS // (self.rest * self.view.d_out))

    def _explicit(self, ndim):
        """The equation's specs with any ellipsis spelled out for an input of rank `ndim`."""
        lhs, ker, out = self.lhs, self.ker, self.out
        if "..." in lhs:
            used = set(lhs + ker + out)
            free = [c for c in string.ascii_letters if c not in used]
            fill = "".join(free[: ndim - (len(lhs) - 3)])
            lhs, out = lhs.replace("...", fill), out.replace("...", fill)
        return lhs, ker, out

    def input_axis(self, ndim):
        """The axis of the layer input that the block axis contracts with."""
        if self.view.equation is None:
            return ndim - 1
        lhs, ker, _ = self._explicit(ndim)
        return lhs.index(ker[self.axis])

    def to_kernel(self, rows, length):
        """Matrix-view rows `(length · rest, d_out)` -> the kernel block (layer layout)."""
        view = self.view
        shaped = ops.reshape(rows, (length,) + view.in_dims[1:] + view.out_dims)
        return shaped if self.identity else ops.transpose(shaped, view.inverse_perm)

    def forward(self, x, kernel):
        return self.view.project(x, kernel)

    def grad_input(self, x, kernel, upstream):
        """`d sum(upstream · y) / dx` for a full kernel."""
        if self.view.equation is None:
            if keras.backend.backend() == "jax":
                # Contract in place: XLA folds `transpose(W)` of a constant
                # kernel (one closed over by a jitted function) into a second
                # kernel-sized constant.
                return ops.tensordot(upstream, kernel, axes=([len(upstream.shape) - 1], [1]))
            return ops.matmul(upstream, ops.transpose(kernel))
        lhs, ker, out = self._explicit(len(x.shape))
        return ops.einsum(f"{out},{ker}->{lhs}", upstream, kernel)

    def grad_input_block(self, x, upstream, block):
        """The part of `dL/dx` through a kernel block: `length` entries of the input axis."""
        if self.view.equation is None:
            g2 = ops.reshape(upstream, (-1, self.view.d_out))
            piece = ops.matmul(g2, ops.transpose(block))
            return ops.reshape(piece, tuple(ops.shape(x)[:-1]) + (int(block.shape[0]),))
        lhs, ker, out = self._explicit(len(x.shape))
        return ops.einsum(f"{out},{ker}->{lhs}", upstream, block)

    def grad_kernel_block(self, x, upstream, start, length):
        """Rows of `dL/dK` (matrix view) for the block at `start`: `(length · rest, d_out)`."""
        view = self.view
        if view.equation is None:
            x2 = _take(ops.reshape(x, (-1, view.d_in)), 1, start, length)
            g2 = ops.reshape(upstream, (-1, view.d_out))
            return ops.matmul(ops.transpose(x2), g2)
        lhs, ker, out = self._explicit(len(x.shape))
        block = ops.einsum(f"{lhs},{out}->{ker}", _take(x, lhs.index(ker[self.axis]), start, length), upstream)
        if not self.identity:
            block = ops.transpose(block, view.perm)
        return ops.reshape(block, (length * self.rest, view.d_out))


# --------------------------------------------------------------------------
# The adapter layer
# --------------------------------------------------------------------------
def _check_grid_size(grid_size):
    grid_size = check_positive_int("grid_size", grid_size)
    if grid_size < 2:
        raise ValueError(
            f"`grid_size` must be at least 2 (a uniform grid on [-grid_range, "
            f"grid_range] needs both ends), got {grid_size}."
        )
    return grid_size


def _check_grid_range(grid_range):
    if isinstance(grid_range, bool) or not isinstance(grid_range, numbers.Real) or not (
        math.isfinite(grid_range) and grid_range > 0
    ):
        raise ValueError(f"`grid_range` must be a positive finite number, got {grid_range!r}.")
    return float(grid_range)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SincLoRAAdapter(AdapterLayer):
    """A frozen projection plus the LR-LoRA update `ΔW = s · f(A B)`.

    `A (d_in, r)` is Kaiming-uniform and `B (r, d_out)` zeros, as in LoRA;
    `f(x) = Σ_k a_k sinc(b_k (x − g_k))` is applied elementwise to the
    `(d_in, d_out)` product, with per-layer trainable amplitudes `a` (init 0)
    and bandwidths `b = softplus(β)` (init `b = 1`) on a fixed uniform grid `g`
    of `grid_size` points on `[-grid_range, grid_range]`. `s = alpha / r`.
    At initialization `ΔW = 0`; the amplitudes get a nonzero gradient at the
    first step. `A` and `B` get exactly zero gradient while `A B = 0` (the
    symmetric grid keeps `f` even, so `f'(0) = 0`); they leave 0 through
    float round-off (measured numbers in the README).

    The forward pass uses the merged weight: `y = act(x (W + ΔW) + bias)`,
    one einsum in the layer's own axes. The update is formed in float32 (all
    adapter variables are float32) and the merged kernel is cast to the
    layer's compute dtype for the einsum. The backward pass recomputes
    `A B`, `f` and the merged kernel from the small parameters instead of
    keeping them, and accumulates the grid sums one grid point at a time.

    On a base quantized with Keras's int8 (`model.quantize("int8")`) the
    kernel is never dequantized per step: the base runs its own int8 call and
    the adapter adds `x ΔW`, with `ΔW` formed once per call.

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank: the rank `r` of the factors `A`, `B`.
        alpha: scaling numerator, `s = alpha / r`. Defaults to `rank` (`s = 1`).
        grid_size: number of grid points `K`. Defaults to 50.
        grid_range: the grid spans `[-grid_range, grid_range]`. Defaults to 3.0.
    """

    def __init__(self, layer, *, rank, alpha=None, grid_size=50, grid_range=3.0, **kwargs):
        self.lora_rank = check_positive_int("rank", rank)
        self.alpha = check_alpha(alpha) if alpha is not None else float(self.lora_rank)
        self.grid_size = _check_grid_size(grid_size)
        self.grid_range = _check_grid_range(grid_range)
        self.grid = sinc_grid(self.grid_size, self.grid_range)
        check_rank(layer, self.lora_rank)
        super().__init__(layer, **kwargs)
        self._projection = _Projection(self.view, layer.name)

    @property
    def scale(self):
        return lora_scale(self.alpha, self.lora_rank)

    def _float32_weight(self, name, shape, initializer):
        # autocast=False: read in float32 inside `call` under mixed precision
        # too (the update is formed in float32, then cast once).
        return self.add_weight(
            name=name, shape=shape, initializer=initializer, dtype="float32", autocast=False
        )

    def build_adapter(self):
        self.lora_a = self._float32_weight(
            "lora_a", (self.d_in, self.lora_rank), keras.initializers.HeUniform()
        )
        self.lora_b = self._float32_weight("lora_b", (self.lora_rank, self.d_out), "zeros")
        self.amplitudes = self._float32_weight("amplitudes", (self.grid_size,), "zeros")
        self.bandwidth_logits = self._float32_weight(
            "bandwidth_logits", (self.grid_size,), keras.initializers.Constant(_UNIT_BANDWIDTH)
        )

    def bandwidths(self):
        """`b = softplus(β)`, float32, shape `(grid_size,)`."""
        return ops.softplus(self.bandwidth_logits)

    def delta_kernel(self):
        product = ops.matmul(self.lora_a, self.lora_b)
        return self.scale * sinc_transfer(product, self.amplitudes, self.bandwidths(), self.grid)

    def call(self, inputs, training=None, **kwargs):
        base = self.wrapped
        if check_quantization(base) is not None:
            # Quantized base (Keras int8): never dequantize-and-merge per step.
            # The base runs its own int8 kernel and the update adds
            # `x · ΔW`, with `ΔW = s f(A B)` formed once per call (the
            # memory-safe `sinc_transfer`): `AdapterLayer.call`.
            return super().call(inputs, training=training, **kwargs)
        y = self._merged_projection(
            ops.cast(inputs, self.compute_dtype),
            _read(base.kernel),
            _read(self.lora_a),
            _read(self.lora_b),
            _read(self.amplitudes),
            self.bandwidths(),
        )
        if base.bias is not None:
            y = ops.add(y, ops.cast(base.bias, y.dtype))
        return self.activation(y)

    def _merged_projection(self, inputs, kernel, lora_a, lora_b, amplitudes, bandwidths):
        """`x (W + s f(A B))` as one custom-gradient op that keeps nothing kernel-sized.

        Row blocks of the kernel's matrix view (`_Projection`); the scale `s`
        is folded into the amplitudes. Forward: each block's `A_r B` and `f`
        are block-sized; `ΔW_r` is added into the merged kernel, which on jax
        is the only kernel-sized buffer (written in place over a copy of `W`);
        on tensorflow the loop scatters the blocks into a copy of `W`
        (`_Output.update`); on torch the blocks `W_r + ΔW_r` are concatenated
        once (two kernels for that moment). Backward: per block `G_r = dL/dΔW_r`,
        `A_r B`, `f`, `f'` and `ΔW_r` (all block-sized) give `dL/dA_r`,
        `dL/dB`, the transfer parameters' gradients and the block's share of
        `dL/dx`: on jax `g ΔW_rᵀ`, added in place onto `g Wᵀ` (the frozen
        kernel: no merged one, and no kernel read inside a loop, which XLA
        would copy when the kernel is a compile-time constant); elsewhere
        `g (W_r + ΔW_r)ᵀ`, the pieces written into zeros (tensorflow) or
        concatenated once (torch; adding `g Wᵀ` afterwards would hold a third
        input-sized buffer).
        """
        projection, grid, scale = self._projection, self.grid, self.scale
        compute_dtype = self.compute_dtype
        rows = projection.rest
        shape = (self.view.d_in, self.lora_rank), (self.lora_rank, self.view.d_out)

        @ops.custom_gradient
        def project(x, kernel, lora_a, lora_b, amplitudes, bandwidths):
            coef = _Coefficients(grid, ops.multiply(amplitudes, scale), bandwidths)
            step = projection.block_length()
            in_place = keras.backend.backend() == "jax"

            def product_rows(start, length):
                a_r = _take(lora_a, 0, start * rows, length * rows)
                return a_r, ops.matmul(a_r, lora_b)

            def grad(*args, upstream=None):
                upstream = _upstream(args, upstream)

                def block(start, length):
                    a_r, product = product_rows(start, length)
                    g_r = ops.cast(projection.grad_kernel_block(x, upstream, start, length), "float32")
                    value, slope, grad_a, grad_b = _transfer_terms(_flat(product), _flat(g_r), coef, True)
                    grad_product = ops.multiply(g_r, ops.reshape(slope, product.shape))
                    del g_r, slope
                    delta = projection.to_kernel(ops.reshape(value, product.shape), length)
                    del value
                    if not in_place:
                        delta = ops.add(ops.cast(_take(kernel, projection.axis, start, length), "float32"), delta)
                    grad_x = projection.grad_input_block(x, upstream, ops.cast(delta, compute_dtype))
                    return (
                        (ops.matmul(grad_product, ops.transpose(lora_b)), grad_x),
                        (ops.matmul(ops.transpose(a_r), grad_product), grad_a, grad_b),
                    )

                x_axis = projection.input_axis(len(x.shape))
                if in_place:
                    # dL/dx through the frozen kernel; each block adds g ΔW_rᵀ.
                    base = projection.grad_input(x, ops.cast(kernel, compute_dtype), upstream)
                    grad_x = _Output(tuple(x.shape), x_axis, init=base, dtype=base.dtype)
                else:
                    grad_x = _Output(tuple(x.shape), x_axis, like=x)
                outputs = (_Output(shape[0], 0, unit=rows), grad_x)
                sums = (shape[1], (coef.size,), (coef.size,))
                (grad_a, grad_x), (grad_b, grad_amplitudes, grad_bandwidths) = _blocked(
                    projection.size, step, block, outputs, sums
                )
                grad_amplitudes = ops.multiply(grad_amplitudes, scale)
                return ops.cast(grad_x, x.dtype), None, grad_a, grad_b, grad_amplitudes, grad_bandwidths

            def block(start, length):
                _, product = product_rows(start, length)
                value = _transfer_values(_flat(product), coef)
                return (projection.to_kernel(ops.reshape(value, product.shape), length),), ()

            merged = ops.cast(kernel, "float32")
            if keras.backend.backend() != "torch":
                # XLA's scheduler (jax) and tensorflow's graph executor would
                # otherwise run every layer's merged-kernel loop at the start of
                # the step (they depend on parameters only), keeping all the
                # merged kernels alive at once; a zero computed from x makes
                # this one wait for its input. (The add is fused into the copy
                # of W that the loop writes into anyway on jax.)
                merged = ops.add(merged, _data_dependency(x))
            (merged,), _ = _blocked(
                projection.size, step, block, (_Output(tuple(kernel.shape), projection.axis, init=merged),)
            )
            return projection.forward(x, ops.cast(merged, compute_dtype)), grad

        return project(inputs, kernel, lora_a, lora_b, amplitudes, bandwidths)

    def rank(self):
        return self.lora_rank

    def adapter_config(self):
        return {
            "rank": self.lora_rank,
            "alpha": self.alpha,
            "grid_size": self.grid_size,
            "grid_range": self.grid_range,
        }


class SincLoRA(AdapterMethod):
    """LR-LoRA ("sinc-transfer" LoRA): learnable-rank adapters.

    Each adapted layer gets `ΔW = s · f(A B)` with its own learnable
    elementwise transfer function `f(x) = Σ_k a_k sinc(b_k (x − g_k))` on a
    fixed uniform grid (LR-LoRA paper, section 3.3). The nonlinearity lifts
    LoRA's rank-`r` constraint: the stable rank of `ΔW` is learned per layer
    (see `update_stable_ranks`). Each layer adds `2 · grid_size` parameters to
    LoRA's `r (d_in + d_out)`. Training forwards with the merged weight
    `W + ΔW` and is memory-safe (see `SincLoRAAdapter`); after `merge` the
    model has no overhead at all.

    Args:
        rank: the rank `r` of the factors `A`, `B`. Defaults to 8.
        alpha: scaling numerator, `s = alpha / r` (the paper does not state a
            scaling; we use LoRA's). Defaults to `rank` (`s = 1`).
        grid_size: number of grid points `K`. Defaults to 50.
        grid_range: the grid spans `[-grid_range, grid_range]`. Defaults to 3.0.

    Default targets: all attention (query, key, value, output) and MLP
    projections, as in the paper.

    Example:
    ```python
    import keras, keras_adaptive_lora as kal
    dense = keras.layers.Dense(16); dense.build((None, 32))
    adapter = kal.SincLoRA(rank=4, grid_size=20).wrap(dense)
    merged = adapter.merge()  # a plain Dense again
    ```
    """

    name = "sinc"
    default_targets = role_targets(*ALL_ROLES)

    def __init__(self, *, rank=8, alpha=None, grid_size=50, grid_range=3.0):
        self.rank = check_positive_int("rank", rank)
        self.alpha = check_alpha(alpha)
        self.grid_size = _check_grid_size(grid_size)
        self.grid_range = _check_grid_range(grid_range)

    def wrap(self, layer):
        return SincLoRAAdapter(
            layer,
            rank=self.rank,
            alpha=self.alpha,
            grid_size=self.grid_size,
            grid_range=self.grid_range,
        )

    def get_config(self):
        return {
            "rank": self.rank,
            "alpha": self.alpha,
            "grid_size": self.grid_size,
            "grid_range": self.grid_range,
        }
