"""LR-LoRA, "sinc-transfer" LoRA: a LoRA product passed through a learnable
elementwise nonlinearity, so that the rank of the update is learned.

`transfer.py` (the transfer function, tabulated and interpolated), `layer.py`
(`SincLoRAAdapter` and its merged-weight projection) and the spec below; see
docs/methods.md.
"""

import dataclasses

from keras_adaptive_lora._validation import check_alpha, check_positive_int, check_seed
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.methods.sinc.layer import SincLoRAAdapter, check_grid_range, check_grid_size, check_init
from keras_adaptive_lora.methods.sinc.transfer import sinc_grid, sinc_transfer  # noqa: F401
from keras_adaptive_lora.targets import ALL_ROLES, role_targets


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class SincLoRA(AdapterMethod):
    """LR-LoRA ("sinc-transfer" LoRA): learnable-rank adapters.

    Each adapted layer gets `ΔW = s · f(A B)` with its own learnable
    elementwise transfer `f(x) = Σ_k a_k sinc(b_k (x − g_k))` on a fixed grid
    (LR-LoRA paper, section 3.3); the stable rank of `ΔW` is learned per
    layer (`update_stable_ranks`). Each layer adds `2 · grid_size`
    parameters to LoRA's `r (d_in + d_out)`. Training forwards with the
    merged weight `W + ΔW` (memory-safe, `SincLoRAAdapter`); `f` is
    interpolated from a per-step table, so a step costs O(d_in · d_out), not
    O(grid_size · d_in · d_out). After `merge` there is no overhead.

    Initialization: `ΔW = 0` always (amplitudes 0). The paper's (`init="paper"`:
    `B = 0`, grid `linspace(-c, c, K)`) is degenerate: with `A B = 0` the
    amplitudes' gradients are equal at `±g_k`, so `f` stays even, `f'(0) = 0`
    and `A`, `B` get exactly zero gradient; they leave 0 only through float
    round-off, differently on each backend. `"shifted"` (the default) moves
    the grid by half a spacing, so `f'(0) ≠ 0` after the first step and `A`,
    `B` train from the second; `"random"` draws `B` with `std(A B)` one grid
    spacing. The choice comes from a multi-seed study (docs/methods.md).

    Args:
        rank: the rank `r` of the factors `A`, `B`. Defaults to 8.
        alpha: scaling numerator, `s = alpha / r` (the paper states none; we
            use LoRA's). Defaults to `rank` (`s = 1`).
        grid_size: number of grid points `K`. Defaults to 50.
        grid_range: the grid spans `[-grid_range, grid_range]` (before the
            shift). Defaults to 3.0.
        init: `"shifted"`, `"random"` or `"paper"`. Defaults to `"shifted"`.
        seed: seed of `A` (and of `B` for `"random"`). Defaults to None.

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
    init: str = "shifted"
    seed: int = None

    def __post_init__(self):
        self._set("rank", check_positive_int("rank", self.rank))
        self._set("alpha", check_alpha(self.alpha))
        self._set("grid_size", check_grid_size(self.grid_size))
        self._set("grid_range", check_grid_range(self.grid_range))
        self._set("init", check_init(self.init))
        self._set("seed", check_seed(self.seed))

    def wrap(self, layer):
        fields = ("alpha", "grid_size", "grid_range", "init", "seed")
        return SincLoRAAdapter(layer, rank=self.rank, **{f: getattr(self, f) for f in fields})

    def plan(self, layers):
        out = []
        for layer in layers:
            check_rank(layer, self.rank)
            view = kernel_view(layer)
            # A, B plus the transfer function's amplitudes and bandwidths.
            out.append(LayerPlan(self.rank, self.rank, self.rank * (view.d_in + view.d_out) + 2 * self.grid_size))
        return out
