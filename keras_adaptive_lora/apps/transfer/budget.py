"""Matched budgets (`--budget same`): every adapter method on the same layers
with the same number of adapter parameters, within `TOLERANCE`.

Generic over the method registry, no method named: a method is sized through
its *size option*, the first of `SIZE_OPTIONS` among its options:

- `budget` (a total adapter-parameter budget that the method fits its ranks
  under, e.g. SR-LoRA's): set to the matched count;
- `rank` (the rank, or the initial rank of a method that moves ranks): the
  integer whose parameter count is closest to the matched count.

Every count is the sum of the method's own `plan(layers)` parameters
(`LayerPlan.params`), so it includes whatever else a method trains per layer
besides its factors (LR-LoRA's transfer functions, FlexLoRA's spare capacity
and singular values). The matched count starts from the reference method's
(the first rank-sized one, at the job's `rank`) and moves to the nearest
count at which every method lands within `TOLERANCE` of every other
(largest / smallest - 1), so `--rank` keeps its meaning as far as the methods'
granularity allows. The classifier head, trained by every method, is not
counted here (it is the same for all).
"""

import math

from keras_adaptive_lora.core.method import get_method
from keras_adaptive_lora.surgery import match_targets
from keras_adaptive_lora.targets import detect_architecture

TOLERANCE = 0.05
SIZE_OPTIONS = ("budget", "rank")
# Candidate matched counts lie within this factor of the reference's.
WINDOW = 2.0
# At most this many plans of a budget-sized method are tried (each may
# compute stable ranks).
MAX_BUDGET_TRIES = 24


class Sizing:
    """How one method is sized: `options` (its size option and value, empty
    when it has none), `params` (adapter parameters), `plans` (one
    `LayerPlan` per target layer)."""

    def __init__(self, name, options, params, plans):
        self.name, self.options, self.params, self.plans = name, dict(options), int(params), list(plans)

    def describe(self):
        """`"rank 7"`, `"budget 21,504"` (or `"defaults"`)."""
        if not self.options:
            return "defaults"
        return ", ".join(f"{k} {v:,}" for k, v in self.options.items())

    def record(self):
        return {
            "options": self.options,
            "adapter_params": self.params,
            "ranks": [p.rank for p in self.plans],
            "capacities": [p.capacity for p in self.plans],
        }


class BudgetMatch:
    """The outcome of `match_budgets`: `targets` (layer names), `layers`
    (matched layer paths), `sizings` (`{method: Sizing}`), `spread`
    (largest / smallest adapter count - 1) and `within` (spread <=
    `TOLERANCE`)."""

    def __init__(self, targets, layers, sizings):
        self.targets, self.layers, self.sizings = list(targets), list(layers), dict(sizings)
        counts = [s.params for s in self.sizings.values()]
        self.spread = max(counts) / min(counts) - 1.0 if counts else 0.0
        self.within = self.spread <= TOLERANCE + 1e-12

    def options(self, method):
        """The size options of `method` (`{}` for a method not matched)."""
        sizing = self.sizings.get(method)
        return {} if sizing is None else dict(sizing.options)

    def lines(self):
        """Human-readable lines for the log."""
        head = (
            f"budget same: every adapter method on the same {len(self.layers)} layers "
            f"({', '.join(self.targets)}), adapter parameters matched within "
            f"{TOLERANCE:.0%} (spread {self.spread:.1%}):"
        )
        body = [
            f"  {name}: {s.describe()} -> {s.params:,} adapter parameters"
            for name, s in self.sizings.items()
        ]
        if not self.within:
            body.append(
                f"  WARNING: the counts differ by {self.spread:.1%}, more than {TOLERANCE:.0%}: "
                "no setting of the methods' size options matches closer on these layers."
            )
        return [head, *body]

    def record(self):
        return {
            "mode": "same",
            "targets": self.targets,
            "layers": self.layers,
            "tolerance": TOLERANCE,
            "spread": self.spread,
            "within_tolerance": self.within,
            "methods": {name: s.record() for name, s in self.sizings.items()},
        }


def size_option(name):
    """The size option of registered method `name` (see `SIZE_OPTIONS`), or None."""
    options = get_method(name).option_names()
    return next((o for o in SIZE_OPTIONS if o in options), None)


def common_targets(model, names):
    """The layer names that every method in `names` adapts by default on
    `model`'s architecture (the intersection of their default targets), in
    the first method's order. For a keras-hub ViT and the built-in methods:
    query and value."""
    architecture = detect_architecture(model)
    defaults = [tuple(get_method(name).default_targets.get(architecture, ())) for name in names]
    targets = [t for t in (defaults[0] if defaults else ()) if all(t in d for d in defaults)]
    if not targets:
        raise ValueError(
            f"The methods {', '.join(names)} share no default target on "
            f"{type(model).__name__}; pass the layers to adapt with `targets` "
            "(e.g. --targets query,value)."
        )
    return targets


def _plan(name, base, layers, size):
    spec = get_method(name).from_options(strict=False, **base, **size)
    plans = spec.plan(layers)
    return sum(p.params for p in plans), plans


def _rank_counts(name, base, layers, upper):
    """`[(count, rank, plans)]` for rank 1, 2, ... while the count stays
    under `upper` (and the rank is valid for every layer)."""
    base = {k: v for k, v in base.items() if k != "rank"}
    out, rank = [], 1
    while True:
        try:
            count, plans = _plan(name, base, layers, {"rank": rank})
        except ValueError:  # the rank exceeds a layer's min(d_in, d_out)
            break
        out.append((count, rank, plans))
        if count > upper:
            break
        rank += 1
    return out


def _closest(counts, target):
    return min(counts, key=lambda c: (abs(math.log(c[0] / target)), c[0]))


def match_budgets(model, names, *, rank, targets=None, base=None):
    """Size every adapter method in `names` to the same adapter-parameter
    count on the same layers of `model` (see the module docstring).

    Args:
        model: the model (or backbone) whose layers are adapted.
        names: registered adapter method names.
        rank: the reference rank (the job's `--rank`).
        targets: layer names or path patterns. Defaults to None: the
            layers every method adapts by default (`common_targets`).
        base: other options passed to every spec (e.g. `alpha`). Defaults
            to None.

    Returns:
        A `BudgetMatch`.
    """
    names = list(names)
    base = dict(base or {})
    targets = common_targets(model, names) if targets is None else list(targets)
    if not names:
        return BudgetMatch(targets, [], {})
    spec = get_method(names[0]).from_options(strict=False, **{k: v for k, v in base.items() if k != "rank"})
    layers = [layer for _, layer in match_targets(model, spec, targets)]
    paths = [layer.path for layer in layers]
    by_option = {name: size_option(name) for name in names}
    ranked = [n for n in names if by_option[n] == "rank"]
    budgeted = [n for n in names if by_option[n] == "budget"]
    fixed = {n: _plan(n, base, layers, {}) for n in names if by_option[n] is None}
    natural = {n: _plan(n, base, layers, {}) for n in budgeted}

    if ranked:
        reference, _ = _plan(ranked[0], base, layers, {"rank": rank})
    else:
        reference = min(c for c, _ in natural.values()) if natural else min(c for c, _ in fixed.values())
    upper = WINDOW * reference
    for count, _ in natural.values():  # a budget only scales ranks down
        upper = min(upper, count * (1 + TOLERANCE))
    counts = {n: _rank_counts(n, base, layers, WINDOW * upper) for n in ranked}
    candidates = sorted(
        {reference} | {c for n in ranked for c, _, _ in counts[n] if reference / WINDOW <= c <= upper},
        key=lambda c: (abs(math.log(c / reference)), c),
    )

    def sizings_at(target, budget_plans):
        out = {}
        for n in names:
            if n in counts:
                count, value, plans = _closest(counts[n], target)
                out[n] = Sizing(n, {"rank": value}, count, plans)
            elif n in fixed:
                out[n] = Sizing(n, {}, *fixed[n])
        if budgeted:
            cap = max([s.params for s in out.values()] or [int(target)])
            for n in budgeted:
                if (n, cap) not in budget_plans:
                    budget_plans[(n, cap)] = _plan(n, base, layers, {"budget": cap})
                out[n] = Sizing(n, {"budget": cap}, *budget_plans[(n, cap)])
        return {n: out[n] for n in names}

    best, tries, budget_plans = None, 0, {}
    for target in candidates:
        ranked_counts = [_closest(counts[n], target)[0] for n in ranked] + [c for c, _ in fixed.values()]
        if ranked_counts and max(ranked_counts) / min(ranked_counts) - 1 > TOLERANCE:
            if best is None or best[0] > max(ranked_counts) / min(ranked_counts) - 1:
                best = (max(ranked_counts) / min(ranked_counts) - 1, target)
            continue
        if budgeted and tries >= MAX_BUDGET_TRIES:
            break
        tries += 1
        match = BudgetMatch(targets, paths, sizings_at(target, budget_plans))
        if match.within:
            return match
        if best is None or best[0] > match.spread:
            best = (match.spread, target)
    target = best[1] if best is not None else reference
    return BudgetMatch(targets, paths, sizings_at(target, budget_plans))
