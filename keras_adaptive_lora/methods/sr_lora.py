"""SR-LoRA: stable-rank-guided rank allocation with stochastic partial updating.

Zhang, Wang and Gu, "Beyond Low-Rank Tuning: Model Prior-Guided Rank Allocation
for Effective Transfer in Low-Data and Large-Gap Regimes" (SR-LoRA; Sec. 3.2,
eqs. 3-4 and Fig. 4). Each targeted projection gets a LoRA adapter whose rank is the
stable rank `||W||_F^2 / sigma_1(W)^2` of its pretrained kernel's matrix view,
rounded half to even and clamped to `[1, min(d_in, d_out)]`. In training, the
stochastic partial update (SPU) samples per step and per adapter a rank
`k ~ U{1..r}`, uses components `1..k` in the forward pass and lets only
component `k` learn. Inference, evaluation and merge use all `r` components.

Decisions (see also the README):
- keras-hub keeps the query, key and value projections separate, so each gets
  its own rank; the reference code computes one rank for a fused qkv weight.
- A zero kernel has stable rank 0 by convention (`stable_rank`) and gets rank 1.
- SPU keeps the scaling `s = alpha / r` (the masked components contribute zero),
  so the training output with `k = r` equals the inference output.
"""

import dataclasses
import math
from fractions import Fraction

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora._validation import (
    check_alpha,
    check_bool,
    check_dropout,
    check_optional_int,
    check_positive_int,
    check_seed,
)
from keras_adaptive_lora.core.adapter import PACKAGE
from keras_adaptive_lora.core.kernel_view import kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.methods.lora import LoRAAdapter
from keras_adaptive_lora.spectral import stable_rank
from keras_adaptive_lora.targets import role_targets


# --------------------------------------------------------------------------
# Rank allocation (a pure function)
# --------------------------------------------------------------------------
def allocate_ranks(stable_ranks, shapes, *, max_rank=None, budget=None):
    """SR-LoRA ranks from stable ranks and `(d_in, d_out)` matrix shapes.

    1. `r = round(srank)`, rounding half to even (as the reference code,
       Python's `round`); 2. clamp to `[1, min(d_in, d_out)]`; 3. cap at
    `max_rank`; 4. if the adapters' parameters `sum r_i (d_in_i + d_out_i)`
    exceed `budget`, scale all ranks by the largest common factor `f < 1` for
    which `r_i' = max(1, floor(f r_i))` fits the budget. Ranks are never
    scaled up. (A computed stable rank carries float32 round-off, about 1e-6
    relative, so a kernel whose exact stable rank is a tie such as 4.5 may
    land on either side of it.)

    Args:
        stable_ranks: one stable rank (float >= 0) per layer.
        shapes: one `(d_in, d_out)` per layer.
        max_rank: optional cap on every rank.
        budget: optional total number of adapter parameters (A and B).

    Returns:
        A list of Python ints.

    Example:
    ```python
    allocate_ranks([4.5, 5.5, 0.0], [(8, 8)] * 3)  # [4, 6, 1]
    ```
    """
    if len(stable_ranks) != len(shapes):
        raise ValueError(
            f"Got {len(stable_ranks)} stable ranks for {len(shapes)} shapes; "
            "pass one of each per layer."
        )
    if max_rank is not None:
        max_rank = check_positive_int("max_rank", max_rank)
    if budget is not None:
        budget = check_positive_int("budget", budget)
    ranks = []
    for srank, (d_in, d_out) in zip(stable_ranks, shapes):
        if not math.isfinite(srank) or srank < 0:
            raise ValueError(f"A stable rank must be a finite number >= 0, got {srank!r}.")
        rank = min(max(round(srank), 1), min(d_in, d_out))
        if max_rank is not None:
            rank = min(rank, max_rank)
        ranks.append(int(rank))
    if budget is None:
        return ranks
    per_rank = [d_in + d_out for d_in, d_out in shapes]

    def cost(factor):  # factor: Fraction in (0, 1]
        return sum(
            max(1, (factor.numerator * r) // factor.denominator) * p
            for r, p in zip(ranks, per_rank)
        )

    if cost(Fraction(1)) <= budget:
        return ranks
    minimum = sum(per_rank)
    if minimum > budget:
        raise ValueError(
            f"`budget`={budget:,} parameters is too small: rank 1 on each of the "
            f"{len(ranks)} targeted layers already needs {minimum:,}. Raise the "
            "budget or target fewer layers."
        )
    # The scaled ranks only change at factors j / r_i: search those.
    candidates = sorted({Fraction(j, r) for r in ranks for j in range(1, r)})
    low, high = -1, len(candidates)  # cost(candidates[low]) fits, [high] does not
    while high - low > 1:
        mid = (low + high) // 2
        if cost(candidates[mid]) <= budget:
            low = mid
        else:
            high = mid
    if low < 0:  # no breakpoint fits: every rank at its floor of 1
        return [1] * len(ranks)
    factor = candidates[low]
    return [max(1, (factor.numerator * r) // factor.denominator) for r in ranks]


# --------------------------------------------------------------------------
# The adapter layer
# --------------------------------------------------------------------------
@keras.saving.register_keras_serializable(package=PACKAGE)
class StableRankLoRAAdapter(LoRAAdapter):
    """A LoRA adapter trained with stochastic partial updating (SPU).

    Same variables and inference as `LoRAAdapter` (`A (d_in, r)` He-uniform,
    `B (r, d_out)` zeros, `s = alpha / r`). In training with `spu=True`, each
    call samples `k ~ U{1..r}` from the layer's own `keras.random.SeedGenerator`;
    the update uses components `1..k` (a mask on the rank axis, so shapes are
    static and a compiled step is traced once), and only component `k` gets a
    gradient (components `< k` go through `stop_gradient`). The scaling stays
    `alpha / r`. Inference, evaluation (`training` false or None) and `merge`
    use all `r` components.

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank: the rank `r`.
        alpha: scaling numerator, `s = alpha / r`. Defaults to 1 (the
            reference's `s = 1 / r`); None means `alpha = r`.
        spu: sample a partial rank per training step. Defaults to True;
            False trains all components every step (plain LoRA).
        seed: seed of the SPU sampler. Defaults to None (drawn from Keras's
            global seed, so `keras.utils.set_random_seed` makes runs
            reproducible).
        base_stable_rank: the stable rank the rank was derived from (kept for
            reports). Defaults to None.
        dropout: dropout on the adapter's input path. Defaults to 0.
        rslora: scale by `alpha / sqrt(r)`. Defaults to False.
    """

    def __init__(
        self,
        layer,
        *,
        rank,
        alpha=1.0,
        spu=True,
        seed=None,
        base_stable_rank=None,
        dropout=0.0,
        rslora=False,
        **kwargs,
    ):
        self.spu = check_bool("spu", spu)
        self.seed = check_seed(seed)
        self.base_stable_rank = None if base_stable_rank is None else float(base_stable_rank)
        super().__init__(layer, rank=rank, alpha=alpha, dropout=dropout, rslora=rslora, **kwargs)

    def build_adapter(self):
        super().build_adapter()
        self.seed_generator = keras.random.SeedGenerator(self.seed, name="spu_seed_generator")

    def sample_rank(self):
        """Draw `k ~ U{1..r}` (an int32 scalar tensor); advances the sampler."""
        return keras.random.randint((), 1, self.lora_rank + 1, seed=self.seed_generator)

    def delta_output(self, inputs, training=None):
        if not (training and self.spu and self.lora_rank > 1):
            return super().delta_output(inputs, training)
        if self._dropout_layer is not None:
            inputs = self._dropout_layer(inputs, training=training)
        k = self.sample_rank()
        index = ops.arange(1, self.lora_rank + 1, dtype="int32")
        used = ops.cast(ops.less_equal(index, k), self.compute_dtype)  # components 1..k
        learns = ops.cast(ops.equal(index, k), "float32")  # component k only
        a_frozen = ops.stop_gradient(self.lora_a)
        b_frozen = ops.stop_gradient(self.lora_b)
        # Same values as A and B; the gradient reaches column/row k only.
        a = ops.add(a_frozen, ops.multiply(ops.subtract(self.lora_a, a_frozen), learns[None, :]))
        b = ops.add(b_frozen, ops.multiply(ops.subtract(self.lora_b, b_frozen), learns[:, None]))
        h = self.view.down(inputs, ops.cast(a, self.compute_dtype))
        h = ops.multiply(h, used)  # the rank axis is last
        out = self.view.up(h, ops.cast(b, self.compute_dtype))
        return ops.multiply(out, ops.cast(self.scale, self.compute_dtype))

    def adapter_config(self):
        config = super().adapter_config()
        config.update(
            {"spu": self.spu, "seed": self.seed, "base_stable_rank": self.base_stable_rank}
        )
        return config


# --------------------------------------------------------------------------
# The method spec
# --------------------------------------------------------------------------
def _layer_stable_rank(layer):
    """`stable_rank(layer)`, its errors (a NaN or infinite kernel) naming the layer."""
    try:
        return stable_rank(layer)
    except ValueError as error:
        raise ValueError(
            f"Layer '{layer.path}': {error} The stable-rank plan (SR-LoRA, or FlexLoRA "
            "with init_ranks='stable_rank') sets each rank from the stable rank of "
            "the pretrained kernel: check that the weights loaded intact, "
            "or leave this layer out of `targets`. Nothing was changed."
        ) from None


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class StableRankLoRA(AdapterMethod):
    """SR-LoRA: LoRA with the rank of each layer set by its stable rank.

    Each targeted layer gets rank `round(srank(W))` of its pretrained kernel's
    `(d_in, d_out)` matrix view (round half to even), clamped to
    `[1, min(d_in, d_out)]`, capped at `max_rank`, and, with a `budget`, all
    ranks scaled down by one common factor until the adapters' parameters
    `sum r (d_in + d_out)` fit (each rank at least 1); see `allocate_ranks`.
    Training uses stochastic partial updating (see `StableRankLoRAAdapter`).
    Inspect the plan before applying it with `plan_ranks(model, method)`
    (or `keras-adaptive-lora inspect --method sr-lora`).

    keras-hub models keep q, k and v as separate projections, so each gets its
    own rank (the reference code computes one rank for a fused qkv weight).
    On a model quantized with Keras's int8 (`model.quantize("int8")`), the
    stable rank is that of the dequantized kernel `int8 / kernel_scale`.

    Args:
        alpha: scaling numerator, `s = alpha / r`. Defaults to 1 (`s = 1 / r`,
            the reference scaling).
        spu: stochastic partial updating in training. Defaults to True.
        max_rank: optional cap on every rank. Defaults to None.
        budget: optional total number of adapter parameters. Defaults to None.
        seed: base seed of the SPU samplers; the adapter at position `i` of an
            `apply_adapters` call gets its own seed mixed from `(seed, i)`.
            Defaults to None (Keras's global seed).
        dropout: dropout on the adapter path. Defaults to 0.
        rslora: use `s = alpha / sqrt(r)`. Defaults to False.

    Default targets: the query, value and attention-output projections
    (paper eq. 3).

    Example:
    ```python
    import keras_adaptive_lora as kal
    method = kal.StableRankLoRA(max_rank=64)
    print(kal.plan_ranks(backbone, method))   # inspect, model unchanged
    report = kal.apply_adapters(backbone, method)
    ```
    """

    name = "sr-lora"
    title = "SR-LoRA"
    layer_class = StableRankLoRAAdapter
    default_targets = role_targets("query", "value", "attention_output")
    per_layer_ranks = True

    alpha: float = 1.0
    spu: bool = True
    max_rank: int = None
    budget: int = None
    seed: int = None
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        self._set("alpha", check_alpha(self.alpha))
        self._set("spu", check_bool("spu", self.spu))
        self._set("max_rank", check_optional_int("max_rank", self.max_rank))
        self._set("budget", check_optional_int("budget", self.budget))
        self._set("seed", check_seed(self.seed))
        self._set("dropout", check_dropout(self.dropout))
        self._set("rslora", check_bool("rslora", self.rslora))

    def stable_ranks_and_ranks(self, layers):
        """`(stable_ranks, ranks)` for `layers`, all at once (the budget is global)."""
        views = [kernel_view(layer) for layer in layers]
        sranks = [_layer_stable_rank(layer) for layer in layers]
        ranks = allocate_ranks(
            sranks,
            [(v.d_in, v.d_out) for v in views],
            max_rank=self.max_rank,
            budget=self.budget,
        )
        return sranks, ranks

    def plan(self, layers):
        sranks, ranks = self.stable_ranks_and_ranks(layers)
        views = [kernel_view(layer) for layer in layers]
        return [
            LayerPlan(rank, rank, rank * (v.d_in + v.d_out), stable_rank=srank)
            for v, srank, rank in zip(views, sranks, ranks)
        ]

    def adapter_seed(self, index):
        """The SPU seed of the adapter at `index` (None without a base seed)."""
        if self.seed is None:
            return None
        state = np.random.SeedSequence([self.seed, index]).generate_state(1)[0]
        return int(state) & 0x7FFFFFFF

    def wrap_all(self, layers):
        sranks, ranks = self.stable_ranks_and_ranks(layers)
        return [
            StableRankLoRAAdapter(
                layer,
                rank=rank,
                alpha=self.alpha,
                spu=self.spu,
                seed=self.adapter_seed(i),
                base_stable_rank=srank,
                dropout=self.dropout,
                rslora=self.rslora,
            )
            for i, (layer, srank, rank) in enumerate(zip(layers, sranks, ranks))
        ]

    def wrap(self, layer):
        """Wrap one layer (a `budget` then applies to this layer alone)."""
        return self.wrap_all([layer])[0]
