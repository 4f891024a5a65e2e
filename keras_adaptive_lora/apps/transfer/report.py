"""What the transfer job reports: `TransferResult` and the results table
(the plot is in `plot.py`)."""


class TransferResult:
    """What `run_transfer` did.

    Attributes:
        rows: one summary dict per method, in table order: `method`,
            `title`, `seeds`, `test_accuracy`, `val_accuracy`,
            `train_accuracy`, `ms_per_step` (means over the seeds) each with
            its standard error `<field>_se` (None for one seed),
            `trainable_params`, `total_params`, `steps`, `train_seconds`
            (all seeds), `vs_best` (the paired comparison with the method of
            the best mean test accuracy: `diff`, `se`, `exceeds_2se`; None
            for that method), and for adapter methods `size` (the size
            options it ran with), `targets`, `ranks` (`{layer path: rank}`
            after training, averaged over seeds), `initial_ranks`, and what
            the method's traits add: `capacity` (`per_layer_ranks`),
            `schedule` (its callbacks' settings), `update_stable_ranks`
            (`learned_rank`).
        runs: `{method: [one row per seed]}`, the per-seed figures (each
            row as above without the `_se` fields, plus `seed`).
        best: the method with the best mean validation accuracy (exported).
        best_seed: the seed of the exported model (that method's best
            validation accuracy).
        best_model: that model (adapters unmerged).
        budget: the matched budgets (`budget.BudgetMatch.record()`), or None
            with `budget="free"`.
        comparisons: paired comparisons of every pair of methods.
        config: the resolved options.
        output_dir: where the files are.
        results_path, plot_path, merged_path, saved_model_path, probe_path:
            the files written (None when not written).
        export_error: why the SavedModel export failed, or None.
        seconds: the run's wall time.
    """

    def __init__(self, **fields):
        self.rows = fields.pop("rows")
        self.runs = fields.pop("runs", {})
        self.best = fields.pop("best")
        self.best_seed = fields.pop("best_seed", None)
        self.best_model = fields.pop("best_model")
        self.budget = fields.pop("budget", None)
        self.comparisons = fields.pop("comparisons", [])
        self.config = fields.pop("config")
        self.output_dir = fields.pop("output_dir")
        self.results_path = fields.pop("results_path", None)
        self.plot_path = fields.pop("plot_path", None)
        self.merged_path = fields.pop("merged_path", None)
        self.saved_model_path = fields.pop("saved_model_path", None)
        self.probe_path = fields.pop("probe_path", None)
        self.export_error = fields.pop("export_error", None)
        self.seconds = fields.pop("seconds", None)
        self.extra = fields

    def row(self, method):
        """The summary row of `method`."""
        for row in self.rows:
            if row["method"] == method:
                return row
        raise KeyError(f"No row for method {method!r}; ran {[r['method'] for r in self.rows]}.")

    def table(self):
        """The results table as text."""
        return format_table(
            self.rows, best=self.best, exported=bool(self.config.get("export", True))
        )

    def __repr__(self):
        return self.table()


def _with_se(mean, se, digits=3):
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"


def _versus(row):
    vs = row.get("vs_best")
    if vs is None:
        return "best"
    text = f"{vs['diff']:+.3f}" if vs["se"] is None else f"{vs['diff']:+.3f} ± {vs['se']:.3f}"
    return text + (" †" if vs["exceeds_2se"] else "  ")


def format_table(rows, *, best=None, exported=True):
    """A text table, one line per method: test accuracy (mean ± standard
    error over the seeds), the paired difference from the method with the
    best mean test accuracy (marked † beyond two standard errors),
    validation accuracy, trainable parameters (and their share of the
    model), ms per training step; then what the marks mean."""
    headers = ("method", "test acc", "vs best", "val acc", "trainable params", "% of model", "ms/step")
    cells = []
    for r in rows:
        mark = " *" if r["method"] == best else ""
        cells.append(
            (
                f"{r['method']}{mark}",
                _with_se(r["test_accuracy"], r.get("test_accuracy_se")),
                _versus(r) if "vs_best" in r else "",
                f"{r['val_accuracy']:.3f}",
                f"{r['trainable_params']:,}",
                f"{100.0 * r['trainable_params'] / max(r['total_params'], 1):.2f}",
                f"{r['ms_per_step']:.1f}",
            )
        )
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(
            v.ljust(w) if i in (0, 2) else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        ).rstrip()

    rule = line(["-" * w for w in widths])
    out = [line(headers), rule, *(line(c) for c in cells), rule]
    seeds = rows[0].get("seeds", []) if rows else []
    if len(seeds) > 1:
        top = next((r["method"] for r in rows if r.get("vs_best", 0) is None), None)
        out.append(
            f"test acc: mean ± standard error over {len(seeds)} seeds "
            f"({', '.join(str(s) for s in seeds)}); vs best: paired difference from {top} "
            "(best mean test accuracy) ± its standard error; † beyond 2 standard errors"
        )
    elif seeds:
        out.append(f"one seed ({seeds[0]}): no standard errors (run several, e.g. --seeds 0,1,2)")
    if best is not None:
        out.append("* best mean validation accuracy" + (" (exported)" if exported else ""))
    return "\n".join(out)
