"""LR-LoRA's adapter layer: `ΔW = s · f(A B)`, applied merged as `x (W + ΔW)` by one
custom-gradient op over row blocks of the kernel's matrix view (`merged_projection`)."""

import math

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora import backend
from keras_adaptive_lora._validation import check_alpha, check_positive_int, check_seed
from keras_adaptive_lora.core.adapter import PACKAGE, AdapterLayer
from keras_adaptive_lora.core.kernel_view import check_rank
from keras_adaptive_lora.methods.lora import lora_scale
from keras_adaptive_lora.methods.sinc.transfer import TABLE_SIZES, cubic, locate, sinc_grid, sinc_transfer, transfer_table

#: softplus(_UNIT_BANDWIDTH) = 1: the initial bandwidth logit.
_UNIT_BANDWIDTH = math.log(math.e - 1.0)
#: `init`: grid shift (in spacings) and std of the initial `A B` entries (in spacings).
INITS = {"shifted": (0.5, 0.0), "random": (0.0, 1.0), "paper": (0.0, 0.0)}


class MatrixIO:
    """A layer input and output as row matrices `(tokens, d_in)`, `(tokens, d_out)`."""

    def __init__(self, view, layer_name):
        self.view, self.spec = view, None
        if view.equation is not None:
            inputs, out = view.equation.replace(" ", "").split("->")
            lhs, ker = inputs.split(",")
            lost = sorted(set(lhs) - set(out) - set(ker) - {"."})
            if lost:
                raise ValueError(
                    f"Layer '{layer_name}': equation '{view.equation}' sums over input axes {lost} "
                    "that are in neither the kernel nor the output; SincLoRA's merged-weight "
                    "backward pass does not support such equations. Exclude this layer from the targets."
                )
            mid = "".join(c for c in lhs if c == "." or c in out)
            self.spec = (lhs, out, mid, *("".join(ker[i] for i in axes) for axes in (view.in_axes, view.out_axes)))

    def rows(self, x, side=0):
        """The layer's input (`side=0`) or output (`side=1`) as rows `(tokens, d)`, and the token axes' shape."""
        d = (self.view.d_in, self.view.d_out)[side]
        if self.spec is None:
            return ops.reshape(x, (-1, d)), tuple(ops.shape(x)[:-1])
        source, letters = self.spec[side], self.spec[3 + side]
        if source != self.spec[2] + letters:
            x = ops.einsum(f"{source}->{self.spec[2]}{letters}", x)
        return ops.reshape(x, (-1, d)), tuple(ops.shape(x)[: len(x.shape) - len(letters)])

    def unrows(self, rows, tokens, side):
        """Rows `(tokens, d)` back to the layer's input (`side=0`) or output (`side=1`) layout."""
        if self.spec is None:
            return ops.reshape(rows, tokens + (-1,))
        target, letters = self.spec[side], self.spec[3 + side]
        y = ops.reshape(rows, tokens + (self.view.in_dims, self.view.out_dims)[side])
        return y if target == self.spec[2] + letters else ops.einsum(f"{self.spec[2]}{letters}->{target}", y)


def merged_projection(io, compute_dtype, x, w_matrix, lora_a, lora_b, coefficients, place):
    """`x (W + f(A B))` (`f`'s scale in its table) as one custom-gradient op.

    Row blocks of the matrix view (about `backend.BLOCK_ELEMENTS` entries): the
    forward pass writes `W_r + f(A_r B)` into one merged kernel; the backward
    pass rebuilds it block by block for `dL/dx = g (W + ΔW)ᵀ`, and per block
    `G_r = x_rᵀ g` gives `dL/dA_r`, `dL/dB` through the interpolated `f'` and
    the table's gradient (per interval, `Σ G t^p`, `p <= 3`). Nothing
    kernel-sized is kept between the passes.
    """
    d_in, d_out, rank = io.view.d_in, io.view.d_out, int(lora_a.shape[1])
    step = max(1, backend.BLOCK_ELEMENTS // d_out)

    @ops.custom_gradient
    def project(x, w_matrix, lora_a, lora_b, coefficients, place):
        def merged_rows(start, length):
            a_r = backend.take_block(lora_a, 0, start, length)
            index, t = locate(ops.matmul(a_r, lora_b), place)
            return a_r, index, t, cubic(coefficients[:, :4], index, t)

        def assemble(block, outputs=(), sums=()):
            merged = backend.BlockOutput((d_in, d_out), 0, init=w_matrix)
            return backend.blocked(d_in, step, block, (merged,) + outputs, sums)

        x2, tokens = io.rows(x)
        if backend.orders_after_input():  # this layer's loop waits for its input
            w_matrix = w_matrix + 0.0 * ops.cast(ops.isnan(ops.sum(x2[:1, :1])), "float32")
        (merged,), _ = assemble(lambda start, length: ((merged_rows(start, length)[3],), ()))
        y = io.unrows(ops.matmul(x2, ops.cast(merged, compute_dtype)), tokens, 1)
        del merged

        def grad(*args, upstream=None):
            g2, _ = io.rows(args[0] if upstream is None else upstream, 1)

            def block(start, length):
                a_r, index, t, value = merged_rows(start, length)
                x_r = backend.take_block(x2, 1, start, length)
                g_r = ops.cast(ops.matmul(ops.transpose(x_r), g2), "float32")
                grad_product = g_r * cubic(coefficients[:, 4:], index, t)
                index, gt = ops.reshape(index, (-1,)), ops.reshape(g_r * t, (-1,))
                gt2 = gt * ops.reshape(t, (-1,))
                moments = [ops.reshape(g_r, (-1,)), gt, gt2, gt2 * ops.reshape(t, (-1,))]
                moments = ops.stack([backend.bin_sums(m, index, TABLE_SIZES[-1]) for m in moments], axis=1)
                return (value, ops.matmul(grad_product, ops.transpose(lora_b))), (ops.matmul(ops.transpose(a_r), grad_product), moments)

            (merged, grad_a), (grad_b, moments) = assemble(
                block, (backend.BlockOutput((d_in, rank), 0),), ((rank, d_out), (TABLE_SIZES[-1], 4))
            )
            grad_x = ops.matmul(g2, ops.transpose(ops.cast(merged, compute_dtype)))
            grad_coefficients = ops.concatenate([moments, ops.zeros_like(moments)], axis=1)
            return io.unrows(grad_x, tokens, 0), None, grad_a, grad_b, grad_coefficients, None

        return y, grad

    return project(x, w_matrix, lora_a, lora_b, coefficients, place)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SincLoRAAdapter(AdapterLayer):
    """A frozen projection plus the LR-LoRA update `ΔW = s · f(A B)`.

    `f(x) = Σ_k a_k sinc(b_k (x − g_k))` is applied elementwise to the
    `(d_in, d_out)` product, with per-layer trainable amplitudes `a` (init 0)
    and bandwidths `b = softplus(β)` (init 1) on a fixed grid `g` of
    `grid_size` points; `s = alpha / r`; `A (d_in, r)` Kaiming-uniform. So
    `ΔW = 0` at initialization whatever `B`. `init` (see `SincLoRA`) sets the
    grid (`"shifted"`: `linspace(-c, c, K)` moved by half a spacing) and `B`
    (`"random"`: normal with `std(A B)` one grid spacing; else zeros).

    The forward pass uses the merged weight `act(x (W + ΔW) + bias)`, formed
    in float32 (`merged_projection`: nothing kernel-sized kept for the
    backward pass, which rebuilds it); `f` is interpolated from a table
    (`transfer.py`). On a Keras int8 base the base runs its own int8 call
    and the adapter adds `x ΔW`.

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank: the rank `r` of the factors `A`, `B`.
        alpha: scaling numerator, `s = alpha / r`. Defaults to `rank` (`s = 1`).
        grid_size: number of grid points `K`. Defaults to 50.
        grid_range: the grid's half-width `c`. Defaults to 3.0.
        init: `"shifted"` (default), `"random"` or `"paper"`.
        seed: seed of the `"random"` `B` and of `A`. Defaults to None.
    """

    def __init__(self, layer, *, rank, alpha=None, grid_size=50, grid_range=3.0, init="shifted", seed=None, **kwargs):
        self.lora_rank = check_positive_int("rank", rank)
        self.alpha = check_alpha(alpha) if alpha is not None else float(self.lora_rank)
        self.grid_size, self.grid_range = check_grid_size(grid_size), check_grid_range(grid_range)
        self.init, self.seed = check_init(init), check_seed(seed)
        self.grid = sinc_grid(self.grid_size, self.grid_range, INITS[self.init][0])
        check_rank(layer, self.lora_rank)
        super().__init__(layer, **kwargs)
        self._io = MatrixIO(self.view, layer.name)

    @property
    def scale(self):
        return lora_scale(self.alpha, self.lora_rank)

    def build_adapter(self):
        spread = INITS[self.init][1] * 2.0 * self.grid_range / (self.grid_size - 1)
        b_init = keras.initializers.RandomNormal(stddev=spread * math.sqrt(self.d_in / (2 * self.lora_rank)), seed=self.seed)
        weights = (
            ("lora_a", (self.d_in, self.lora_rank), keras.initializers.HeUniform(seed=self.seed)),
            ("lora_b", (self.lora_rank, self.d_out), b_init if spread else "zeros"),
            ("amplitudes", (self.grid_size,), "zeros"),
            ("bandwidth_logits", (self.grid_size,), keras.initializers.Constant(_UNIT_BANDWIDTH)),
        )
        for name, shape, initializer in weights:
            setattr(self, name, self.add_adapter_weight(name, shape, initializer, autocast=False))

    def bandwidths(self):
        """`b = softplus(β)`, float32, shape `(grid_size,)`."""
        return ops.softplus(self.bandwidth_logits)

    def delta_kernel(self):
        product = ops.matmul(self.lora_a, self.lora_b)
        return sinc_transfer(product, self.scale * self.amplitudes, self.bandwidths(), self.grid)

    forward_merged = True

    def merged_output(self, inputs, training=None):
        """`x (W + ΔW)` (no bias): `merged_projection`, one custom-gradient op."""
        lora_a, lora_b = (ops.cast(v, "float32") for v in (self.lora_a, self.lora_b))
        # The table's range: |A B| <= max row norm of A x max column norm of B.
        bound = ops.sqrt(ops.max(ops.sum(ops.square(lora_a), 1)) * ops.max(ops.sum(ops.square(lora_b), 0)))
        coefficients, place = transfer_table(-bound, bound, self.scale * self.amplitudes, self.bandwidths(), self.grid)
        kernel = self.view.to_matrix(ops.cast(self.wrapped.kernel, "float32"))
        return merged_projection(self._io, self.compute_dtype, inputs, kernel, lora_a, lora_b, coefficients, place)

    def rank(self):
        return self.lora_rank

    def low_rank_factors(self, *, svd_rank=None):
        """`(a, b, error)` for PEFT files: `s · f(A B)` is not low-rank (its
        rank is learned), so only an explicit `svd_rank` truncation gives
        factors (`truncated_factors`: the best rank-`svd_rank` ones and the
        relative error they leave); without it, a `ValueError`."""
        if svd_rank is None:
            raise ValueError(
                f"Layer '{self.path}': the LR-LoRA update s·f(A B) is not low-rank "
                "(the sinc transfer function lifts the rank of A B), so it has no "
                "exact LoRA factors for a PEFT adapter. Merge it into the model "
                "instead (`keras_adaptive_lora.merge_adapters(model)`, then "
                "`save_to_preset` or `export_to_transformers`), or pass `svd_rank=k` "
                "to write its best rank-k approximation (the relative error it "
                "leaves is reported)."
            )
        return truncated_factors(ops.convert_to_numpy(self.delta_kernel()), svd_rank)

    def factor_roles(self):
        return {name: {"lora_a": "in", "lora_b": "out"}.get(name) for name, _ in self.own_variables()}

    def adapter_config(self):
        keys = ("alpha", "grid_size", "grid_range", "init", "seed")
        return {"rank": self.lora_rank, **{k: getattr(self, k) for k in keys}}


def check_grid_size(grid_size):
    if check_positive_int("grid_size", grid_size) < 2:
        raise ValueError(f"`grid_size` must be at least 2 (a uniform grid on [-grid_range, grid_range] needs both ends), got {grid_size}.")
    return grid_size


def check_grid_range(grid_range):
    if isinstance(grid_range, bool) or not isinstance(grid_range, (int, float)) or not (math.isfinite(grid_range) and grid_range > 0):
        raise ValueError(f"`grid_range` must be a positive finite number, got {grid_range!r}.")
    return float(grid_range)


def check_init(init):
    if init not in INITS:
        raise ValueError(f"`init` must be one of {sorted(INITS)}, got {init!r}.")
    return init


def truncated_factors(matrix, rank):
    """The best rank-`rank` factors of `matrix` (SVD, Eckart-Young):
    `(a (d_in, k), b (k, d_out), error)` with `a` orthonormal columns, the
    singular values in `b`, `k = min(rank, min(d_in, d_out))`, and the
    relative Frobenius error `||M - a b|| / ||M||` (0.0 for a zero matrix)."""
    rank = check_positive_int("svd_rank", rank)
    u, s, vt = np.linalg.svd(np.asarray(matrix, "float64"), full_matrices=False)
    total = float(np.sqrt(np.sum(s**2)))
    error = float(np.sqrt(np.sum(s[rank:] ** 2))) / total if total > 0 else 0.0
    a, b = u[:, :rank], s[:rank, None] * vt[:rank]
    return a.astype("float32"), b.astype("float32"), error
