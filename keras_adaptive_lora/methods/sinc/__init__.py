"""LR-LoRA: a LoRA product through a learnable elementwise nonlinearity, so the
update's rank is learned. `transfer.py` (the tabulated transfer function),
`layer.py` (`SincLoRAAdapter`, its merged projection), the spec below."""

import dataclasses

from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.methods.sinc.layer import SincLoRAAdapter, check_options
from keras_adaptive_lora.methods.sinc.transfer import sinc_grid, sinc_transfer  # noqa: F401
from keras_adaptive_lora.targets import ALL_ROLES, role_targets


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class SincLoRA(AdapterMethod):
    """LR-LoRA ("sinc-transfer" LoRA): learnable-rank adapters (docs/methods.md).

    Each adapted layer gets `ΔW = s · f(A B)` with its own learnable elementwise
    transfer `f(x) = Σ_k a_k sinc(b_k (x − g_k))` on a fixed grid (LR-LoRA
    paper, section 3.3), so the stable rank of `ΔW` is learned per layer
    (`update_stable_ranks`); `2 · grid_size` parameters per layer on top of
    LoRA's `r (d_in + d_out)`. Training forwards with the merged weight
    `W + ΔW`, memory-safe; `f` is interpolated from a per-step table, so a step
    costs O(d_in · d_out), not O(grid_size · d_in · d_out). No overhead after
    `merge`.

    Initialization: amplitudes 0, so `ΔW = 0`. The paper's (`init="paper"`:
    `B = 0`, grid `linspace(-c, c, K)`) is degenerate: `f` stays even and
    `A`, `B` get exactly zero gradient. `"shifted"` (the default, from a
    multi-seed study: docs/methods.md) moves the grid by half a spacing;
    `"random"` draws `B` with `std(A B)` one grid spacing.

    Args:
        rank: the rank `r` of `A`, `B`. Defaults to 8.
        alpha: `s = alpha / r` (the paper states no scaling; LoRA's). Defaults
            to `rank` (`s = 1`).
        grid_size: number of grid points `K`. Defaults to 50.
        grid_range: the grid spans `[-grid_range, grid_range]` (before a
            shift). Defaults to 3.0.
        init: `"shifted"`, `"random"` or `"paper"`. Defaults to `"shifted"`.
        seed: seed of `A` (and of `B` for `"random"`). Defaults to None.

    Default targets: every attention (q, k, v, o) and MLP projection.

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
    init: str = "shifted"
    seed: int = None

    def __post_init__(self):
        for name, value in check_options(**self.get_config()).items():
            self._set(name, value)

    def wrap(self, layer):
        return SincLoRAAdapter(layer, **self.get_config())

    def plan(self, layers):
        for layer in layers:
            check_rank(layer, self.rank)
        views = [kernel_view(layer) for layer in layers]  # A, B, amplitudes, bandwidths:
        return [LayerPlan(self.rank, self.rank, self.rank * (v.d_in + v.d_out) + 2 * self.grid_size) for v in views]
