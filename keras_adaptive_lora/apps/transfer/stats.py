"""Statistics over seeds: means, standard errors, paired comparisons, and
the per-method summary of the per-seed rows.

Every method runs on the same seeds, and a seed fixes the few-shot sample,
the test examples, the head init and the shuffling for every method, so two
methods are compared on their per-seed *differences* (a paired comparison):
the mean difference and its standard error `std(d, ddof=1) / sqrt(n)`. A
difference "exceeds two standard errors" when `|mean| > 2 se`; with one seed
there is no standard error and nothing is marked.
"""

import math

import numpy as np

# Per-seed row fields averaged into the method's summary.
AVERAGED = ("test_accuracy", "val_accuracy", "train_accuracy", "ms_per_step")


def mean_se(values):
    """`(mean, standard error)` of `values`; the error is None for one value."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    return mean, float(values.std(ddof=1) / math.sqrt(len(values)))


def paired(a, b):
    """The paired comparison of per-seed values `a` and `b` (same seeds):
    `{"diff": mean(a - b), "se": its standard error (None for one seed),
    "exceeds_2se": bool}`."""
    diff, se = mean_se(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    exceeds = se is not None and abs(diff) > 2.0 * se
    if se == 0.0:  # identical differences on every seed
        exceeds = diff != 0.0
    return {"diff": diff, "se": se, "exceeds_2se": bool(exceeds)}


def _mean_map(maps):
    """Mean over seeds of `{key: number}` dicts (keys of the first)."""
    if not maps or not maps[0]:
        return {}
    out = {}
    for key in maps[0]:
        values = [m[key] for m in maps if key in m]
        mean = float(np.mean(values))
        out[key] = int(mean) if mean.is_integer() else mean
    return out


def summarize(runs):
    """One method's summary row from its per-seed rows (same method, one per
    seed): the averaged fields with their standard errors (`<field>_se`),
    the parameter counts (the same on every seed), per-layer ranks averaged
    over seeds, and the seeds."""
    first = runs[0]
    row = {
        "method": first["method"],
        "title": first["title"],
        "seeds": [r["seed"] for r in runs],
        "trainable_params": first["trainable_params"],
        "total_params": first["total_params"],
        "steps": first["steps"],
        "train_seconds": float(sum(r["train_seconds"] for r in runs)),
    }
    for field in AVERAGED:
        row[field], row[f"{field}_se"] = mean_se([r[field] for r in runs])
    for field in ("size", "targets", "schedule"):
        if field in first:
            row[field] = first[field]
    for field in ("ranks", "initial_ranks", "capacity", "update_stable_ranks"):
        if field in first:
            row[field] = _mean_map([r[field] for r in runs])
    return row


def compare(runs_by_method, metric="test_accuracy"):
    """Paired comparisons of every pair of methods on `metric`:
    `[{"a", "b", "diff" (a - b), "se", "exceeds_2se"}]`, over the seeds both
    ran."""
    names = list(runs_by_method)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            by_seed_a = {r["seed"]: r[metric] for r in runs_by_method[a]}
            by_seed_b = {r["seed"]: r[metric] for r in runs_by_method[b]}
            seeds = [s for s in by_seed_a if s in by_seed_b]
            if not seeds:
                continue
            result = paired([by_seed_a[s] for s in seeds], [by_seed_b[s] for s in seeds])
            out.append({"a": a, "b": b, "metric": metric, "seeds": seeds, **result})
    return out


def versus_best(rows, runs_by_method, metric="test_accuracy"):
    """Mark each summary row with its paired comparison to the row with the
    best mean `metric` (`row["vs_best"]`; None for the best itself). Returns
    the best method's name."""
    best = max(rows, key=lambda r: (r[metric], -r["trainable_params"]))["method"]
    reference = {r["seed"]: r[metric] for r in runs_by_method[best]}
    for row in rows:
        if row["method"] == best:
            row["vs_best"] = None
            continue
        own = {r["seed"]: r[metric] for r in runs_by_method[row["method"]]}
        seeds = [s for s in own if s in reference]
        row["vs_best"] = paired([own[s] for s in seeds], [reference[s] for s in seeds])
    return best
