"""LR-LoRA, "sinc-transfer" LoRA: a LoRA product passed through a learnable
elementwise nonlinearity, so that the rank of the update is learned.

`ΔW = s · f(A B)` with `f(x) = Σ_k a_k · sinc(b_k (x − g_k))` (normalized
`sinc(z) = sin(πz) / (πz)`, `sinc(0) = 1`), see docs/methods.md and the
LR-LoRA paper, section 3.3.

Memory: the forward pass forms `W + ΔW` once and runs one backbone-shaped
einsum. The whole step "form `ΔW`, add it to `W`, project" is one
`keras.ops.custom_gradient` that keeps nothing kernel-sized for the backward
pass (only the layer input, which every method keeps, and the frozen kernel,
which is resident anyway). Everything elementwise runs on row blocks of the
kernel's matrix view (about `backend.BLOCK_ELEMENTS` entries): the forward pass
writes each block of `ΔW` into the merged kernel (in place on jax); the
backward pass recomputes, block by block, `A_r B`, `f`, `f'` and `ΔW_r`
from the small adapter parameters and produces `dL/dA_r`, `dL/dB`, the
transfer parameters' gradients and the block's share of `dL/dx`
(`dL/dx = g Wᵀ + Σ_r g ΔW_rᵀ`): no `(grid_size, d_in, d_out)` tensor and no
second kernel-sized buffer exist in the forward or the backward pass.

Speed: the grid points are evaluated in chunks of up to 10 on jax (a
`(chunk, block)` tensor), so that the sums over the grid and over the block
are small matmuls; on jax `sin`/`cos` come from a polynomial that XLA fuses
into the loop (see `keras_adaptive_lora.backend.sin_cos`).

The package: `transfer.py` (the transfer function), `blockwise.py` (the
memory-safe merged projection), `layer.py` (`SincLoRAAdapter`) and the spec
below.
"""

import dataclasses

from keras_adaptive_lora._validation import check_alpha, check_positive_int
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.methods.sinc.layer import SincLoRAAdapter, check_grid_range, check_grid_size
from keras_adaptive_lora.methods.sinc.transfer import sinc_grid, sinc_transfer  # noqa: F401
from keras_adaptive_lora.targets import ALL_ROLES, role_targets


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
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
    title = "LR-LoRA (sinc)"
    layer_class = SincLoRAAdapter
    default_targets = role_targets(*ALL_ROLES)
    learned_rank = True

    rank: int = 8
    alpha: float = None
    grid_size: int = 50
    grid_range: float = 3.0

    def __post_init__(self):
        self._set("rank", check_positive_int("rank", self.rank))
        self._set("alpha", check_alpha(self.alpha))
        self._set("grid_size", check_grid_size(self.grid_size))
        self._set("grid_range", check_grid_range(self.grid_range))

    def wrap(self, layer):
        return SincLoRAAdapter(
            layer,
            rank=self.rank,
            alpha=self.alpha,
            grid_size=self.grid_size,
            grid_range=self.grid_range,
        )

    def plan(self, layers):
        out = []
        for layer in layers:
            check_rank(layer, self.rank)
            view = kernel_view(layer)
            # A, B plus the transfer function's amplitudes and bandwidths.
            params = self.rank * (view.d_in + view.d_out) + 2 * self.grid_size
            out.append(LayerPlan(self.rank, self.rank, params))
        return out
