"""Inspect a model before adapting it: per target layer, the kernel shape, its
`(d_in, d_out)` matrix view, its stable rank, and the rank (and adapter
parameters) that a method would give it; and the diagnostics of trained
adapters (`update_stable_ranks`).

One planning path: every method's `plan(layers)` (`core.method`). The
method names come from the registry, so a new method is inspectable as soon
as it registers. `inspect_model` returns an `InspectionReport`; `load_model`
opens a keras-hub preset folder, a keras-hub preset name or a `.keras` file.
The command line `keras-adaptive-lora inspect SOURCE` wraps both.
"""

import os

import keras
import keras_hub

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.kernel_view import kernel_view
from keras_adaptive_lora.core.method import AdapterMethod, get_method, method_names, method_of
from keras_adaptive_lora.core.tree import find_adapters
from keras_adaptive_lora import methods as _methods  # noqa: F401  (registers the built-in methods)
from keras_adaptive_lora.methods.sr_lora import StableRankLoRA
from keras_adaptive_lora.reports import RowReport, format_table
from keras_adaptive_lora.spectral import stable_rank
from keras_adaptive_lora.surgery import match_targets


def make_method(name, **options):
    """A method spec from a registered name and generic options.

    Args:
        name: a registered method name (see `method_names()`).
        **options: the spec's options (`rank`, `budget`, `max_rank`, ...);
            None leaves an option at the method's default. An option the
            method does not have raises a `ValueError` that lists its options
            and the methods that have it.

    Returns:
        The `AdapterMethod` spec.
    """
    return get_method(name).from_options(**options)


class InspectionReport(RowReport):
    """Per-layer shapes, stable ranks and the rank plan of a method.

    Attributes:
        model_name: the model's class name and where it came from.
        method: the method spec the plan is for.
        rows: list of dicts with keys `path`, `type`, `kernel_shape`, `d_in`,
            `d_out`, `stable_rank`, `rank` (the rank the method gives the
            layer; FlexLoRA: active components at the start), `capacity`
            (the most components the layer can hold: FlexLoRA's `R`, else the
            rank) and `params` (the adapter's trainable parameters).
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


    def __str__(self):
        return format_report(self)

    __repr__ = __str__


class RankPlan(RowReport):
    """The per-layer SR-LoRA plan: what `apply_adapters` would do.

    Attributes:
        method: the `StableRankLoRA` spec.
        rows: list of dicts with keys `path`, `type`, `shape` (the
            `(d_in, d_out)` matrix view), `stable_rank`, `rank` and `params`
            (adapter parameters `rank * (d_in + d_out)`).
        total_params: sum of `params`.
    """

    def __init__(self, method, rows):
        self.method = method
        self.rows = rows
        self.total_params = int(sum(r["params"] for r in rows))



    def __str__(self):
        headers = ("layer path", "type", "shape", "stable rank", "rank", "params")
        cells = [
            (
                r["path"],
                r["type"],
                f"{r['shape'][0]}x{r['shape'][1]}",
                f"{r['stable_rank']:.2f}",
                str(r["rank"]),
                f"{r['params']:,}",
            )
            for r in self.rows
        ]
        table, rule = format_table(headers, cells)
        out = [f"{self.method!r} plan for {len(self.rows)} layers", *table]
        out += [rule, f"adapter params: {self.total_params:,}"]
        return "\n".join(out)

    __repr__ = __str__


def plan_ranks(model, method, targets=None):
    """The SR-LoRA rank plan for `model`, without changing it.

    Matches targets exactly as `apply_adapters(model, method, targets)` does
    and computes each layer's stable rank and allocated rank (budget
    included), so the plan equals what applying the method gives.

    Args:
        model: a built Keras model or keras-hub backbone / task model.
        method: a `StableRankLoRA` spec.
        targets: as in `apply_adapters`. Defaults to the method's defaults for
            the detected architecture.

    Returns:
        A `RankPlan` (print it for a table; iterate it for row dicts).

    Example:
    ```python
    plan = plan_ranks(backbone, StableRankLoRA(budget=1_000_000))
    print(plan)
    ```
    """
    if not isinstance(method, StableRankLoRA):
        raise ValueError(
            "`plan_ranks` needs a StableRankLoRA spec (its ranks come from the "
            f"stable rank of each kernel); got {method!r}."
        )
    layers = [layer for _, layer in match_targets(model, method, targets)]
    rows = []
    for layer, entry in zip(layers, method.plan(layers)):
        view = kernel_view(layer)
        rows.append(
            {
                "path": layer.path or layer.name,
                "type": type(layer).__name__,
                "shape": (view.d_in, view.d_out),
                "stable_rank": entry.stable_rank,
                "rank": entry.rank,
                "params": entry.params,
            }
        )
    return RankPlan(method, rows)


def inspect_model(model, method=None, *, rank=None, budget=None, max_rank=None,
                  targets=None, progress=None, model_name=None):
    """Shapes, stable ranks and the rank plan of `method` on `model`'s targets.

    The targets are matched exactly as `apply_adapters(model, method,
    targets)` matches them; the model is not changed. Each layer's stable
    rank (`keras_adaptive_lora.spectral.stable_rank` of the kernel's matrix
    view) is computed once; the ranks, capacities and parameters are the
    method's own `plan(layers)`, the same plan `apply_adapters` builds
    (SR-LoRA's budget and cap included).

    Args:
        model: a built keras-hub backbone / task model or Keras model.
        method: a registered method name (`method_names()`: "lora",
            "sr-lora", "flexlora", "sinc", ...) or a method spec. Defaults to
            None: the first registered method, plain LoRA (the baseline).
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
    if method is None:
        method = method_names()[0]
    if isinstance(method, str):
        method = make_method(method, rank=rank, budget=budget, max_rank=max_rank)
    elif isinstance(method, AdapterMethod) and method_of(method) is not None:
        if (rank, budget, max_rank) != (None, None, None):
            raise ValueError(
                "`rank`, `budget` and `max_rank` go with a method name; a method "
                f"spec ({method!r}) already carries its own."
            )
    else:
        kind = "an unregistered method spec" if isinstance(method, AdapterMethod) else "not a method"
        raise ValueError(
            f"`method` must be one of {list(method_names())} or a registered method "
            f"spec; got {method!r} ({kind})."
        )
    if progress is not None and not callable(progress):
        raise ValueError(f"`progress` must be callable or None, got {progress!r}.")
    layers = [layer for _, layer in match_targets(model, method, targets)]
    plan = method.plan(layers)  # checks ranks before the slow part
    sranks = []
    for done, (layer, entry) in enumerate(zip(layers, plan), 1):
        srank = entry.stable_rank
        sranks.append(stable_rank(layer) if srank is None else srank)
        if progress is not None:
            progress(done, len(layers), layer.path or layer.name)
    rows = []
    for layer, srank, entry in zip(layers, sranks, plan):
        view = kernel_view(layer)
        rows.append(
            {
                "path": layer.path or layer.name,
                "type": type(layer).__name__,
                "kernel_shape": tuple(int(d) for d in layer.kernel.shape),
                "d_in": view.d_in,
                "d_out": view.d_out,
                "stable_rank": srank,
                "rank": int(entry.rank),
                "capacity": int(entry.capacity),
                "params": int(entry.params),
            }
        )
    return InspectionReport(
        model_name=model_name or type(model).__name__,
        method=method,
        rows=rows,
        model_params=model.count_params(),
    )


def format_report(report):
    """The report as a text table with totals (what the CLI prints).

    When a method's capacity differs from its starting rank (FlexLoRA), the
    rank column shows `rank/capacity` and the totals the capacity.
    """
    movable = any(r["capacity"] != r["rank"] for r in report.rows)
    headers = ("layer path", "kernel shape", "d_in x d_out", "stable rank",
               "rank/R" if movable else "rank", "params")
    cells = [
        (
            r["path"],
            "(" + ", ".join(str(d) for d in r["kernel_shape"]) + ")",
            f"{r['d_in']} x {r['d_out']}",
            f"{r['stable_rank']:.2f}",
            f"{r['rank']}/{r['capacity']}" if movable else str(r["rank"]),
            f"{r['params']:,}",
        )
        for r in report.rows
    ]
    table, rule = format_table(headers, cells)
    title = method_of(report.method).title
    out = [
        f"{title} plan for {report.model_name}: {len(report.rows)} target layers ({report.method!r})",
        *table,
        rule,
    ]
    share = 100.0 * report.adapter_params / max(report.model_params, 1)
    out.append(
        f"trainable (adapter) params: {report.adapter_params:,} || model params: "
        f"{report.model_params:,} || trainable%: {share:.4f}"
    )
    total_rank = sum(report.ranks)
    if movable:
        capacity = sum(r["capacity"] for r in report.rows)
        out.append(
            f"total active rank (the method's budget, constant in training): {total_rank}; "
            f"capacity: {capacity}"
        )
    else:
        out.append(f"total rank: {total_rank}")
    return "\n".join(out)


def update_stable_ranks(model):
    """The stable rank of each adapter's update `ΔW`, per adapted layer.

    `srank(ΔW) = ||ΔW||_F^2 / sigma_1(ΔW)^2` of the `(d_in, d_out)` update
    (`adapter.delta_kernel()`, scaling included) of every adapter in `model`,
    whatever its method. For LoRA-style adapters it is at most the rank; for
    `SincLoRA` it is learned and may exceed it (LR-LoRA paper, section 3.3).
    A zero update (e.g. at initialization) reports `0.0`.

    Args:
        model: a Keras model (or layer) holding adapters, or one adapter.

    Returns:
        A dict `{layer path: stable rank (float)}`, in the model's layer order.

    Example:
    ```python
    apply_adapters(backbone, SincLoRA(rank=8))
    backbone.fit(...)  # or a task model holding the backbone
    for path, srank in update_stable_ranks(backbone).items():
        print(f"{path}: {srank:.2f}")
    ```
    """
    adapters = [model] if isinstance(model, AdapterLayer) else find_adapters(model)
    return {
        (adapter.path or adapter.name): float(stable_rank(adapter.delta_kernel()))
        for adapter in adapters
    }


def from_preset(source, cls=None):
    """`cls.from_preset(source)` (a keras-hub `Backbone` by default).

    keras-hub converts a Hugging Face transformers checkpoint (a
    `save_pretrained` folder, an `hf://` handle) with the `safetensors` and
    `huggingface_hub` packages: when one is missing, the `ImportError` says
    to install this library's `hf` extra.
    """
    cls = cls or keras_hub.models.Backbone
    try:
        return cls.from_preset(source)
    except ImportError as error:
        raise ImportError(
            f"Loading {source!r} needs a package that is not installed ({error}). "
            "Hugging Face transformers checkpoints (a `save_pretrained` folder or an "
            "hf:// handle) need the `hf` extra: pip install 'keras-adaptive-lora[hf]' "
            "(safetensors, huggingface_hub)."
        ) from error


def load_model(source):
    """Open a keras-hub backbone or a Keras model for inspection.

    Args:
        source: a keras-hub preset folder (with `config.json`, e.g. written by
            `Backbone.save_to_preset`; works offline), a Hugging Face
            transformers folder (`save_pretrained`, converted by keras-hub;
            needs the `hf` extra, see `from_preset`), a `.keras` file, or a
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
        return from_preset(source)
    if os.path.isdir(source):
        if not os.path.isfile(os.path.join(source, "config.json")):
            raise ValueError(
                f"Folder '{source}' is not a keras-hub preset: it has no config.json. "
                "Pass a folder written by `Backbone.save_to_preset(...)` or by "
                "transformers' `save_pretrained`, a `.keras` file, or a keras-hub "
                "preset name."
            )
        return from_preset(source)
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


def inspect_source(source, method=None, **kwargs):
    """`inspect_model(load_model(source), method, **kwargs)`, naming the source."""
    model = load_model(source)
    kwargs.setdefault("model_name", f"{type(model).__name__} from {os.fspath(source)}")
    return inspect_model(model, method, **kwargs)
