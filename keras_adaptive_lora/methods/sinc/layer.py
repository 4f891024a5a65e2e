"""LR-LoRA's adapter layer: `ΔW = s · f(A B)` with a learnable per-layer sinc
transfer `f` (`transfer.py`), applied merged through `blockwise.py`.

Memory: the forward pass forms `W + ΔW` once and runs one backbone-shaped
einsum; the whole step is one custom-gradient op that keeps nothing
kernel-sized for the backward pass (see `merged_projection`).
"""

import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora._validation import check_alpha, check_positive_int
from keras_adaptive_lora.core.adapter import PACKAGE, AdapterLayer
from keras_adaptive_lora.core.kernel_view import check_rank
from keras_adaptive_lora.methods.lora import lora_scale
from keras_adaptive_lora.methods.sinc.blockwise import Projection, merged_projection
from keras_adaptive_lora.methods.sinc.transfer import read, sinc_grid, sinc_transfer

#: softplus(_UNIT_BANDWIDTH) = 1: the initial bandwidth logit.
_UNIT_BANDWIDTH = math.log(math.e - 1.0)


def check_grid_size(grid_size):
    grid_size = check_positive_int("grid_size", grid_size)
    if grid_size < 2:
        raise ValueError(
            f"`grid_size` must be at least 2 (a uniform grid on [-grid_range, "
            f"grid_range] needs both ends), got {grid_size}."
        )
    return grid_size


def check_grid_range(grid_range):
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
        self.grid_size = check_grid_size(grid_size)
        self.grid_range = check_grid_range(grid_range)
        self.grid = sinc_grid(self.grid_size, self.grid_range)
        check_rank(layer, self.lora_rank)
        super().__init__(layer, **kwargs)
        self._projection = Projection(self.view, layer.name)

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

    forward_merged = True

    def merged_output(self, inputs, training=None):
        """`x (W + ΔW)` (no bias): `merged_projection`, one custom-gradient op.

        On an int8 base the base class takes `base(x) + x ΔW` instead, with
        `ΔW` formed once per call: the kernel is never dequantized per step.
        """
        return merged_projection(
            self._projection,
            self.grid,
            self.scale,
            self.compute_dtype,
            inputs,
            read(self.wrapped.kernel),
            read(self.lora_a),
            read(self.lora_b),
            read(self.amplitudes),
            self.bandwidths(),
        )

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
        return {
            "rank": self.lora_rank,
            "alpha": self.alpha,
            "grid_size": self.grid_size,
            "grid_range": self.grid_range,
        }


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
