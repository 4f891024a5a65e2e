"""Inspect a model before adapting it: per target layer, the kernel shape, its
`(d_in, d_out)` matrix view, its stable rank, and the rank (and adapter
parameters) that a method would give it.

`inspect_model` returns an `InspectionReport` (rows of dicts; `str()` gives the
table, see `format_report`); `load_model` opens a keras-hub preset folder, a
keras-hub preset name or a `.keras` file. The command line
`keras-adaptive-lora inspect SOURCE` wraps both.
"""

import os

import keras
import keras_hub

from keras_adaptive_lora.adapters.base import AdapterMethod, kernel_view
from keras_adaptive_lora.adapters.flexlora import FlexLoRA
from keras_adaptive_lora.adapters.lora import LoRA, check_rank
from keras_adaptive_lora.adapters.sinc import SincLoRA
from keras_adaptive_lora.adapters.stable_rank import StableRankLoRA, allocate_ranks
from keras_adaptive_lora.spectral import stable_rank
from keras_adaptive_lora.surgery import match_targets

#: Method names accepted by `make_method` and the CLI, and their spec classes.
METHODS = {"lora": LoRA, "sr-lora": StableRankLoRA, "flexlora": FlexLoRA, "sinc": SincLoRA}

_DISPLAY = {LoRA: "LoRA", StableRankLoRA: "SR-LoRA", FlexLoRA: "FlexLoRA", SincLoRA: "LR-LoRA (sinc)"}


def make_method(name, *, rank=None, budget=None, max_rank=None):
    """A method spec from a CLI-style name and the inspect options.

    Args:
        name: one of "lora", "sr-lora", "flexlora", "sinc".
        rank: the (initial) rank of lora, flexlora and sinc. Defaults to None
            (each method's default, 8). SR-LoRA derives its ranks from the
            stable ranks and takes no `rank`.
        budget: SR-LoRA's total adapter-parameter budget (ranks scaled down
            to fit). Defaults to None.
        max_rank: SR-LoRA's cap on every rank, or FlexLoRA's per-layer
            capacity `R`. Defaults to None.

    Returns:
        The `AdapterMethod` spec.
    """
    if name not in METHODS:
        raise ValueError(f"Unknown method {name!r}; choose one of {sorted(METHODS)}.")
    if name == "sr-lora":
        if rank is not None:
            raise ValueError(
                "SR-LoRA sets each layer's rank from its stable rank, so `rank` "
                "does not apply; use `max_rank` to cap the ranks or `budget` for "
                "a total parameter budget."
            )
        return StableRankLoRA(max_rank=max_rank, budget=budget)
    if budget is not None:
        raise ValueError(
            f"`budget` (a total adapter-parameter budget) applies to sr-lora only; "
            f"{name} uses the same `rank` on every layer (FlexLoRA keeps the total "
            "active rank, shown in the report, constant while it moves rank)."
        )
    kwargs = {} if rank is None else {"rank": rank}
    if name == "flexlora":
        return FlexLoRA(max_rank=max_rank, **kwargs)
    if max_rank is not None:
        raise ValueError(
            f"`max_rank` applies to sr-lora (a cap) and flexlora (the capacity); "
            f"{name} has a single `rank`."
        )
    return METHODS[name](**kwargs)


class InspectionReport:
    """Per-layer shapes, stable ranks and the rank plan of a method.

    Attributes:
        model_name: the model's class name and where it came from.
        method: the method spec the plan is for.
        rows: list of dicts with keys `path`, `type`, `kernel_shape`, `d_in`,
            `d_out`, `stable_rank`, `rank` (the rank the method gives the
            layer; FlexLoRA: active components at the start), `capacity`
            (FlexLoRA's `R`, else None) and `params` (the adapter's trainable
            parameters).
        adapter_params: sum of `params`: the trainable parameters once the
            method is applied (everything else is frozen).
        model_params: all parameters of the model before adapting.
    """

    def __init__(self, *, model_name, method, rows, model_params):
        self.model_name = model_name
        self.method = method
        self.rows = rows
        self.adapter_params = int(sum(r["params"] for r in rows))
        self.model_params = int(model_params)

    @property
    def ranks(self):
        return [r["rank"] for r in self.rows]

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __str__(self):
        return format_report(self)

    __repr__ = __str__


def _stable_rank_plan(method, sranks, views):
    """SR-LoRA's `(rank, None, params)` per layer: `allocate_ranks`, as in `plan_ranks`."""
    ranks = allocate_ranks(
        sranks,
        [(v.d_in, v.d_out) for v in views],
        max_rank=method.max_rank,
        budget=method.budget,
    )
    return [(r, None, r * (v.d_in + v.d_out)) for r, v in zip(ranks, views)]


def _fixed_rank_plan(method, layers, views):
    """`(rank, capacity, params)` per layer for lora / flexlora / sinc.

    The ranks are checked against each layer's shape as the adapters check
    them, so a rank that `apply_adapters` would refuse is refused here too.
    """
    out = []
    for layer, view in zip(layers, views):
        check_rank(layer, method.rank)
        if isinstance(method, FlexLoRA):
            if method.max_rank is None:
                capacity = min(2 * method.rank, view.d_in, view.d_out)
            else:
                check_rank(layer, method.max_rank, "max_rank")
                capacity = method.max_rank
            # A (d_in, R), lambda (R,), B (R, d_out).
            out.append((method.rank, capacity, capacity * (view.d_in + view.d_out + 1)))
        elif isinstance(method, SincLoRA):
            # A, B plus the transfer function's amplitudes and bandwidths.
            params = method.rank * (view.d_in + view.d_out) + 2 * method.grid_size
            out.append((method.rank, None, params))
        else:
            out.append((method.rank, None, method.rank * (view.d_in + view.d_out)))
    return out


def inspect_model(model, method="lora", *, rank=None, budget=None, max_rank=None,
                  targets=None, progress=None, model_name=None):
    """Shapes, stable ranks and the rank plan of `method` on `model`'s targets.

    The targets are matched exactly as `apply_adapters(model, method,
    targets)` matches them; the model is not changed. Each layer's stable
    rank (`keras_adaptive_lora.spectral.stable_rank` of the kernel's matrix
    view) is computed once; for SR-LoRA the ranks are then allocated with the
    same `allocate_ranks` call as `plan_ranks` / `apply_adapters` (budget and
    cap included), for the other methods they are the configured rank.

    Args:
        model: a built keras-hub backbone / task model or Keras model.
        method: a method name ("lora", "sr-lora", "flexlora", "sinc") or a
            method spec (`LoRA`, `StableRankLoRA`, `FlexLoRA`, `SincLoRA`).
            Defaults to "lora".
        rank: with a method name, see `make_method`. Defaults to None.
        budget: with a method name, see `make_method`. Defaults to None.
        max_rank: with a method name, see `make_method`. Defaults to None.
        targets: as in `apply_adapters`. Defaults to None (the method's
            default targets for the detected architecture).
        progress: optional callable `progress(done, total, path)`, called
            after each layer's stable rank. Defaults to None.
        model_name: the model's name in the report. Defaults to None (its
            class name).

    Returns:
        An `InspectionReport`.

    Example:
    ```python
    from keras_adaptive_lora.inspection import inspect_model
    print(inspect_model(backbone, "sr-lora", max_rank=64))
    ```
    """
    if isinstance(method, str):
        method = make_method(method, rank=rank, budget=budget, max_rank=max_rank)
    elif isinstance(method, tuple(METHODS.values())):
        if (rank, budget, max_rank) != (None, None, None):
            raise ValueError(
                "`rank`, `budget` and `max_rank` go with a method name; a method "
                f"spec ({method!r}) already carries its own."
            )
    else:
        kind = "an unsupported method spec" if isinstance(method, AdapterMethod) else "not a method"
        raise ValueError(
            f"`method` must be one of {sorted(METHODS)} or a LoRA / StableRankLoRA "
            f"/ FlexLoRA / SincLoRA spec; got {method!r} ({kind})."
        )
    if progress is not None and not callable(progress):
        raise ValueError(f"`progress` must be callable or None, got {progress!r}.")
    layers = [layer for _, layer in match_targets(model, method, targets)]
    views = [kernel_view(layer) for layer in layers]
    sr_lora = isinstance(method, StableRankLoRA)
    plan = None if sr_lora else _fixed_rank_plan(method, layers, views)  # checks first
    sranks = []
    for done, layer in enumerate(layers, 1):
        sranks.append(stable_rank(layer))
        if progress is not None:
            progress(done, len(layers), layer.path or layer.name)
    if sr_lora:
        plan = _stable_rank_plan(method, sranks, views)
    rows = [
        {
            "path": layer.path or layer.name,
            "type": type(layer).__name__,
            "kernel_shape": tuple(int(d) for d in layer.kernel.shape),
            "d_in": view.d_in,
            "d_out": view.d_out,
            "stable_rank": srank,
            "rank": int(rank),
            "capacity": capacity,
            "params": int(params),
        }
        for layer, view, srank, (rank, capacity, params) in zip(layers, views, sranks, plan)
    ]
    return InspectionReport(
        model_name=model_name or type(model).__name__,
        method=method,
        rows=rows,
        model_params=model.count_params(),
    )


def format_report(report):
    """The report as a text table with totals (what the CLI prints)."""
    flex = isinstance(report.method, FlexLoRA)
    headers = ("layer path", "kernel shape", "d_in x d_out", "stable rank",
               "rank/R" if flex else "rank", "params")
    cells = [
        (
            r["path"],
            "(" + ", ".join(str(d) for d in r["kernel_shape"]) + ")",
            f"{r['d_in']} x {r['d_out']}",
            f"{r['stable_rank']:.2f}",
            f"{r['rank']}/{r['capacity']}" if flex else str(r["rank"]),
            f"{r['params']:,}",
        )
        for r in report.rows
    ]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

    def line(values):
        return "  ".join(
            v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
        )

    name = _DISPLAY[type(report.method)]
    rule = line(["-" * w for w in widths])
    out = [
        f"{name} plan for {report.model_name}: {len(report.rows)} target layers ({report.method!r})",
        line(headers),
        rule,
        *(line(c) for c in cells),
        rule,
    ]
    share = 100.0 * report.adapter_params / max(report.model_params, 1)
    out.append(
        f"trainable (adapter) params: {report.adapter_params:,} || model params: "
        f"{report.model_params:,} || trainable%: {share:.4f}"
    )
    total_rank = sum(report.ranks)
    if flex:
        capacity = sum(r["capacity"] for r in report.rows)
        out.append(
            f"total active rank (FlexLoRA's budget, constant in training): {total_rank}; "
            f"capacity: {capacity}"
        )
    else:
        out.append(f"total rank: {total_rank}")
    return "\n".join(out)


def load_model(source):
    """Open a keras-hub backbone or a Keras model for inspection.

    Args:
        source: a keras-hub preset folder (with `config.json`, e.g. written by
            `Backbone.save_to_preset`; works offline), a `.keras` file, or a
            keras-hub preset name / handle (e.g.
            `"vit_base_patch16_224_imagenet21k"`, `"kaggle://..."`,
            `"hf://..."`; downloads).

    Returns:
        The model: a keras-hub `Backbone` for presets.
    """
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"`source` must be a path or a preset name; got {source!r}.")
    source = os.fspath(source)
    is_handle = source.startswith(("kaggle://", "hf://", "gs://", "modelscope://"))
    if is_handle or (not os.path.exists(source) and source in keras_hub.models.Backbone.presets):
        return keras_hub.models.Backbone.from_preset(source)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(
                f"Folder '{source}' is not a keras-hub preset: it has no config.json. "
                "Pass a folder written by `Backbone.save_to_preset(...)`, a `.keras` "
                "file, or a keras-hub preset name."
            )
        return keras_hub.models.Backbone.from_preset(source)
    if os.path.isfile(source):
        if not source.endswith(".keras"):
            raise ValueError(
                f"'{source}' is not a `.keras` file; pass a `.keras` model file, a "
                "keras-hub preset folder, or a keras-hub preset name."
            )
        return keras.saving.load_model(source, compile=False)
    raise ValueError(
        f"'{source}' does not exist and is not a keras-hub preset name. Pass a "
        "keras-hub preset folder (written by `Backbone.save_to_preset`), a `.keras` "
        "file, or a preset name such as 'vit_base_patch16_224_imagenet21k'."
    )


def inspect_source(source, method="lora", **kwargs):
    """`inspect_model(load_model(source), method, **kwargs)`, naming the source."""
    model = load_model(source)
    kwargs.setdefault("model_name", f"{type(model).__name__} from {os.fspath(source)}")
    return inspect_model(model, method, **kwargs)
