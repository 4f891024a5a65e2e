"""The transfer job's plot: test accuracy vs trainable parameters (mean ±
standard error over the seeds, the exported method marked, a legend instead
of labels next to the points), and the per-layer rank map of each adapter
method whose ranks differ across layers, titled with its initial ranks and
capacity."""

import re

import numpy as np

from keras_adaptive_lora.apps.transfer.options import ROLE_ORDER, is_adapter_method
from keras_adaptive_lora.core.method import get_method

MARKERS = "osD^vP<>Xph*"
# Points whose parameter counts are within this factor are spread apart
# sideways (a matched budget puts every adapter method at the same count).
DODGE_WITHIN = 1.15
DODGE_STEP = 1.12


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


def dodged(counts):
    """x positions for `counts`: runs of counts within `DODGE_WITHIN` of
    each other are spread by factors of `DODGE_STEP` around their centre."""
    counts = np.asarray(counts, dtype=np.float64)
    x = counts.copy()
    order = np.argsort(counts, kind="stable")
    group = [order[0]] if len(order) else []
    groups = []
    for index in order[1:]:
        if counts[index] <= counts[group[0]] * DODGE_WITHIN:
            group.append(index)
        else:
            groups.append(group)
            group = [index]
    if group:
        groups.append(group)
    for group in (g for g in groups if len(g) > 1):
        centre = np.exp(np.mean(np.log(counts[group])))
        for k, index in enumerate(group):
            x[index] = centre * DODGE_STEP ** (k - (len(group) - 1) / 2)
    return x


def _span(values):
    values = sorted(set(int(v) for v in values))
    if not values:
        return "?"
    return str(values[0]) if len(values) == 1 else f"{values[0]}-{values[-1]}"


def rank_map_title(row):
    """The heatmap title: what the ranks are, with the initial ranks and
    the capacity per layer."""
    initial = row.get("initial_ranks") or row["ranks"]
    capacity = row.get("capacity") or initial
    seeds = len(row.get("seeds", [])) or 1
    if row.get("schedule"):
        what = f"rank per layer after training (mean of {seeds} seed{'s' * (seeds > 1)})"
    else:
        what = "rank per layer (set before training)"
    return f"{row['title']}: {what}\ninitial rank {_span(initial.values())}, capacity {_span(capacity.values())}"


def _cell_text(value, start, moved):
    final = f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    return f"{start:.0f}→{final}" if moved else final


def build_figure(rows, *, best=None, exported=True, title=""):
    """The figure (matplotlib, Agg): the accuracy axes and one rank map per
    adapter method with `per_layer_ranks` that ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heat = [r for r in rows if r.get("ranks") and has_rank_map(r["method"])]
    fig, axes = plt.subplots(1, 1 + len(heat), figsize=(6.4 + 4.4 * len(heat), 5.2), squeeze=False)
    ax = axes[0, 0]
    x = dodged([r["trainable_params"] for r in rows])
    for index, (r, xi) in enumerate(zip(rows, x)):
        marked = r["method"] == best
        label = r["title"] + (" (exported)" if marked and exported else " (best val)" if marked else "")
        se = r.get("test_accuracy_se")
        ax.errorbar(
            xi, r["test_accuracy"], yerr=None if se is None else se,
            fmt=MARKERS[index % len(MARKERS)], markersize=11 if marked else 7, capsize=3,
            markeredgecolor="k" if marked else None, markeredgewidth=1.8 if marked else 0.5,
            label=label,
        )
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    seeds = len(rows[0].get("seeds", [])) if rows else 0
    ax.set_ylabel("test accuracy" + (f" (mean ± s.e., {seeds} seeds)" if seeds > 1 else ""))
    ax.set_title("test accuracy vs trainable parameters", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    for ax, r in zip(axes[0, 1:], heat):
        blocks, roles, matrix = rank_grid(r["ranks"])
        start = rank_grid(r.get("initial_ranks") or r["ranks"])[2]
        # "initial→final" when ranks moved from per-layer starting ranks.
        per_layer_start = bool(r.get("schedule")) and len(set((r.get("initial_ranks") or {}).values())) > 1
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap="viridis", aspect="auto")
        middle = np.nanmean([np.nanmin(matrix), np.nanmax(matrix)])
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):  # dark text on the light (high) cells
                ax.text(j, i, _cell_text(value, start[i, j], per_layer_start), ha="center",
                        va="center", fontsize=8, color="k" if value > middle else "w")
        ax.set_xticks(range(len(roles)), roles, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=8)
        ax.set_title(rank_map_title(r), fontsize=8)
        fig.colorbar(image, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def overlapping_texts(fig):
    """Pairs of visible, non-empty texts of `fig` (titles, axis labels,
    legend entries, heatmap cells) whose drawn boxes overlap: `[(a, b)]`."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        legend = ax.get_legend()
        if legend is not None:
            texts += legend.get_texts()
    boxes = [
        (t.get_text(), t.get_window_extent(renderer))
        for t in texts
        if t is not None and t.get_visible() and t.get_text().strip()
    ]
    out = []
    for i, (a, box_a) in enumerate(boxes):
        for b, box_b in boxes[i + 1 :]:
            if box_a.overlaps(box_b):
                out.append((a, b))
    return out


def save_plot(rows, path, *, best=None, exported=True, title=""):
    """Write the figure of `build_figure` to `path` (PNG); returns `path`."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(
            "The transfer plot needs matplotlib: pip install 'keras-adaptive-lora[plot]' "
            "(or pass --no-plot)."
        ) from None
    import matplotlib.pyplot as plt

    fig = build_figure(rows, best=best, exported=exported, title=title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
