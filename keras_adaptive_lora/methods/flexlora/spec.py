"""FlexLoRA (paper: "FlexLoRA: entropy-guided flexible low-rank adaptation"):
rank pruning and expansion under a global budget, guided by spectral entropy.

The method spec. The adapter layer is in `layer.py`, the schedule and its
callback in `scheduler.py`; the importance score is
`keras_adaptive_lora.spectral.spectral_entropy_importance`.
"""

import dataclasses

from keras_adaptive_lora._validation import (
    check_alpha,
    check_number,
    check_optional_int,
    check_positive_int,
    check_seed,
)
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.methods.flexlora.layer import FlexLoRAAdapter
from keras_adaptive_lora.methods.flexlora.scheduler import FlexLoRAScheduler, flexlora_schedule
from keras_adaptive_lora.targets import ALL_ROLES, role_targets


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class FlexLoRA(AdapterMethod):
    """FlexLoRA: SVD-form LoRA whose ranks move between layers during training.

    Wraps each target with a `FlexLoRAAdapter` of capacity `max_rank` and
    `rank` active components. Train with `fit` and a
    `FlexLoRAScheduler` in the callbacks (`spec.callbacks(total_steps)` gives
    one scaled to the run): it prunes and expands components under a constant total rank (paper §3).

    Default targets: every projection of every block (query, key, value,
    attention output and the MLP projections), as in the paper's experiments
    (its Fig. 2 reallocates rank among K, V, Q, attention-output,
    intermediate and output dense modules): the method needs many candidate
    layers to move rank between.

    Args:
        rank: active components per layer at the start. Defaults to 8.
        max_rank: per-layer capacity. Defaults to `2 * rank`, capped at each
            layer's `min(d_in, d_out)`.
        alpha: scaling numerator, `s = alpha / rank`. Defaults to `rank`.
        orth_reg_weight: weight of the orthogonality penalty. Defaults to 0.1.
        seed: base seed of the noise of expanded slots; layer `i` of one
            `apply_adapters` call gets `seed + i`. Defaults to None (drawn
            from Python's `random`).

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

    def wrap(self, layer, seed=None):
        return FlexLoRAAdapter(
            layer,
            rank=self.rank,
            max_rank=self.max_rank,
            alpha=self.alpha,
            orth_reg_weight=self.orth_reg_weight,
            seed=self.seed if seed is None else seed,
        )

    def wrap_all(self, layers):
        if self.seed is None:
            return [self.wrap(layer) for layer in layers]
        return [self.wrap(layer, seed=self.seed + i) for i, layer in enumerate(layers)]

    def plan(self, layers):
        out = []
        for layer in layers:
            check_rank(layer, self.rank)
            view = kernel_view(layer)
            if self.max_rank is None:
                capacity = min(2 * self.rank, view.d_in, view.d_out)
            else:
                check_rank(layer, self.max_rank, "max_rank")
                capacity = self.max_rank
            # A (d_in, R), lambda (R,), B (R, d_out).
            out.append(LayerPlan(self.rank, capacity, capacity * (view.d_in + view.d_out + 1)))
        return out

    def callbacks(self, total_steps, *, verbose=0, b0=4):
        """A `FlexLoRAScheduler` scaled to a run of `total_steps` (see
        `flexlora_schedule`), or none when the run is too short to move rank."""
        schedule = flexlora_schedule(total_steps)
        if schedule is None:
            return []
        return [FlexLoRAScheduler(total_steps, b0=b0, verbose=verbose, **schedule)]
