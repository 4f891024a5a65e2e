"""FlexLoRA (paper: "FlexLoRA: entropy-guided flexible low-rank adaptation"):
rank pruning and expansion under a global budget, guided by spectral entropy.

Each adapted projection holds an SVD-form update

    ΔW = s · A · diag(λ ⊙ m) · B,   A (d_in, R), λ (R,), B (R, d_out), m ∈ {0, 1}^R

with a fixed capacity `R = max_rank` and a binary active mask `m` (a
non-trainable variable). `rank` components are active at the start; the
`FlexLoRAScheduler` callback (`keras_adaptive_lora.callbacks`) moves active
components between layers during `fit`, keeping `Σ r_active` constant. Every
change is a variable assignment, so shapes never change: the compiled train
step is not retraced and the optimizer keeps its state.

This module also holds the two pure functions of the method, unit-tested on
their own: `spectral_entropy_importance` (paper eq. 3) and `budget_schedule`
(paper eq. 4, section 4.2).
"""

import math
import numbers
import random

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora.adapters.base import PACKAGE, AdapterLayer, AdapterMethod, kernel_view
from keras_adaptive_lora.adapters.lora import check_alpha, check_positive_int, check_rank, check_seed, lora_scale
from keras_adaptive_lora.targets import ALL_ROLES, role_targets

#: Standard deviation of the Gaussian init of `A`, `B` and of expanded slots.
INIT_STDDEV = 0.02
#: The `ε` of the importance score (paper eq. 3).
ENTROPY_EPS = 1e-12


# --------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------
def spectral_entropy_importance(singular_values, mask=None, eps=ENTROPY_EPS):
    """Normalized spectral entropy of the active singular values (paper eq. 3).

    `s_i = λ_i² / Σ_j λ_j²` and `I = −(1 / log r) Σ_i s_i log(s_i + ε)` over the
    `r` active components. Always finite: `I = 0` when `r <= 1` (the reference
    code divides by `log 1 = 0` and returns NaN, which its top-k then ranks
    first) and when every active `λ` is zero (no spectrum to measure).
    Computed in float64 numpy: it runs in the callback, outside the compiled
    train step.

    Args:
        singular_values: the `λ` vector, shape `(R,)` (array-like or tensor).
        mask: optional active mask, shape `(R,)`; nonzero entries are active.
            Defaults to all components active.
        eps: the `ε` inside the logarithm. Defaults to 1e-12.

    Returns:
        A Python float in `[0, 1]` (up to `ε`).

    Example:
    ```python
    spectral_entropy_importance([1.0, 1.0, 1.0])        # 1.0 (flat spectrum)
    spectral_entropy_importance([1.0, 0.0], [1, 1])     # ~0.0 (one direction)
    ```
    """
    lam = np.asarray(ops.convert_to_numpy(singular_values), dtype=np.float64).reshape(-1)
    if mask is not None:
        m = np.asarray(ops.convert_to_numpy(mask)).reshape(-1)
        if m.shape != lam.shape:
            raise ValueError(
                f"`mask` has shape {m.shape} but `singular_values` has shape "
                f"{lam.shape}; they must match."
            )
        lam = lam[m != 0]
    if not np.all(np.isfinite(lam)):
        raise ValueError(
            "The singular values contain NaN or inf; the importance score is "
            "undefined. Training has diverged (lower the learning rate, or add "
            "`keras.callbacks.TerminateOnNaN()`)."
        )
    r = lam.size
    energy = lam * lam
    total = float(energy.sum())
    if r <= 1 or not total > 0.0:
        return 0.0
    s = energy / total
    return float(-np.sum(s * np.log(s + eps)) / math.log(r))


def budget_schedule(step, *, b0, total_steps, warmup_steps, final_steps, interval):
    """The number of components to move at `step` (paper eq. 4), 0 if none.

    Reallocation happens at steps `t` with `t > warmup_steps`,
    `(t − warmup_steps) % interval == 0` and `t < total_steps − final_steps`;
    there `b(t) = round(b0 · (1 − p)³)` with
    `p = clip((t − warmup_steps) / (total_steps − final_steps − warmup_steps), 0, 1)`.
    `round` is Python's (half to even). Steps count completed optimizer
    updates (`optimizer.iterations` after the update).

    Args:
        step: the step `t` (int).
        b0: the initial budget.
        total_steps: `T`.
        warmup_steps: `t_warmup`, steps before the first reallocation.
        final_steps: `t_final`, steps at the end with frozen ranks.
        interval: `Δt`, steps between reallocations.

    Returns:
        A Python int in `[0, b0]`.
    """
    t = int(step)
    span = total_steps - final_steps - warmup_steps
    if span <= 0:
        return 0
    if not (t > warmup_steps and t < total_steps - final_steps):
        return 0
    if (t - warmup_steps) % interval:
        return 0
    p = min(max((t - warmup_steps) / span, 0.0), 1.0)
    return int(round(b0 * (1.0 - p) ** 3))


# --------------------------------------------------------------------------
# The adapter layer
# --------------------------------------------------------------------------
def _check_max_rank(layer, rank, max_rank):
    view = kernel_view(layer)
    limit = min(view.d_in, view.d_out)
    if max_rank is None:
        return min(2 * rank, limit)
    max_rank = check_positive_int("max_rank", max_rank)
    check_rank(layer, max_rank, "max_rank")
    if max_rank < rank:
        raise ValueError(
            f"Layer '{layer.name}': max_rank={max_rank} is smaller than "
            f"rank={rank}; the capacity must hold the initially active components."
        )
    return max_rank


def _check_weight(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
        raise ValueError(f"`orth_reg_weight` must be a number >= 0, got {value!r}.")
    return float(value)


@keras.saving.register_keras_serializable(package=PACKAGE)
class FlexLoRAAdapter(AdapterLayer):
    """A frozen projection plus `s · A diag(λ ⊙ m) B` with a movable rank.

    Variables (float32): `flex_a` `(d_in, R)` and `flex_b` `(R, d_out)` drawn
    from `N(0, 0.02²)`, `flex_lambda` `(R,)` zeros (so the output is unchanged
    at the start), and non-trainable: `flex_mask` `(R,)` (the first `rank`
    entries 1), `flex_expansions` (a counter that seeds the noise of expanded
    slots) and `flex_step` (the last step the scheduler processed). All rank
    state is in variables, so a weights checkpoint restores it.

    The forward pass is factored: `((x A) · s λ m) B`, never the full matrix.
    The orthogonality penalty `||AₘᵀAₘ − I||²_F + ||BₘBₘᵀ − I||²_F` over the
    active components (paper eq. 2) is added with `add_loss`, times
    `orth_reg_weight`, at every call (like a Keras weight regularizer).

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank: components active at the start, `r_initial`.
        max_rank: the capacity `R`. Defaults to `2 * rank` capped at
            `min(d_in, d_out)`.
        alpha: scaling numerator, `s = alpha / rank` (constant for the whole
            run, whatever the active rank later is). Defaults to `rank`.
        orth_reg_weight: weight of the orthogonality penalty. Defaults to 0.1
            (the reference scripts' value); 0 switches it off.
        seed: seed of the noise drawn for expanded slots. Defaults to a seed
            drawn from Python's `random` (seeded by
            `keras.utils.set_random_seed`); stored in the config.
    """

    def __init__(
        self, layer, *, rank, max_rank=None, alpha=None, orth_reg_weight=0.1, seed=None, **kwargs
    ):
        self.initial_rank = check_positive_int("rank", rank)
        check_rank(layer, self.initial_rank)
        self.max_rank = _check_max_rank(layer, self.initial_rank, max_rank)
        self.alpha = check_alpha(alpha) if alpha is not None else float(rank)
        self.orth_reg_weight = _check_weight(orth_reg_weight)
        seed = check_seed(seed)
        self.seed = seed if seed is not None else random.randint(0, 2**31 - 1)
        super().__init__(layer, **kwargs)

    @property
    def scale(self):
        return lora_scale(self.alpha, self.initial_rank)

    def build_adapter(self):
        # autocast=False: read in float32 inside `call` under mixed precision
        # too, so the orthogonality penalty is a float32 loss (a bfloat16
        # loss cannot be summed with a float32 one on tensorflow);
        # `delta_output` casts to the compute dtype itself.
        init = keras.initializers.RandomNormal(stddev=INIT_STDDEV)
        self.flex_a = self.add_adapter_weight(
            "flex_a", (self.d_in, self.max_rank), init, autocast=False
        )
        self.flex_lambda = self.add_adapter_weight(
            "flex_lambda", (self.max_rank,), "zeros", autocast=False
        )
        self.flex_b = self.add_adapter_weight(
            "flex_b", (self.max_rank, self.d_out), init, autocast=False
        )
        mask = np.zeros((self.max_rank,), "float32")
        mask[: self.initial_rank] = 1.0
        self.flex_mask = self.add_adapter_weight(
            "flex_mask",
            (self.max_rank,),
            keras.initializers.Constant(mask),
            trainable=False,
            autocast=False,
        )
        self.flex_expansions = self.add_weight(
            name="flex_expansions", shape=(), initializer="zeros", dtype="int32", trainable=False
        )
        self.flex_step = self.add_weight(
            name="flex_step", shape=(), initializer="zeros", dtype="int32", trainable=False
        )

    # The update -----------------------------------------------------------------
    def _gains(self):
        """`s · λ ⊙ m`, float32, shape `(R,)`."""
        return ops.multiply(ops.multiply(self.flex_lambda, self.flex_mask), self.scale)

    def delta_kernel(self):
        scaled_a = ops.multiply(self.flex_a, ops.expand_dims(self._gains(), 0))
        return ops.matmul(scaled_a, self.flex_b)

    def delta_output(self, inputs, training=None):
        a = ops.cast(self.flex_a, self.compute_dtype)
        b = ops.cast(self.flex_b, self.compute_dtype)
        h = self.view.down(inputs, a)  # (..., R): the rank axis is last
        h = ops.multiply(h, ops.cast(self._gains(), self.compute_dtype))
        return self.view.up(h, b)

    def orthogonality_penalty(self):
        """`||AₘᵀAₘ − diag(m)||²_F + ||BₘBₘᵀ − diag(m)||²_F` (float32 scalar).

        `Aₘ`, `Bₘ` are `A`, `B` with inactive components zeroed, so only
        active components are constrained (paper eq. 2 over the active set).
        """
        m = self.flex_mask
        eye = ops.diag(m)
        a = ops.multiply(self.flex_a, ops.expand_dims(m, 0))
        b = ops.multiply(self.flex_b, ops.expand_dims(m, 1))
        gram_a = ops.subtract(ops.matmul(ops.transpose(a), a), eye)
        gram_b = ops.subtract(ops.matmul(b, ops.transpose(b)), eye)
        return ops.add(ops.sum(ops.square(gram_a)), ops.sum(ops.square(gram_b)))

    def call(self, inputs, training=None, **kwargs):
        if self.orth_reg_weight:
            self.add_loss(ops.multiply(self.orthogonality_penalty(), self.orth_reg_weight))
        return super().call(inputs, training=training, **kwargs)

    # Rank state (host side, used by the scheduler) ------------------------------
    def active_mask(self):
        """The active mask as a numpy bool array of shape `(R,)`."""
        return np.asarray(ops.convert_to_numpy(self.flex_mask)) > 0.5

    def singular_values(self):
        """`λ` as a numpy float32 array of shape `(R,)` (inactive entries too)."""
        return np.asarray(ops.convert_to_numpy(self.flex_lambda))

    def rank(self):
        """The number of active components."""
        return int(self.active_mask().sum())

    def importance(self):
        """The spectral entropy importance of the active components."""
        return spectral_entropy_importance(self.singular_values(), self.active_mask())

    def prune_component(self):
        """Switch off the active component with the smallest `|λ|`.

        Ties go to the lowest index. Only the mask changes; the component's
        values stay (masked out of the forward pass, the penalty and merge).

        Returns:
            The index of the pruned component.
        """
        mask = self.active_mask()
        if mask.sum() <= 1:
            raise ValueError(
                f"Layer '{self.name}' has a single active component; it cannot be pruned."
            )
        magnitude = np.where(mask, np.abs(self.singular_values()), np.inf)
        index = int(np.argmin(magnitude))
        mask[index] = False
        self.flex_mask.assign(mask.astype("float32"))
        return index

    def expand_component(self):
        """Switch on the first free slot with zero-impact init.

        The slot gets `λ = 0` and a fresh `N(0, 0.02²)` column of `A` and row
        of `B`, so the layer's output is unchanged at this moment while the
        new direction receives gradient at the next step. The noise comes from
        numpy seeded by `(seed, expansion counter)`: the same on every
        backend and reproduced exactly after a checkpoint restore.

        Returns:
            The index of the expanded slot.
        """
        mask = self.active_mask()
        free = np.flatnonzero(~mask)
        if free.size == 0:
            raise ValueError(
                f"Layer '{self.name}' has all max_rank={self.max_rank} components "
                "active; it cannot be expanded."
            )
        index = int(free[0])
        count = int(ops.convert_to_numpy(self.flex_expansions))
        rng = np.random.default_rng([self.seed, count])
        a = np.array(ops.convert_to_numpy(self.flex_a))
        b = np.array(ops.convert_to_numpy(self.flex_b))
        lam = np.array(ops.convert_to_numpy(self.flex_lambda))
        a[:, index] = rng.normal(0.0, INIT_STDDEV, size=self.d_in)
        b[index, :] = rng.normal(0.0, INIT_STDDEV, size=self.d_out)
        lam[index] = 0.0
        mask[index] = True
        self.flex_a.assign(a.astype("float32"))
        self.flex_b.assign(b.astype("float32"))
        self.flex_lambda.assign(lam.astype("float32"))
        self.flex_mask.assign(mask.astype("float32"))
        self.flex_expansions.assign(count + 1)
        return index

    def component_slices(self, index):
        """`{variable: (axis, index)}`: where component `index` lives in each
        trainable variable (used to reset optimizer slots)."""
        return {
            id(self.flex_a): (1, index),
            id(self.flex_lambda): (0, index),
            id(self.flex_b): (0, index),
        }

    def adapter_config(self):
        return {
            "rank": self.initial_rank,
            "max_rank": self.max_rank,
            "alpha": self.alpha,
            "orth_reg_weight": self.orth_reg_weight,
            "seed": self.seed,
        }


def find_flexlora_adapters(model):
    """All `FlexLoRAAdapter`s of `model`, in walk order."""
    from keras_adaptive_lora.surgery import find_adapters  # surgery imports adapters

    return [a for a in find_adapters(model) if isinstance(a, FlexLoRAAdapter)]


def rank_pattern(model):
    """`{layer path: active rank}` of every FlexLoRA adapter in `model`."""
    return {a.path: a.rank() for a in find_flexlora_adapters(model)}


# --------------------------------------------------------------------------
# The method spec
# --------------------------------------------------------------------------
class FlexLoRA(AdapterMethod):
    """FlexLoRA: SVD-form LoRA whose ranks move between layers during training.

    Wraps each target with a `FlexLoRAAdapter` of capacity `max_rank` and
    `rank` active components. Train with `fit` and a
    `keras_adaptive_lora.callbacks.FlexLoRAScheduler` in the callbacks: it
    prunes and expands components under a constant total rank (paper §3).

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
    from keras_adaptive_lora.callbacks import FlexLoRAScheduler
    report = kal.apply_adapters(backbone, kal.FlexLoRA(rank=4))
    model.compile(optimizer="adam", loss=...)
    scheduler = FlexLoRAScheduler(1000, b0=4, warmup_steps=100, final_steps=200, interval=10)
    model.fit(data, epochs=..., callbacks=[scheduler])
    print(scheduler.rank_pattern)
    ```
    """

    name = "flexlora"
    default_targets = role_targets(*ALL_ROLES)

    def __init__(self, *, rank=8, max_rank=None, alpha=None, orth_reg_weight=0.1, seed=None):
        self.rank = check_positive_int("rank", rank)
        self.max_rank = None if max_rank is None else check_positive_int("max_rank", max_rank)
        if self.max_rank is not None and self.max_rank < self.rank:
            raise ValueError(
                f"`max_rank` ({self.max_rank}) must be at least `rank` ({self.rank})."
            )
        self.alpha = check_alpha(alpha)
        self.orth_reg_weight = _check_weight(orth_reg_weight)
        self.seed = check_seed(seed)

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

    def get_config(self):
        return {
            "rank": self.rank,
            "max_rank": self.max_rank,
            "alpha": self.alpha,
            "orth_reg_weight": self.orth_reg_weight,
            "seed": self.seed,
        }
