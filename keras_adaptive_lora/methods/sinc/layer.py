"""LR-LoRA's adapter layer: `ΔW = s · f(A B)`, applied merged as `x (W + ΔW)` by one
custom-gradient op over row blocks of the kernel's matrix view (`merged_projection`)."""

import math

import keras
from keras import ops

from keras_adaptive_lora import backend
from keras_adaptive_lora._validation import check_alpha, check_choice, check_int, check_number, check_seed
from keras_adaptive_lora.core.adapter import PACKAGE, AdapterLayer
from keras_adaptive_lora.core.kernel_view import MatrixIO, check_rank
from keras_adaptive_lora.methods.lora import lora_scale
from keras_adaptive_lora.methods.sinc.transfer import cubic, locate, sinc_grid, sinc_transfer, transfer_table
from keras_adaptive_lora.spectral import truncated_factors

#: `init`: (grid shift, std of the initial `A B` entries), both in grid spacings.
INITS = {"shifted": (0.5, 0.0), "random": (0.0, 1.0), "paper": (0.0, 0.0)}


def check_options(rank, alpha, grid_size, grid_range, init, seed):
    """The validated options of `SincLoRA` / `SincLoRAAdapter`, as a dict."""
    return {
        "rank": check_int("rank", rank), "alpha": check_alpha(alpha), "grid_size": check_int("grid_size", grid_size, 2),
        "grid_range": check_number("grid_range", grid_range, minimum=0, low_open=True),
        "init": check_choice("init", init, INITS), "seed": check_seed(seed),
    }


def merged_projection(io, dtype, x, w_matrix, lora_a, lora_b, values, slopes, place):
    """`x (W + f(A B))` (the scale in `f`'s tables) as one custom-gradient op.

    Row blocks of the matrix view (about `backend.BLOCK_ELEMENTS` entries). The
    forward pass writes `W_r + f(A_r B)` into one merged kernel; the backward
    pass recomputes each block: `dL/dx_r = g (W_r + ΔW_r)ᵀ`, and `G_r = x_rᵀ g`
    gives `dL/dA_r`, `dL/dB` through the interpolated `f'`, and the value
    table's gradient (`Σ G t^p` per interval, `p <= 3`). Nothing kernel-sized
    is kept between the passes or formed in the backward pass.
    """
    d_in, d_out, rank, size = io.view.d_in, io.view.d_out, int(lora_a.shape[1]), int(values.shape[1])
    step = max(1, backend.BLOCK_ELEMENTS // d_out)
    input_gradient = backend.needs_gradient(x)  # none for a model's input on torch

    @ops.custom_gradient
    def project(x, w_matrix, lora_a, lora_b, values, slopes, place):
        scaled_b = lora_b * place[1]  # A_r (B / h) = (A_r B) / h exactly

        def rows(start, length):
            a_r = backend.take_block(lora_a, 0, start, length)
            return (a_r,) + locate(ops.matmul(a_r, scaled_b), place, size)

        def merged_rows(start, length, index, t):
            return backend.take_block(w_matrix, 0, start, length) + cubic(values, index, t)

        x2, tokens = io.rows(x, 0)
        merged = w_matrix
        if backend.orders_after_input():  # this layer's loop waits for its input
            merged = merged + 0.0 * ops.cast(ops.isnan(ops.sum(x2[:1, :1])), "float32")
        output = backend.BlockOutput((d_in, d_out), 0, init=merged)
        (merged,), _ = backend.blocked(d_in, step, lambda start, length: ((cubic(values, *rows(start, length)[1:]),), ()), (output,))
        y = io.unrows(ops.matmul(x2, ops.cast(merged, dtype)), tokens, 1)
        del merged

        def grad(*args, upstream=None):
            g2, _ = io.rows(args[0] if upstream is None else upstream, 1)

            def block(start, length):
                a_r, index, t = rows(start, length)
                g_r = ops.cast(ops.matmul(ops.transpose(backend.take_block(x2, 1, start, length)), g2), "float32")
                grad_product = g_r * cubic(slopes, index, t)
                pieces = (ops.matmul(grad_product, ops.transpose(lora_b)),)
                if input_gradient:
                    pieces += (ops.matmul(g2, ops.transpose(ops.cast(merged_rows(start, length, index, t), dtype))),)
                g_r, t = ops.reshape(g_r, (-1,)), ops.reshape(t, (-1,))
                g_t = g_r * t
                g_t2 = g_t * t
                moments = backend.bin_sums([g_r, g_t, g_t2, g_t2 * t], ops.reshape(index, (-1,)), size)
                return pieces, (ops.matmul(ops.transpose(a_r), grad_product), moments)

            outputs = (backend.BlockOutput((d_in, rank), 0),) + ((backend.BlockOutput(None, 1, like=x2),) if input_gradient else ())
            pieces, (grad_b, moments) = backend.blocked(d_in, step, block, outputs, ((rank, d_out), (size, 4)))
            grad_x = io.unrows(pieces[1], tokens, 0) if input_gradient else None
            return grad_x, None, pieces[0], grad_b, ops.transpose(moments), ops.zeros_like(slopes), None

        return y, grad

    return project(x, w_matrix, lora_a, lora_b, values, slopes, place)


@keras.saving.register_keras_serializable(package=PACKAGE)
class SincLoRAAdapter(AdapterLayer):
    """A frozen projection plus the LR-LoRA update `ΔW = s · f(A B)` (see `SincLoRA`).

    `f(x) = Σ_k a_k sinc(b_k (x − g_k))` elementwise on the `(d_in, d_out)`
    product; amplitudes `a` (init 0, so `ΔW = 0`), bandwidths `b = softplus(β)`
    (init 1), a fixed grid `g`, `s = alpha / r`, `A (d_in, r)` Kaiming-uniform;
    `init` sets the grid and `B`. The forward pass uses the merged weight
    `act(x (W + ΔW) + bias)`, formed in float32 and cast once, and keeps nothing
    kernel-sized for the backward pass (`merged_projection`); `f` comes from a
    per-step table over `|A B| <= max_i |A_i| max_j |B_j|` (`transfer.py`). On a
    Keras int8 base the base runs its own int8 call and the adapter adds `x ΔW`.

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank, alpha, grid_size, grid_range, init, seed: as `SincLoRA`'s.
    """

    factors = {"lora_a": "in", "lora_b": "out"}

    def __init__(self, layer, *, rank, alpha=None, grid_size=50, grid_range=3.0, init="shifted", seed=None, **kwargs):
        options = check_options(rank, alpha, grid_size, grid_range, init, seed)
        self.lora_rank = options.pop("rank")
        self.alpha = options.pop("alpha") or float(self.lora_rank)
        for name, value in options.items():  # grid_size, grid_range, init, seed
            setattr(self, name, value)
        self.grid = sinc_grid(self.grid_size, self.grid_range, INITS[self.init][0])
        check_rank(layer, self.lora_rank)
        super().__init__(layer, **kwargs)
        self._io = MatrixIO(self.view, layer.name)

    @property
    def scale(self):
        return lora_scale(self.alpha, self.lora_rank)

    def build_adapter(self):
        spread = INITS[self.init][1] * 2.0 * self.grid_range / (self.grid_size - 1)
        b_std = spread * math.sqrt(self.d_in / (2.0 * self.lora_rank))  # Var(A) = 2 / d_in
        for name, shape, initializer in (
            ("lora_a", (self.d_in, self.lora_rank), keras.initializers.HeUniform(seed=self.seed)),
            ("lora_b", (self.lora_rank, self.d_out), keras.initializers.RandomNormal(stddev=b_std, seed=self.seed) if spread else "zeros"),
            ("amplitudes", (self.grid_size,), "zeros"),
            ("bandwidth_logits", (self.grid_size,), keras.initializers.Constant(math.log(math.e - 1.0))),
        ):
            setattr(self, name, self.add_adapter_weight(name, shape, initializer, autocast=False))

    def bandwidths(self):
        """`b = softplus(β)`, float32, shape `(grid_size,)`."""
        return ops.softplus(self.bandwidth_logits)

    def delta_kernel(self):
        product = ops.matmul(self.lora_a, self.lora_b)
        return sinc_transfer(product, self.scale * self.amplitudes, self.bandwidths(), self.grid)

    forward_merged = True

    def merged_output(self, inputs, training=None):
        """`x (W + ΔW)` (no bias), one custom-gradient op (`merged_projection`)."""
        lora_a, lora_b = ops.cast(self.lora_a, "float32"), ops.cast(self.lora_b, "float32")
        bound = ops.sqrt(ops.max(ops.sum(ops.square(lora_a), 1)) * ops.max(ops.sum(ops.square(lora_b), 0)))
        tables = transfer_table(-bound, bound, self.scale * self.amplitudes, self.bandwidths(), self.grid)
        kernel = self.view.to_matrix(ops.cast(self.wrapped.kernel, "float32"))
        return merged_projection(self._io, self.compute_dtype, inputs, kernel, lora_a, lora_b, *tables)

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

    def adapter_config(self):
        return {"rank": self.lora_rank, **{k: getattr(self, k) for k in ("alpha", "grid_size", "grid_range", "init", "seed")}}
