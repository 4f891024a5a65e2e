"""Reports of what a method does to a model, and the one table formatter
every report and command line table uses."""

import numpy as np

from keras_adaptive_lora.core.tree import layer_path


def format_table(headers, cells, *, left=2):
    """Rows of strings as an aligned text table: the first `left` columns
    left-aligned, the others right-aligned; a rule under the header.

    Returns:
        `(lines, rule)`: the header, the rule and one line per row, and the
        rule itself (to close the table).
    """
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(
            v.ljust(w) if i < left else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        )

    rule = line(["-" * w for w in widths])
    return [line(headers), rule, *(line(c) for c in cells)], rule


class RowReport:
    """Base of the per-layer reports: `rows` (one dict per layer, with a
    `rank`), iterable and indexable like a list of rows."""

    rows = ()

    @property
    def ranks(self):
        return [r["rank"] for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, index):
        return self.rows[index]


class AdapterReport(RowReport):
    """What `apply_adapters` did: one row per adapted layer, plus totals.

    Attributes:
        rows: list of dicts with keys `path`, `type`, `d_in`, `d_out`, `rank`,
            `params` (trainable adapter parameters).
        adapter_params: trainable parameters in adapters.
        train_also_params: trainable parameters of the `train_also` layers.
        trainable_params: all trainable parameters of the model.
        total_params: all parameters of the model.
    """

    def __init__(self, method, rows, train_also_params, trainable_params, total_params):
        self.method = method
        self.rows = rows
        self.adapter_params = int(sum(r["params"] for r in rows))
        self.train_also_params = int(train_also_params)
        self.trainable_params = int(trainable_params)
        self.total_params = int(total_params)

    @property
    def trainable_fraction(self):
        return self.trainable_params / max(self.total_params, 1)

    def __str__(self):
        headers = ("layer path", "type", "d_in", "d_out", "rank", "params")
        cells = [
            (r["path"], r["type"], str(r["d_in"]), str(r["d_out"]), str(r["rank"]), f"{r['params']:,}")
            for r in self.rows
        ]
        table, rule = format_table(headers, cells)
        out = [f"{self.method!r} on {len(self.rows)} layers", *table, rule]
        out.append(f"adapter params: {self.adapter_params:,}")
        if self.train_also_params:
            out.append(f"train_also params: {self.train_also_params:,}")
        out.append(
            f"trainable params: {self.trainable_params:,} || all params: "
            f"{self.total_params:,} || trainable%: {100 * self.trainable_fraction:.4f}"
        )
        return "\n".join(out)

    __repr__ = __str__


def _count(variables):
    return int(sum(np.prod(v.shape) for v in variables))


def build_report(model, method, adapters, train_also_layers=()):
    rows = [
        {
            "path": layer_path(a),
            "type": type(a.wrapped).__name__,
            "d_in": a.d_in,
            "d_out": a.d_out,
            "rank": int(a.rank()),
            "params": a.trainable_parameter_count(),
        }
        for a in adapters
    ]
    train_also_vars = {id(v): v for layer in train_also_layers for v in layer.trainable_weights}
    return AdapterReport(
        method,
        rows,
        _count(train_also_vars.values()),
        _count(model.trainable_weights),
        _count(model.weights),
    )


