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

#: Below this |z| the sinc value and derivative come from their Taylor series
#: (the closed forms divide by z; the derivative's also cancels in float32).
_TAYLOR_BELOW = 0.05
#: softplus(_UNIT_BANDWIDTH) = 1: the initial bandwidth logit.
_UNIT_BANDWIDTH = math.log(math.e - 1.0)


# --------------------------------------------------------------------------
# The transfer function f, one grid point at a time
# --------------------------------------------------------------------------
def sinc_grid(grid_size, grid_range):
    """The fixed grid: `grid_size` uniformly spaced points on `[-grid_range, grid_range]`."""
    return [float(g) for g in np.linspace(-grid_range, grid_range, grid_size)]


def _sinc(z):
    """Normalized sinc, exact 1 at 0 (no division by zero)."""
    t = ops.multiply(z, math.pi)
    small = ops.less(ops.abs(z), _TAYLOR_BELOW)
    t_safe = ops.where(small, ops.ones_like(t), t)
    t2 = ops.square(t)
    series = 1.0 - t2 / 6.0 + ops.square(t2) / 120.0
    return ops.where(small, series, ops.divide(ops.sin(t_safe), t_safe))


def _sinc_and_derivative(z):
    """`sinc(z)` and `d sinc / dz`, finite everywhere (Taylor series near 0)."""
    t = ops.multiply(z, math.pi)
    small = ops.less(ops.abs(z), _TAYLOR_BELOW)
    t_safe = ops.where(small, ops.ones_like(t), t)
    z_safe = ops.where(small, ops.ones_like(z), z)
    t2 = ops.square(t)
    value = ops.divide(ops.sin(t_safe), t_safe)
    slope = ops.divide(ops.subtract(ops.cos(t_safe), value), z_safe)
    value = ops.where(small, 1.0 - t2 / 6.0 + ops.square(t2) / 120.0, value)
    # d/dz (1 - t^2/6 + t^4/120) with t = pi z.
    slope = ops.where(small, math.pi * (t2 / 30.0 - 1.0 / 3.0) * t, slope)
    return value, slope


def _grid_tensor(grid):
    return ops.convert_to_tensor(np.asarray(grid, dtype="float32"))


def _terms(k, amplitudes, bandwidths, grid):
    return ops.take(amplitudes, k), ops.take(bandwidths, k), ops.take(grid, k)


def _transfer_value(x, amplitudes, bandwidths, grid):
    """`f(x)`, accumulated over the grid points (one x-sized term alive).

    `ops.fori_loop`, not a Python loop: an unrolled loop lets XLA schedule all
    grid points' terms at once (measured: ~3 kernel-sized buffers per grid
    point on jax); a loop keeps one iteration's buffers at a time.
    """
    grid = _grid_tensor(grid)

    def body(k, out):
        a_k, b_k, g_k = _terms(k, amplitudes, bandwidths, grid)
        return ops.add(out, a_k * _sinc(b_k * (x - g_k)))

    return ops.fori_loop(0, int(grid.shape[0]), body, ops.zeros_like(x))


def _transfer_vjp(x, amplitudes, bandwidths, grid, upstream):
    """Gradients of `sum(upstream * f(x))` w.r.t. `x`, `amplitudes`, `bandwidths`.

    `d f/d x = Σ a_k b_k sinc'(z_k)`, `d f/d a_k = sinc(z_k)`,
    `d f/d b_k = a_k sinc'(z_k) (x - g_k)`, with `z_k = b_k (x - g_k)`.
    One grid point at a time: a few x-sized buffers, whatever the grid size.
    """
    grid = _grid_tensor(grid)
    size = int(grid.shape[0])
    positions = ops.arange(size)

    def body(k, carry):
        slope_sum, grad_a, grad_b = carry
        a_k, b_k, g_k = _terms(k, amplitudes, bandwidths, grid)
        shifted = x - g_k
        value, slope = _sinc_and_derivative(b_k * shifted)
        here = ops.cast(ops.equal(positions, k), x.dtype)
        grad_a = grad_a + here * ops.sum(upstream * value)
        grad_b = grad_b + here * (a_k * ops.sum(upstream * slope * shifted))
        return ops.add(slope_sum, (a_k * b_k) * slope), grad_a, grad_b

    zeros = ops.zeros((size,), x.dtype)
    slope_sum, grad_a, grad_b = ops.fori_loop(0, size, body, (ops.zeros_like(x), zeros, zeros))
    return upstream * slope_sum, grad_a, grad_b


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
        def grad(*args, upstream=None):
            return _transfer_vjp(x, amplitudes, bandwidths, grid, _upstream(args, upstream))

        return _transfer_value(x, amplitudes, bandwidths, grid), grad

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
        """`x (W + s f(A B))` as one custom-gradient op that keeps nothing kernel-sized."""
        view, projection, grid, scale = self.view, self._projection, self.grid, self.scale
        compute_dtype = self.compute_dtype

        def merged(kernel, lora_a, lora_b, amplitudes, bandwidths):
            product = ops.matmul(lora_a, lora_b)
            delta = _transfer_value(product, amplitudes, bandwidths, grid)
            full = ops.add(ops.cast(kernel, "float32"), view.from_matrix(scale * delta))
            return product, ops.cast(full, compute_dtype)

        @ops.custom_gradient
        def project(x, kernel, lora_a, lora_b, amplitudes, bandwidths):
            def grad(*args, upstream=None):
                upstream = _upstream(args, upstream)
                product, full = merged(kernel, lora_a, lora_b, amplitudes, bandwidths)
                grad_x = projection.grad_input(x, full, upstream)
                del full
                grad_delta = scale * ops.cast(projection.grad_kernel_matrix(x, upstream), "float32")
                grad_product, grad_amplitudes, grad_bandwidths = _transfer_vjp(
                    product, amplitudes, bandwidths, grid, grad_delta
                )
                grad_a = ops.matmul(grad_product, ops.transpose(lora_b))
                grad_b = ops.matmul(ops.transpose(lora_a), grad_product)
                return grad_x, None, grad_a, grad_b, grad_amplitudes, grad_bandwidths

            _, full = merged(kernel, lora_a, lora_b, amplitudes, bandwidths)
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
