"""Plain LoRA (Hu et al., 2021): the baseline every adaptive method builds on.

`y = act(x W + b + s · (x A) B)` with `A (d_in, r)` Kaiming-uniform, `B (r, d_out)`
zeros (so the output is unchanged at initialization) and `s = alpha / r`
(or `alpha / sqrt(r)` with `rslora=True`). The forward pass is factored: two
small einsums in the layer's own axes, never the full `A B` product.
"""

import dataclasses
import math

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora._validation import check_alpha, check_bool, check_dropout, check_positive_int
from keras_adaptive_lora.core.adapter import PACKAGE, AdapterLayer
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, LayerPlan, register_method
from keras_adaptive_lora.targets import role_targets


def lora_scale(alpha, rank, rslora=False):
    """The LoRA scaling: `alpha / r`, or `alpha / sqrt(r)` for rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


@keras.saving.register_keras_serializable(package=PACKAGE)
class LoRAAdapter(AdapterLayer):
    """A frozen projection plus a factored rank-`rank` update `s · A B`.

    Args:
        layer: the built `Dense`/`EinsumDense` to wrap.
        rank: number of rank components `r`.
        alpha: scaling numerator. Defaults to `rank` (so `s = 1`, as Keras's
            built-in LoRA).
        dropout: dropout rate on the adapter's input path, in training.
            Defaults to 0.
        rslora: scale by `alpha / sqrt(r)` instead of `alpha / r`.
            Defaults to False.
    """

    factors = {"lora_a": "in", "lora_b": "out"}

    def __init__(self, layer, *, rank, alpha=None, dropout=0.0, rslora=False, **kwargs):
        self.lora_rank = check_positive_int("rank", rank)
        self.alpha = check_alpha(alpha) if alpha is not None else float(rank)
        self.dropout = check_dropout(dropout)
        self.rslora = bool(rslora)
        check_rank(layer, self.lora_rank)
        super().__init__(layer, **kwargs)

    @property
    def scale(self):
        return lora_scale(self.alpha, self.lora_rank, self.rslora)

    def build_adapter(self):
        self.lora_a = self.add_adapter_weight(
            "lora_a", (self.d_in, self.lora_rank), keras.initializers.HeUniform()
        )
        self.lora_b = self.add_adapter_weight(
            "lora_b", (self.lora_rank, self.d_out), "zeros"
        )
        self._dropout_layer = (
            keras.layers.Dropout(self.dropout, name="lora_dropout") if self.dropout else None
        )

    def delta_kernel(self):
        return self.scale * ops.matmul(self.lora_a, self.lora_b)

    def delta_output(self, inputs, training=None):
        if self._dropout_layer is not None:
            inputs = self._dropout_layer(inputs, training=training)
        a = ops.cast(self.lora_a, self.compute_dtype)
        b = ops.cast(self.lora_b, self.compute_dtype)
        # Scale the small (..., r) activation, not the (..., d_out) output.
        h = ops.multiply(self.view.down(inputs, a), self.scale)
        return self.view.up(h, b)

    def rank(self):
        return self.lora_rank

    def low_rank_factors(self, *, svd_rank=None):
        """The update as `(a, b, error)`: numpy float32 factors `a (d_in, r)`,
        `b (r, d_out)` with `a @ b == delta_kernel()` (the scaling folded into
        `b`), and the relative error they leave (0.0: exact). What PEFT files
        hold (`save_peft_adapters`); `svd_rank` is for updates that are not
        low-rank, LoRA's is exact and ignores it."""
        a = np.asarray(ops.convert_to_numpy(self.lora_a), "float32")
        b = np.asarray(ops.convert_to_numpy(self.lora_b), "float32")
        return a, b * np.float32(self.scale), 0.0

    def adapter_config(self):
        return {
            "rank": self.lora_rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "rslora": self.rslora,
        }


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class LoRA(AdapterMethod):
    """Plain LoRA, the baseline.

    Args:
        rank: the rank `r` of every adapted layer. Defaults to 8.
        alpha: scaling numerator, `s = alpha / r`. Defaults to `rank` (`s = 1`).
        dropout: dropout rate on the adapter path. Defaults to 0.
        rslora: use `s = alpha / sqrt(r)` (rank-stabilized LoRA).
            Defaults to False.

    Default targets: the query and value projections (as in the LoRA paper and
    keras-hub's `enable_lora`).

    Example:
    ```python
    import keras, keras_adaptive_lora as kal
    dense = keras.layers.Dense(16); dense.build((None, 32))
    adapter = kal.LoRA(rank=4).wrap(dense)
    merged = adapter.merge()  # a plain Dense again
    ```
    """

    name = "lora"
    title = "LoRA"
    layer_class = LoRAAdapter
    default_targets = role_targets("query", "value")

    rank: int = 8
    alpha: float = None
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self):
        self._set("rank", check_positive_int("rank", self.rank))
        self._set("alpha", check_alpha(self.alpha))
        self._set("dropout", check_dropout(self.dropout))
        self._set("rslora", check_bool("rslora", self.rslora))

    def wrap(self, layer):
        return LoRAAdapter(
            layer, rank=self.rank, alpha=self.alpha, dropout=self.dropout, rslora=self.rslora
        )

    def plan(self, layers):
        out = []
        for layer in layers:
            check_rank(layer, self.rank)
            view = kernel_view(layer)
            out.append(LayerPlan(self.rank, self.rank, self.rank * (view.d_in + view.d_out)))
        return out
