"""What the transfer job reports: `TransferResult`, the results table, and
the plot (accuracy vs trainable parameters, and the per-layer rank map of
each adapter method whose ranks differ across layers)."""

import re

import numpy as np

from keras_adaptive_lora.apps.transfer.options import ROLE_ORDER, is_adapter_method
from keras_adaptive_lora.core.method import get_method


class TransferResult:
    """What `run_transfer` did.

    Attributes:
        rows: one dict per method, in table order: `method`, `title`,
            `test_accuracy`, `val_accuracy`, `train_accuracy`,
            `trainable_params`, `total_params`, `ms_per_step`, `steps`,
            `train_seconds`, `ranks` (`{layer path: rank}` of the adapters,
            empty for `linear`/`full`/`scratch`), and extras that follow the
            method's declared traits: `capacity` (`{layer path: most
            components}`) for a method with `per_layer_ranks`, and its
            `initial_rank` when it takes a rank; `schedule` (its callbacks'
            settings) when it trains with callbacks; `update_stable_ranks`
            for a method with a `learned_rank`.
        best: the method with the best validation accuracy (exported).
        best_model: that method's trained model (adapters unmerged).
        config: the resolved options.
        output_dir: where the files are.
        results_path, plot_path, merged_path, saved_model_path, probe_path:
            the files written (None when not written).
        export_error: why the SavedModel export failed, or None.
    """

    def __init__(self, **fields):
        self.rows = fields.pop("rows")
        self.best = fields.pop("best")
        self.best_model = fields.pop("best_model")
        self.config = fields.pop("config")
        self.output_dir = fields.pop("output_dir")
        self.results_path = fields.pop("results_path", None)
        self.plot_path = fields.pop("plot_path", None)
        self.merged_path = fields.pop("merged_path", None)
        self.saved_model_path = fields.pop("saved_model_path", None)
        self.probe_path = fields.pop("probe_path", None)
        self.export_error = fields.pop("export_error", None)
        self.extra = fields

    def row(self, method):
        """The row of `method`."""
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(f"No row for method {method!r}; ran {[r['method'] for r in self.rows]}.")

    def table(self):
        """The results table as text."""
        return format_table(self.rows, best=self.best)

    def __repr__(self):
        return self.table()


def format_table(rows, *, best=None):
    """A text table: method, test / validation accuracy, trainable
    parameters (and their share of the model), ms per training step."""
    headers = ("method", "test acc", "val acc", "trainable params", "% of model", "ms/step")
    cells = []
    for r in rows:
        mark = " *" if r["method"] == best else ""
        cells.append(
            (
                f"{r['method']}{mark}",
                f"{r['test_accuracy']:.3f}",
                f"{r['val_accuracy']:.3f}",
                f"{r['trainable_params']:,}",
                f"{100.0 * r['trainable_params'] / max(r['total_params'], 1):.2f}",
                f"{r['ms_per_step']:.1f}",
            )
        )
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(
            v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        )

    rule = line(["-" * w for w in widths])
    out = [line(headers), rule, *(line(c) for c in cells), rule]
    if best is not None:
        out.append("* best validation accuracy (exported)")
    return "\n".join(out)


def _role(path):
    return path.rsplit("/", 1)[-1]


def _block(path):
    match = re.search(r"transformer_block_(\d+)", path)
    return int(match.group(1)) if match else path.rsplit("/", 1)[0]


def has_rank_map(method):
    """Whether the plot shows `method`'s per-layer ranks: an adapter method
    whose ranks differ across layers (`per_layer_ranks`)."""
    return is_adapter_method(method) and bool(get_method(method).per_layer_ranks)


def rank_grid(ranks):
    """`(blocks, roles, matrix)` of a `{layer path: rank}` dict: one row per
    transformer block, one column per projection name (NaN: not adapted)."""
    blocks, roles = [], []
    for path in ranks:
        block, role = _block(path), _role(path)
        if block not in blocks:
            blocks.append(block)
        if role not in roles:
            roles.append(role)
    roles.sort(key=lambda r: (ROLE_ORDER.index(r) if r in ROLE_ORDER else len(ROLE_ORDER), r))
    matrix = np.full((len(blocks), len(roles)), np.nan)
    for path, rank in ranks.items():
        matrix[blocks.index(_block(path)), roles.index(_role(path))] = rank
    return blocks, roles, matrix


def save_plot(rows, path, *, title=""):
    """Accuracy vs trainable parameters per method, and the per-layer rank
    heatmap of each adapter method with `per_layer_ranks` that ran, in one
    PNG."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError(
            "The transfer plot needs matplotlib: pip install 'keras-adaptive-lora[plot]' "
            "(or pass --no-plot)."
        ) from None
    heat = [r for r in rows if r["ranks"] and has_rank_map(r["method"])]
    fig, axes = plt.subplots(
        1, 1 + len(heat), figsize=(6 + 4.2 * len(heat), 4.6), squeeze=False
    )
    ax = axes[0, 0]
    for r in rows:
        ax.scatter(r["trainable_params"], r["test_accuracy"], s=40)
        ax.annotate(
            r["title"], (r["trainable_params"], r["test_accuracy"]),
            textcoords="offset points", xytext=(5, 4), fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy vs trainable parameters", fontsize=9)
    ax.grid(True, alpha=0.3)
    for ax, r in zip(axes[0, 1:], heat):
        blocks, roles, matrix = rank_grid(r["ranks"])
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(roles)), roles, rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=7)
        # Ranks moved by the method's callbacks, or set when it was applied.
        note = " (after training)" if r.get("schedule") else " (as allocated)"
        ax.set_title(f"{r['title']} rank per layer{note}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


