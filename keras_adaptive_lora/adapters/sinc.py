"""LR-LoRA, "sinc-transfer" LoRA: a LoRA product passed through a learnable
elementwise nonlinearity, so that the rank of the update is learned.

`ΔW = s · f(A B)` with `f(x) = Σ_k a_k · sinc(b_k (x − g_k))` (normalized
`sinc(z) = sin(πz) / (πz)`, `sinc(0) = 1`), see METHODS.md section 4 and the
LR-LoRA paper, section 3.3.

Memory: the forward pass forms `W + ΔW` once and runs one backbone-shaped
einsum. The whole step "form `ΔW`, add it to `W`, project" is one
`keras.ops.custom_gradient` whose backward pass recomputes what it needs from
the small adapter parameters. `f` and its derivatives are accumulated with a
`keras.ops.fori_loop` over the grid points, one `(d_in, d_out)` term at a time: no
`(grid_size, d_in, d_out)` tensor exists in the forward or the backward pass,
and nothing kernel-sized is kept between them (only the layer input, which
every method keeps, and the frozen kernel, which is resident anyway).
"""

import math
import numbers
import string

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.adapters.base import PACKAGE, AdapterLayer, AdapterMethod
from keras_adaptive_lora.adapters.lora import check_alpha, check_positive_int, check_rank, lora_scale
from keras_adaptive_lora.targets import ALL_ROLES, role_targets

#: Below this |π z| the sinc value and derivative come from their Taylor series
#: (the closed form of the derivative cancels in float32 near 0).
_TAYLOR_BELOW = 0.05
#: softplus(_UNIT_BANDWIDTH) = 1: the initial bandwidth logit.
_UNIT_BANDWIDTH = math.log(math.e - 1.0)
#: Elementwise work on a `(d_in, d_out)` matrix runs on row blocks of about
#: this many entries (1 MiB in float32): the per-grid-point temporaries are
#: block-sized, not kernel-sized, and stay in cache.
_BLOCK_ELEMENTS = 1 << 18


# --------------------------------------------------------------------------
# The transfer function f, one grid point at a time
# --------------------------------------------------------------------------
def sinc_grid(grid_size, grid_range):
    """The fixed grid: `grid_size` uniformly spaced points on `[-grid_range, grid_range]`."""
    return [float(g) for g in np.linspace(-grid_range, grid_range, grid_size)]


def _grid_tensor(grid):
    return ops.convert_to_tensor(np.asarray(grid, dtype="float32"))


def _row_blocks(rows, cols):
    """`(start, stop)` row ranges of about `_BLOCK_ELEMENTS` entries each."""
    step = max(1, min(rows, _BLOCK_ELEMENTS // max(1, cols)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _even_block_rows(rows, cols):
    """The largest divisor of `rows` giving blocks of at most `_BLOCK_ELEMENTS` entries."""
    target = max(1, min(rows, _BLOCK_ELEMENTS // max(1, cols)))
    return next(step for step in range(target, 0, -1) if rows % step == 0)


def _rows(x, start, length):
    """Rows `start : start + length` of a 2-D tensor (`start` may be traced)."""
    if isinstance(start, int) and (start, length) == (0, int(x.shape[0])):
        return x
    return ops.slice(x, (start, 0), (length, int(x.shape[1])))


def _over_row_blocks(rows, cols, body, row_widths, sum_shapes, before_stack=None, row_init=None):
    """Run `body(start, length) -> (row_outputs, sum_outputs)` over row blocks.

    Row outputs (`(length, width)` each) are stacked back to `(rows, width)`;
    sum outputs are added up. On jax the blocks run in a `fori_loop` writing
    into preallocated outputs, so XLA executes them one after the other (an
    unrolled loop lets its CPU runtime run independent blocks concurrently,
    each with its own buffers); elsewhere a Python loop and one concatenation
    (`slice_update` copies on torch), after calling `before_stack` (to drop
    what only the blocks needed before the stacked outputs are allocated).
    `row_init`: the loop's initial full-size row outputs on jax (default
    zeros; every row is overwritten, so only its buffer matters).
    """
    if keras.backend.backend() == "jax":
        step = _even_block_rows(rows, cols)
        if rows // step > 1:

            def loop_body(i, carry):
                row_acc, sum_acc = carry
                start = i * step
                row_out, sum_out = body(start, step)
                row_acc = tuple(ops.slice_update(acc, (start, 0), o) for acc, o in zip(row_acc, row_out))
                sum_acc = tuple(ops.add(acc, o) for acc, o in zip(sum_acc, sum_out))
                return row_acc, sum_acc

            init = (
                tuple(ops.zeros((rows, w), "float32") for w in row_widths)
                if row_init is None
                else tuple(row_init),
                tuple(ops.zeros(s, "float32") for s in sum_shapes),
            )
            return ops.fori_loop(0, rows // step, loop_body, init)
    row_lists = [[] for _ in row_widths]
    sums = [None] * len(sum_shapes)
    for start, stop in _row_blocks(rows, cols):
        row_out, sum_out = body(start, stop - start)
        for out, o in zip(row_lists, row_out):
            out.append(o)
        sums = [o if acc is None else ops.add(acc, o) for acc, o in zip(sums, sum_out)]
        del row_out, sum_out
    if before_stack is not None:
        before_stack()
    stacked = []
    for out in row_lists:
        stacked.append(out[0] if len(out) == 1 else ops.concatenate(out, axis=0))
        out.clear()
    return tuple(stacked), tuple(sums)


def _sinc_value(t):
    """`sin(t) / t`, exactly 1 at `t = 0` (the 0/0 there is discarded)."""
    return ops.where(ops.equal(t, 0.0), 1.0, ops.divide(ops.sin(t), t))


def _transfer_value(x, amplitudes, bandwidths, grid):
    """`f(x) = Σ_k a_k sinc(b_k (x − g_k))`, accumulated over the grid points.

    `x` is 2-D; the sum runs on row blocks (see `_BLOCK_ELEMENTS`), so every
    per-grid-point temporary is block-sized; only the result is x-sized.
    `ops.fori_loop`, not a Python loop over grid points: an unrolled loop lets
    XLA schedule all grid points' terms at once; a loop keeps one iteration's
    buffers at a time. Per grid point: 8 block-sized ops.
    """
    grid = _grid_tensor(grid)
    size = int(grid.shape[0])
    pi_b = math.pi * bandwidths

    def block_value(xb):
        def body(k, out):
            t = ops.multiply(ops.subtract(xb, ops.take(grid, k)), ops.take(pi_b, k))
            return ops.add(out, ops.multiply(ops.take(amplitudes, k), _sinc_value(t)))

        return ops.fori_loop(0, size, body, ops.zeros_like(xb))

    rows, cols = int(x.shape[0]), int(x.shape[1])
    (value,), _ = _over_row_blocks(
        rows, cols, lambda s, n: ((block_value(_rows(x, s, n)),), ()), (cols,), ()
    )
    return value


def _block_vjp(xb, upstream, amplitudes, bandwidths, grid, with_value):
    """One row block: `(f(x), df/dx, Σ upstream·df/da, Σ upstream·df/db)`.

    With `t = π b_k (x − g_k)`, `v = sinc = sin(t)/t` and `q = dv/dt =
    (cos t − v)/t` (Taylor series for |t| < `_TAYLOR_BELOW`):
    `df/dx = Σ_k a_k π b_k q`, `df/da_k = v`, `df/db_k = a_k π (x − g_k) q`.
    `f(x)` is accumulated too when `with_value` (else `None`).
    """
    size = int(grid.shape[0])
    positions = ops.arange(size)
    slope_coef = (math.pi * amplitudes) * bandwidths
    band_coef = math.pi * amplitudes
    pi_b = math.pi * bandwidths

    def body(k, carry):
        # Temporaries are dropped as soon as used (torch eager frees on the
        # last reference): about five block-sized buffers live at a time.
        value_sum, slope_sum, grad_a, grad_b = carry
        d = ops.subtract(xb, ops.take(grid, k))
        t = ops.multiply(d, ops.take(pi_b, k))
        small = ops.less(ops.abs(t), _TAYLOR_BELOW)
        t2 = ops.square(t)
        # 1 - t^2/6 (+ t^4/120 < 6e-8 below the threshold), and its t-derivative.
        value = ops.where(small, ops.subtract(1.0, ops.multiply(t2, 1.0 / 6.0)), ops.divide(ops.sin(t), t))
        series = ops.multiply(t, ops.subtract(ops.multiply(t2, 1.0 / 30.0), 1.0 / 3.0))
        del t2
        closed = ops.divide(ops.subtract(ops.cos(t), value), t)
        del t
        slope = ops.where(small, series, closed)
        del small, series, closed
        here = ops.cast(ops.equal(positions, k), xb.dtype)
        grad_a = ops.add(grad_a, here * ops.sum(ops.multiply(upstream, value)))
        if with_value:
            value_sum = ops.add(value_sum, ops.multiply(value, ops.take(amplitudes, k)))
        del value
        grad_b = ops.add(
            grad_b,
            here * (ops.take(band_coef, k) * ops.sum(ops.multiply(ops.multiply(upstream, d), slope))),
        )
        del d
        slope_sum = ops.add(slope_sum, ops.multiply(slope, ops.take(slope_coef, k)))
        return value_sum, slope_sum, grad_a, grad_b

    zeros = ops.zeros((size,), xb.dtype)
    value0 = ops.zeros_like(xb) if with_value else ops.zeros((), xb.dtype)
    value_sum, slope_sum, grad_a, grad_b = ops.fori_loop(
        0, size, body, (value0, ops.zeros_like(xb), zeros, zeros)
    )
    return (value_sum if with_value else None), slope_sum, grad_a, grad_b


def _transfer_vjp(x, amplitudes, bandwidths, grid, upstream):
    """Gradients of `sum(upstream * f(x))` w.r.t. `x`, `amplitudes`, `bandwidths`.

    One grid point at a time, on row blocks: a few block-sized buffers, whatever
    the grid size; only the result `upstream · df/dx` is x-sized.
    """
    grid = _grid_tensor(grid)
    rows, cols = int(x.shape[0]), int(x.shape[1])
    size = int(grid.shape[0])

    def body(start, length):
        up = _rows(upstream, start, length)
        _, slope, ga, gb = _block_vjp(_rows(x, start, length), up, amplitudes, bandwidths, grid, False)
        return (ops.multiply(up, slope),), (ga, gb)

    (grad_x,), (grad_a, grad_b) = _over_row_blocks(rows, cols, body, (cols,), ((size,), (size,)))
    return grad_x, grad_a, grad_b


def _read(variable):
    """The variable's value as a tensor (read outside a custom gradient: on
    tensorflow a variable read inside one must be declared to it)."""
    return ops.cast(variable, "float32")


def _upstream(args, upstream):
    # torch passes the upstream gradient as a keyword, tensorflow and jax
    # positionally (DESIGN.md).
    return args[0] if upstream is None else upstream


def sinc_transfer(x, amplitudes, bandwidths, grid):
    """The LR-LoRA transfer function `f(x) = Σ_k a_k sinc(b_k (x − g_k))`, elementwise.

    Memory-safe and differentiable in `x`, `amplitudes` and `bandwidths`: the
    sum is accumulated one grid point at a time and the backward pass
    recomputes the per-grid-point terms, so no `(len(grid),) + x.shape` tensor
    is ever formed and nothing but the inputs is kept for the backward pass.
    `sinc(0) = 1`, with finite value and gradient there.

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
        # Row blocks of a 2-D view of x (a view, not a copy, for contiguous x).
        shape = tuple(x.shape)
        x2 = ops.reshape(x, (-1, shape[-1]) if shape else (1, 1))

        def grad(*args, upstream=None):
            upstream = ops.reshape(_upstream(args, upstream), x2.shape)
            grad_x, grad_a, grad_b = _transfer_vjp(x2, amplitudes, bandwidths, grid, upstream)
            return ops.reshape(grad_x, shape), grad_a, grad_b

        return ops.reshape(_transfer_value(x2, amplitudes, bandwidths, grid), shape), grad

    return transfer(*(ops.cast(t, "float32") for t in (x, amplitudes, bandwidths)))


# --------------------------------------------------------------------------
# Projection with a full kernel, and its two vector-Jacobian products
# --------------------------------------------------------------------------
class _Projection:
    """`y = x K` for a layer's equation, with the products the backward needs."""

    def __init__(self, view, layer_name):
        self.view = view
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

    def _explicit(self, ndim):
        """The equation's specs with any ellipsis spelled out for an input of rank `ndim`."""
        lhs, ker, out = self.lhs, self.ker, self.out
        if "..." in lhs:
            used = set(lhs + ker + out)
            free = [c for c in string.ascii_letters if c not in used]
            fill = "".join(free[: ndim - (len(lhs) - 3)])
            lhs, out = lhs.replace("...", fill), out.replace("...", fill)
        return lhs, ker, out

    def forward(self, x, kernel):
        return self.view.project(x, kernel)

    def grad_input(self, x, kernel, upstream):
        if self.view.equation is None:
            return ops.matmul(upstream, ops.transpose(kernel))
        lhs, ker, out = self._explicit(len(x.shape))
        return ops.einsum(f"{out},{ker}->{lhs}", upstream, kernel)

    def grad_kernel_matrix(self, x, upstream):
        """`d sum(upstream * y) / d K` as a `(d_in, d_out)` matrix."""
        view = self.view
        if view.equation is None:
            x2 = ops.reshape(x, (-1, view.d_in))
            g2 = ops.reshape(upstream, (-1, view.d_out))
            return ops.matmul(ops.transpose(x2), g2)
        lhs, ker, out = self._explicit(len(x.shape))
        return view.to_matrix(ops.einsum(f"{lhs},{out}->{ker}", x, upstream))


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
    first step.

    The forward pass uses the merged weight: `y = act(x (W + ΔW) + bias)`,
    one einsum in the layer's own axes. The update is formed in float32 (all
    adapter variables are float32) and the merged kernel is cast to the
    layer's compute dtype for the einsum. The backward pass recomputes
    `A B`, `f` and the merged kernel from the small parameters instead of
    keeping them, and accumulates the grid sums one grid point at a time.

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

        `f(A B)` is formed on row blocks of `A` (each block's product `A_r B`
        and all per-grid-point temporaries are block-sized); the scale `s` is
        folded into the amplitudes. Kernel-sized buffers: in the forward, the
        merged kernel (plus, on torch/tensorflow, its row blocks while they are
        concatenated); in the backward, `G = dL/dΔW` while the merged kernel's
        rows are formed, then the merged kernel. (For a kernel whose matrix
        view needs a transpose, e.g. Gemma's query, `ΔW` and the merged kernel
        are separate buffers.)
        """
        view, projection, grid, scale = self.view, self._projection, self.grid, self.scale
        compute_dtype = self.compute_dtype
        grid_tensor = _grid_tensor(grid)

        d_in, d_out, rank, size = view.d_in, view.d_out, self.lora_rank, len(grid)

        # A Dense-like kernel is its own matrix view (a reshape, no copy): the
        # blocks then produce rows of the merged kernel `W + ΔW` directly,
        # written over a copy of `W` on jax, and no separate `ΔW` exists.
        in_place = view.perm == tuple(range(len(view.perm)))

        def kernel_rows(kernel, start, length, value):
            if not in_place:
                return value
            rows = _rows(ops.reshape(kernel, (d_in, d_out)), start, length)
            return ops.add(ops.cast(rows, "float32"), value)

        def merged_kernel(kernel, rows_out):
            if in_place:
                full = ops.reshape(rows_out, tuple(kernel.shape))
            else:
                full = ops.add(ops.cast(kernel, "float32"), view.from_matrix(rows_out))
            return ops.cast(full, compute_dtype)

        def row_init(kernel):
            if not in_place:
                return None
            return (ops.reshape(ops.cast(kernel, "float32"), (d_in, d_out)),)

        @ops.custom_gradient
        def project(x, kernel, lora_a, lora_b, amplitudes, bandwidths):
            scaled = ops.multiply(amplitudes, scale)

            def dense_grad(x, upstream):
                # A Dense kernel: everything per row block of the kernel, i.e.
                # per column block of the 2-D input. `G_r = x_r^T g` and the
                # merged rows `W_r + ΔW_r` are block-sized; `dL/dx` is
                # assembled from `g (W_r + ΔW_r)^T`. Nothing kernel-sized.
                x2 = ops.reshape(x, (-1, d_in))
                g2 = ops.reshape(upstream, (-1, d_out))
                n = int(x2.shape[0])

                def block(start, length):
                    a_r = _rows(lora_a, start, length)
                    x_r = ops.slice(x2, (0, start), (n, length))
                    g_r = ops.cast(ops.matmul(ops.transpose(x_r), g2), "float32")
                    del x_r
                    value, slope, ga, gb = _block_vjp(
                        ops.matmul(a_r, lora_b), g_r, scaled, bandwidths, grid_tensor, True
                    )
                    grad_product = ops.multiply(g_r, slope)
                    del slope, g_r
                    grad_a = ops.matmul(grad_product, ops.transpose(lora_b))
                    grad_b = ops.matmul(ops.transpose(a_r), grad_product)
                    del grad_product
                    merged_rows = ops.cast(kernel_rows(kernel, start, length, value), compute_dtype)
                    del value
                    # (length, n): rows of dL/dx transposed.
                    grad_x_t = ops.cast(ops.matmul(merged_rows, ops.transpose(g2)), "float32")
                    return (grad_x_t, grad_a), (grad_b, ga, gb)

                (grad_x_t, grad_a), sums = _over_row_blocks(
                    d_in, d_out, block, (n, rank), ((rank, d_out), (size,), (size,))
                )
                grad_x = ops.reshape(ops.transpose(ops.cast(grad_x_t, x.dtype)), tuple(x.shape))
                return grad_x, grad_a, sums

            def grad(*args, upstream=None):
                upstream = _upstream(args, upstream)
                if view.equation is None:
                    grad_x, grad_a, (grad_b, grad_amplitudes, grad_bandwidths) = dense_grad(x, upstream)
                    grad_amplitudes = ops.multiply(grad_amplitudes, scale)
                    return grad_x, None, grad_a, grad_b, grad_amplitudes, grad_bandwidths
                # `G = dL/dΔW`, kernel-sized; dropped before the update's
                # blocks are stacked.
                held = [ops.cast(projection.grad_kernel_matrix(x, upstream), "float32")]

                def block(start, length):
                    a_r, g_r = _rows(lora_a, start, length), _rows(held[0], start, length)
                    value, slope, ga, gb = _block_vjp(
                        ops.matmul(a_r, lora_b), g_r, scaled, bandwidths, grid_tensor, True
                    )
                    grad_product = ops.multiply(g_r, slope)
                    del slope
                    grad_a = ops.matmul(grad_product, ops.transpose(lora_b))
                    grad_b = ops.matmul(ops.transpose(a_r), grad_product)
                    return (kernel_rows(kernel, start, length, value), grad_a), (grad_b, ga, gb)

                init = row_init(kernel)
                if init is not None:
                    init = init + (ops.zeros((d_in, rank), "float32"),)
                (delta, grad_a), (grad_b, grad_amplitudes, grad_bandwidths) = _over_row_blocks(
                    d_in,
                    d_out,
                    block,
                    (d_out, rank),
                    ((rank, d_out), (size,), (size,)),
                    held.clear,
                    init,
                )
                held.clear()
                full = merged_kernel(kernel, delta)
                del delta
                grad_x = projection.grad_input(x, full, upstream)
                del full
                grad_amplitudes = ops.multiply(grad_amplitudes, scale)
                return grad_x, None, grad_a, grad_b, grad_amplitudes, grad_bandwidths

            def block(start, length):
                product = ops.matmul(_rows(lora_a, start, length), lora_b)
                value = _transfer_value(product, scaled, bandwidths, grid)
                return (kernel_rows(kernel, start, length, value),), ()

            (delta,), _ = _over_row_blocks(
                d_in, d_out, block, (d_out,), (), row_init=row_init(kernel)
            )
            full = merged_kernel(kernel, delta)
            del delta
            return projection.forward(x, full), grad

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
