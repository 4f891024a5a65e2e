"""FlexLoRA (paper: "FlexLoRA: entropy-guided flexible low-rank adaptation"):
rank pruning and expansion under a global budget, guided by spectral entropy.

The method spec. The adapter layer is in `layer.py`, the schedule and its
callback in `scheduler.py`; the importance score is
`keras_adaptive_lora.spectral.spectral_entropy_importance`.
"""

import dataclasses
import math

from keras_adaptive_lora._validation import (
    check_alpha,
    check_choice,
    check_number,
    check_optional_int,
    check_positive_int,
    check_seed,
)
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.methods.flexlora.layer import FlexLoRAAdapter
from keras_adaptive_lora.methods.flexlora.scheduler import FlexLoRAScheduler, flexlora_schedule
from keras_adaptive_lora.methods.sr_lora import StableRankLoRA
from keras_adaptive_lora.targets import ALL_ROLES, role_targets

#: The choices of `FlexLoRA(init_ranks=...)`.
INIT_RANKS = ("uniform", "stable_rank")


def scale_ranks(weights, capacities, total):
    """Integer ranks proportional to `weights`, each in `[1, capacity]`,
    summing to exactly `total` (the stable-rank start of FlexLoRA).

    1. The factor `f` with `sum_i clip(f w_i, 1, R_i) = total` (bisection;
       `clip` is nondecreasing in `f`). 2. Each rank is the floor of its
    `clip(f w_i, 1, R_i)`; the units still missing go one each to the layers
    with the largest fractional parts (largest remainder; ties to the
    earlier layer), never above `R_i`.

    Args:
        weights: one positive number per layer (SR-LoRA's ranks).
        capacities: one capacity `R_i >= 1` per layer.
        total: the total rank, in `[len(weights), sum(capacities)]`.

    Returns:
        A list of Python ints.

    Example:
    ```python
    scale_ranks([1, 3, 12], [16, 16, 16], 24)  # [2, 6, 16]: 16 is the cap, 2 : 6 = 1 : 3
    ```
    """
    weights = [float(w) for w in weights]
    capacities = [int(c) for c in capacities]
    if len(weights) != len(capacities) or not weights:
        raise ValueError("`weights` and `capacities` must be non-empty and of the same length.")
    if not all(math.isfinite(w) and w > 0 for w in weights) or min(capacities) < 1:
        raise ValueError("Every weight must be finite and > 0, and every capacity >= 1.")
    if not len(weights) <= total <= sum(capacities):
        raise ValueError(
            f"A total rank of {total} cannot be split over {len(weights)} layers with "
            f"ranks in [1, capacity] (capacities sum to {sum(capacities)})."
        )

    def spread(f):
        return [min(max(f * w, 1.0), c) for w, c in zip(weights, capacities)]

    low, high = 0.0, max(c / w for w, c in zip(weights, capacities))
    for _ in range(200):  # sum(spread(low)) <= total <= sum(spread(high))
        mid = 0.5 * (low + high)
        low, high = (mid, high) if sum(spread(mid)) <= total else (low, mid)
    values = spread(low)
    ranks = [min(int(math.floor(v)), c) for v, c in zip(values, capacities)]
    order = sorted(range(len(ranks)), key=lambda i: (-(values[i] - ranks[i]), i))
    missing = total - sum(ranks)
    while missing > 0:
        for i in order:
            if missing and ranks[i] < capacities[i]:
                ranks[i] += 1
                missing -= 1
    return ranks


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class FlexLoRA(AdapterMethod):
    """FlexLoRA: SVD-form LoRA whose ranks move between layers during training.

    Wraps each target with a `FlexLoRAAdapter` of capacity `max_rank` and
    `rank` active components. Train with `fit` and a
    `FlexLoRAScheduler` in the callbacks (`spec.callbacks(total_steps)` gives
    one scaled to the run): it prunes and expands components under a constant total rank (paper §3).

    The reallocation rule (`FlexLoRAScheduler`): at a reallocation step with
    budget `b(t)` over `L` adapted layers, `b = min(b(t), L // 2)`; the `b`
    least important layers with more than one active component are paired,
    in order, with the `b` most important layers (not among them) with a
    free slot, and a pair moves one component only if the expanding layer is
    strictly more important than the pruned one (never toward a layer that is
    not more important). The total active rank stays `rank * L`.

    Default targets: every projection of every block (query, key, value,
    attention output and the MLP projections), as in the paper's experiments
    (its Fig. 2 reallocates rank among K, V, Q, attention-output,
    intermediate and output dense modules): the method needs many candidate
    layers to move rank between.

    Args:
        rank: active components per layer at the start (with
            `init_ranks="stable_rank"`: on average). Defaults to 8.
        max_rank: per-layer capacity `R`. Defaults to `2 * rank`, capped at
            each layer's `min(d_in, d_out)`.
        alpha: scaling numerator, `s = alpha / rank` (the same for every
            layer). Defaults to `rank`.
        orth_reg_weight: weight of the orthogonality penalty. Defaults to 0.1.
        seed: base seed of the noise of expanded slots; layer `i` of one
            `apply_adapters` call gets `seed + i`. Defaults to None (drawn
            from Python's `random`).
        init_ranks: the starting allocation. `"uniform"` (the paper): every
            layer at `rank`. `"stable_rank"` (beyond the paper): SR-LoRA's
            ranks (the stable ranks of the pretrained kernels, see
            `allocate_ranks`) scaled to the same total `rank * L` with
            `scale_ranks`, each in `[1, R]`; then the scheduler reallocates
            as usual. `plan(layers)` reports these ranks and the stable
            ranks. Defaults to `"uniform"`.

    Example:
    ```python
    import keras, keras_adaptive_lora as kal
    from keras_adaptive_lora import FlexLoRAScheduler
    report = kal.apply_adapters(backbone, kal.FlexLoRA(rank=4))
    model.compile(optimizer="adam", loss=...)
    scheduler = FlexLoRAScheduler(1000, b0=4, warmup_steps=100, final_steps=200, interval=10)
    model.fit(data, epochs=..., callbacks=[scheduler])
    print(scheduler.rank_pattern)
    ```
    """

    name = "flexlora"
    title = "FlexLoRA"
    layer_class = FlexLoRAAdapter
    default_targets = role_targets(*ALL_ROLES)
    per_layer_ranks = True

    rank: int = 8
    max_rank: int = None
    alpha: float = None
    orth_reg_weight: float = 0.1
    seed: int = None
    init_ranks: str = "uniform"

    def __post_init__(self):
        self._set("rank", check_positive_int("rank", self.rank))
        self._set("max_rank", check_optional_int("max_rank", self.max_rank))
        if self.max_rank is not None and self.max_rank < self.rank:
            raise ValueError(
                f"`max_rank` ({self.max_rank}) must be at least `rank` ({self.rank})."
            )
        self._set("alpha", check_alpha(self.alpha))
        self._set("orth_reg_weight", check_number("orth_reg_weight", self.orth_reg_weight, minimum=0))
        self._set("seed", check_seed(self.seed))
        check_choice("init_ranks", self.init_ranks, INIT_RANKS)

    def wrap(self, layer, seed=None, active_rank=None):
        """Wrap one layer, `active_rank` (default `rank`) components active
        (alone, a layer's stable-rank start is `rank` too: the total is `rank`)."""
        return FlexLoRAAdapter(
            layer,
            rank=self.rank,
            max_rank=self.max_rank,
            alpha=self.alpha,
            orth_reg_weight=self.orth_reg_weight,
            seed=self.seed if seed is None else seed,
            active_rank=active_rank,
        )

    def wrap_all(self, layers):
        plans = self.plan(layers)
        return [
            self.wrap(layer, seed=None if self.seed is None else self.seed + i, active_rank=p.rank)
            for i, (layer, p) in enumerate(zip(layers, plans))
        ]

    def plan(self, layers):
        capacities, sizes = [], []
        for layer in layers:
            check_rank(layer, self.rank)
            view = kernel_view(layer)
            if self.max_rank is None:
                capacities.append(min(2 * self.rank, view.d_in, view.d_out))
            else:
                check_rank(layer, self.max_rank, "max_rank")
                capacities.append(self.max_rank)
            sizes.append(view.d_in + view.d_out + 1)
        ranks, sranks = [self.rank] * len(layers), [None] * len(layers)
        if self.init_ranks == "stable_rank" and layers:
            sranks, prior = StableRankLoRA().stable_ranks_and_ranks(layers)
            ranks = scale_ranks(prior, capacities, self.rank * len(layers))
        # A (d_in, R), lambda (R,), B (R, d_out).
        return [
            LayerPlan(r, c, c * size, stable_rank=srank)
            for r, c, size, srank in zip(ranks, capacities, sizes, sranks)
        ]

    def callbacks(self, total_steps, *, verbose=0, b0=4):
        """A `FlexLoRAScheduler` scaled to a run of `total_steps` (see
        `flexlora_schedule`), or none when the run is too short to move rank."""
        schedule = flexlora_schedule(total_steps)
        if schedule is None:
            return []
        return [FlexLoRAScheduler(total_steps, b0=b0, verbose=verbose, **schedule)]
