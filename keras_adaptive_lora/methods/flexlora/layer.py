"""FlexLoRA's adapter layer: an SVD-form update with a movable rank.

    ΔW = s · A · diag(λ ⊙ m) · B,   A (d_in, R), λ (R,), B (R, d_out), m ∈ {0, 1}^R

with a fixed capacity `R = max_rank` and a binary active mask `m` (a
non-trainable variable). Every rank change is a variable assignment, so shapes
never change: the compiled train step is not retraced and the optimizer keeps
its state. The `FlexLoRAScheduler` (`scheduler.py`) decides the moves.
"""

import random

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora._validation import check_alpha, check_number, check_positive_int, check_seed
from keras_adaptive_lora.core.adapter import PACKAGE, AdapterLayer
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.methods.lora import lora_scale
from keras_adaptive_lora.spectral import spectral_entropy_importance

#: Standard deviation of the Gaussian init of `A`, `B` and of expanded slots.
INIT_STDDEV = 0.02


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


def _check_active_rank(layer, active_rank, max_rank):
    active_rank = check_positive_int("active_rank", active_rank)
    if active_rank > max_rank:
        raise ValueError(
            f"Layer '{layer.name}': active_rank={active_rank} is larger than the "
            f"capacity max_rank={max_rank}; the capacity must hold the initially "
            "active components."
        )
    return active_rank


@keras.saving.register_keras_serializable(package=PACKAGE)
class FlexLoRAAdapter(AdapterLayer):
    """A frozen projection plus `s · A diag(λ ⊙ m) B` with a movable rank.

    Variables (float32): `flex_a` `(d_in, R)` and `flex_b` `(R, d_out)` drawn
    from `N(0, 0.02²)`, `flex_lambda` `(R,)` zeros (so the output is unchanged
    at the start), and non-trainable: `flex_mask` `(R,)` (the first
    `active_rank` entries 1), `flex_expansions` (a counter that seeds the noise of expanded
    slots) and `flex_step` (the last step the scheduler processed). All rank
    state is in variables, so a weights checkpoint restores it.

    The forward pass is factored: `((x A) · s λ m) B`, never the full matrix.
    The orthogonality penalty `||AₘᵀAₘ − I||²_F + ||BₘBₘᵀ − I||²_F` over the
    active components (paper eq. 2) is added with `add_loss`, times
    `orth_reg_weight`, at every call (like a Keras weight regularizer).

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank: the nominal rank `r_initial`: the components active at the
            start unless `active_rank` says otherwise, the default capacity
            and the scaling.
        max_rank: the capacity `R`. Defaults to `2 * rank` capped at
            `min(d_in, d_out)`.
        alpha: scaling numerator, `s = alpha / rank` (constant for the whole
            run, whatever the active rank later is, and the same with
            `active_rank`). Defaults to `rank`.
        orth_reg_weight: weight of the orthogonality penalty. Defaults to 0.1
            (the reference scripts' value); 0 switches it off.
        seed: seed of the noise drawn for expanded slots. Defaults to a seed
            drawn from Python's `random` (seeded by
            `keras.utils.set_random_seed`); stored in the config.
        active_rank: the components active at the start, in `[1, max_rank]`
            (`FlexLoRA(init_ranks="stable_rank")` sets one per layer).
            Defaults to `rank`.
    """

    factors = {"flex_a": "in", "flex_b": "out"}

    def __init__(
        self, layer, *, rank, max_rank=None, alpha=None, orth_reg_weight=0.1, seed=None,
        active_rank=None, **kwargs
    ):
        self.initial_rank = check_positive_int("rank", rank)
        check_rank(layer, self.initial_rank)
        self.max_rank = _check_max_rank(layer, self.initial_rank, max_rank)
        self.active_rank = (
            self.initial_rank if active_rank is None
            else _check_active_rank(layer, active_rank, self.max_rank)
        )
        self.alpha = check_alpha(alpha) if alpha is not None else float(rank)
        self.orth_reg_weight = check_number("orth_reg_weight", orth_reg_weight, minimum=0)
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
        mask[: self.active_rank] = 1.0
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

    def weighted_orth_penalty(self):
        """`orth_reg_weight` times the penalty, as a Python float: what this
        layer adds to the loss now (the scheduler logs the sum over layers
        as `flexlora/orth_penalty`)."""
        if not self.orth_reg_weight:
            return 0.0
        return float(ops.convert_to_numpy(self.orthogonality_penalty())) * self.orth_reg_weight

    def adapter_losses(self):
        if not self.orth_reg_weight:
            return []
        return [ops.multiply(self.orthogonality_penalty(), self.orth_reg_weight)]

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

    def capacity(self):
        """The capacity `R` (`max_rank`)."""
        return self.max_rank

    def low_rank_factors(self, *, svd_rank=None):
        """The update as `(a, b, error)`: numpy float32 factors of the active
        components only, `a (d_in, k)` and `b (k, d_out)` with the gains
        `s · λ` folded into `b`, so `a @ b == delta_kernel()`, and the
        relative error (0.0: exact). For PEFT files; `svd_rank` is ignored."""
        active = self.active_mask()
        gains = (self.singular_values() * np.float32(self.scale))[active]
        a = np.asarray(ops.convert_to_numpy(self.flex_a), "float32")[:, active]
        b = np.asarray(ops.convert_to_numpy(self.flex_b), "float32")[active]
        return a, (b * gains[:, None]).astype("float32"), 0.0

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
            "active_rank": self.active_rank,
            "max_rank": self.max_rank,
            "alpha": self.alpha,
            "orth_reg_weight": self.orth_reg_weight,
            "seed": self.seed,
        }


