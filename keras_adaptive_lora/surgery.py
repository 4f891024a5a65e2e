"""Model surgery: put adapters on the projections of a built model and take them off.

Layers are found by walking the layer tree (`layer._layers`, the tracked
sublayers) and matched by `layer.path` and type, never by list index. A match
is swapped in its parent everywhere the parent refers to it: attributes, lists
of layers, the parent's layer tracker and, for functional models, the nodes of
the graph.
"""

import json
import re

import keras
import numpy as np

from keras_adaptive_lora.adapters.base import AdapterLayer, AdapterMethod
from keras_adaptive_lora.targets import detect_architecture

PROJECTION_TYPES = (keras.layers.Dense, keras.layers.EinsumDense)
_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
# Functional graph bookkeeping, handled by `_replace_in_functional`.
_INTERNAL_LISTS = ("_operations",)


# --------------------------------------------------------------------------
# Walking the layer tree
# --------------------------------------------------------------------------
def _children(layer):
    """Direct sublayers of `layer`, in tracking order, without duplicates."""
    seen, out = set(), []
    for child in getattr(layer, "_layers", []) or []:
        if isinstance(child, keras.layers.Layer) and id(child) not in seen:
            seen.add(id(child))
            out.append(child)
    return out


def walk(model):
    """Yield `(parent, layer)` for every sublayer reachable from `model`.

    Depth-first, in tracking order. Adapters are yielded but not descended
    into (the layer they wrap is theirs). Each layer object is yielded once.
    """
    seen = {id(model)}

    def visit(parent):
        for child in _children(parent):
            if id(child) in seen:
                continue
            seen.add(id(child))
            yield parent, child
            if not isinstance(child, AdapterLayer):
                yield from visit(child)

    yield from visit(model)


def find_adapters(model):
    """All `AdapterLayer`s in `model`, in walk order."""
    return [layer for _, layer in walk(model) if isinstance(layer, AdapterLayer)]


def _path(layer):
    return layer.path or layer.name


def _short_name(layer):
    return _path(layer).rsplit("/", 1)[-1]


# --------------------------------------------------------------------------
# Swapping a layer in its parent
# --------------------------------------------------------------------------
def _replace_in_functional(function, old, new):
    """Replace operation `old` by `new` in a functional graph, in place.

    Updates the operation lists, every node (and the `KerasHistory` of its
    output tensors) and the graph's node keys, which embed `id(operation)`.
    """
    if not hasattr(function, "_nodes_by_depth"):
        return
    # In place: reassigning these attributes would re-track them.
    for ops in [function._operations, *getattr(function, "_operations_by_depth", {}).values()]:
        for i, op in enumerate(ops):
            if op is old:
                ops[i] = new
    for node in getattr(old, "_inbound_nodes", []):
        node.operation = new
        for tensor in node.outputs:
            history = getattr(tensor, "_keras_history", None)
            if history is not None and history.operation is old:
                tensor._keras_history = history._replace(operation=new)
    for nodes in function._nodes_by_depth.values():
        for node in nodes:
            if node.operation is old:
                node.operation = new
    old_prefix, new_prefix = f"{id(old)}_ib-", f"{id(new)}_ib-"
    function._nodes = {
        new_prefix + key[len(old_prefix) :] if key.startswith(old_prefix) else key
        for key in function._nodes
    }
    new._inbound_nodes = list(getattr(old, "_inbound_nodes", []))
    new._outbound_nodes = list(getattr(old, "_outbound_nodes", []))


def swap_layer(parent, old, new):
    """Make `parent` use `new` wherever it used `old`, in place.

    The tracker's layer store is updated first, in place, so the order of
    sublayers (and of their variables) is kept.
    """
    tracker = getattr(parent, "_tracker", None)
    if tracker is not None:
        tracker.unlock()
    try:
        if tracker is not None and tracker.is_in_store("layers", old):
            if tracker.is_in_store("layers", new):
                tracker.config["layers"][1].remove(old)
                tracker.stored_ids["layers"].discard(id(old))
            else:
                tracker.replace_tracked_value("layers", old, new)
        attrs = dict(vars(parent))
        attrs.update(getattr(parent, "_modules", {}) or {})
        for attr, value in attrs.items():
            if attr in _INTERNAL_LISTS or attr == "_tracker":
                continue
            if value is old:
                setattr(parent, attr, new)
            elif isinstance(value, list) and any(v is old for v in value):
                for i, v in enumerate(value):
                    if v is old:
                        value[i] = new
            elif isinstance(value, dict) and any(v is old for v in value.values()):
                for key, v in list(value.items()):
                    if v is old:
                        value[key] = new
        _replace_in_functional(parent, old, new)
        functional = getattr(parent, "_functional", None)
        if functional is not None:  # a built Sequential model
            tracked = getattr(functional, "_tracker", None)
            if tracked is not None:
                tracked.unlock()
            try:
                _replace_in_functional(functional, old, new)
                if tracked is not None and tracked.is_in_store("layers", old):
                    tracked.replace_tracked_value("layers", old, new)
            finally:
                if tracked is not None:
                    tracked.lock()
    finally:
        if tracker is not None:
            tracker.lock()
    _reset_compiled_functions(parent)


def _reset_compiled_functions(model):
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)


# --------------------------------------------------------------------------
# Target matching
# --------------------------------------------------------------------------
def _candidate_names(model):
    names = sorted(
        {
            _short_name(layer)
            for _, layer in walk(model)
            if isinstance(layer, PROJECTION_TYPES + (AdapterLayer,))
        }
    )
    return names


def _scope_for_all_linear(model, train_also_layers):
    """Sites for `"all-linear"`: every projection of the backbone (task
    models) or of the model, except the layers named in `train_also`."""
    root = getattr(model, "backbone", None) or model
    skip = {id(layer) for layer in train_also_layers}
    return [
        (parent, layer)
        for parent, layer in walk(root)
        if isinstance(layer, PROJECTION_TYPES + (AdapterLayer,)) and id(layer) not in skip
    ]


def _matches(pattern, layer):
    if _NAME_RE.match(pattern):
        return _short_name(layer) == pattern
    return re.fullmatch(pattern, _path(layer)) is not None


def _resolve_targets(model, method, targets):
    if targets is None:
        arch = detect_architecture(model)
        defaults = getattr(method, "default_targets", {}) or {}
        if arch is None or arch not in defaults:
            raise ValueError(
                f"{type(method).__name__} has no default targets for "
                f"{type(model).__name__} (architectures with defaults: "
                f"{sorted(defaults) or 'none'}). Pass `targets=`: 'all-linear', "
                "a list of layer names, or regular expressions on layer paths. "
                f"Projection layer names in this model: {_candidate_names(model)}."
            )
        return list(defaults[arch])
    if isinstance(targets, str):
        return targets if targets == "all-linear" else [targets]
    targets = list(targets)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(
            "`targets` must be None, 'all-linear', or a non-empty list of layer "
            f"names / regular expressions (strings); got {targets!r}."
        )
    return targets


def match_targets(model, method, targets=None, train_also=()):
    """The `(parent, layer)` sites that `apply_adapters` would wrap.

    Raises a `ValueError` when a target matches nothing, matches a layer that
    is not a `Dense`/`EinsumDense`, or matches a layer already adapted.
    """
    train_also_layers = _find_named(model, train_also, "train_also")
    patterns = _resolve_targets(model, method, targets)
    if patterns == "all-linear":
        sites = _scope_for_all_linear(model, train_also_layers)
        if not sites:
            raise ValueError(
                f"'all-linear' matched no Dense/EinsumDense layer in {type(model).__name__}."
            )
    else:
        every = list(walk(model))
        sites, seen = [], set()
        for pattern in patterns:
            hits = [(p, layer) for p, layer in every if _matches(pattern, layer)]
            projections = [
                (p, layer) for p, layer in hits if isinstance(layer, PROJECTION_TYPES + (AdapterLayer,))
            ]
            if not projections:
                if hits:
                    kinds = ", ".join(f"'{_path(layer)}' ({type(layer).__name__})" for _, layer in hits[:5])
                    raise ValueError(
                        f"Target {pattern!r} matches {kinds}, which is not a "
                        "keras.layers.Dense or keras.layers.EinsumDense. Name "
                        f"projection layers instead; candidates: {_candidate_names(model)}."
                    )
                raise ValueError(
                    f"Target {pattern!r} matched no layer of {type(model).__name__}. "
                    f"Projection layer names in this model: {_candidate_names(model)}. "
                    "A target is a layer name (exact) or a regular expression "
                    "matched in full against `layer.path`."
                )
            for site in projections:
                if id(site[1]) not in seen:
                    seen.add(id(site[1]))
                    sites.append(site)
        order = {id(layer): i for i, (_, layer) in enumerate(every)}
        sites.sort(key=lambda site: order[id(site[1])])
    adapted = [layer for _, layer in sites if isinstance(layer, AdapterLayer)]
    if adapted:
        raise ValueError(
            f"Layer '{_path(adapted[0])}' already has an adapter "
            f"({type(adapted[0]).__name__}); {len(adapted)} of the targeted layers "
            "are adapted. Call `merge_adapters(model)` first, or target other layers."
        )
    return sites


def _find_named(model, names, what):
    if isinstance(names, str):
        names = [names]
    found = []
    every = [layer for _, layer in walk(model)]
    for name in names:
        hits = [layer for layer in every if _matches(name, layer)]
        if not hits:
            raise ValueError(
                f"`{what}` entry {name!r} matched no layer of {type(model).__name__}. "
                f"Layer names include: {sorted({_short_name(l) for l in every})[:40]}."
            )
        found.extend(hits)
    return found


# --------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------
class AdapterReport:
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

    def __len__(self):
        return len(self.rows)

    def __str__(self):
        headers = ("layer path", "type", "d_in", "d_out", "rank", "params")
        cells = [
            (r["path"], r["type"], str(r["d_in"]), str(r["d_out"]), str(r["rank"]), f"{r['params']:,}")
            for r in self.rows
        ]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(headers)]

        def line(values):
            return "  ".join(
                v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths))
            )

        out = [f"{self.method!r} on {len(self.rows)} layers", line(headers), line(["-" * w for w in widths])]
        out += [line(c) for c in cells]
        out.append(line(["-" * w for w in widths]))
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
            "path": _path(a),
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


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def apply_adapters(model, method, targets=None, train_also=()):
    """Wrap the matched projections of `model` with `method`'s adapters, in place.

    Everything else is frozen, except the layers named in `train_also`.

    Args:
        model: a built Keras model: a keras-hub `Backbone` or task model
            (`ViTImageClassifier`, `GemmaCausalLM`, `LlamaCausalLM`, ...), or
            any functional, sequential or subclassed Keras model.
        method: a method spec (`LoRA`, `StableRankLoRA`, `FlexLoRA`, `SincLoRA`).
        targets: `None` (the method's default for the detected keras-hub
            architecture), `"all-linear"` (every Dense/EinsumDense of the
            backbone, or of the model when it has no `backbone`, except the
            `train_also` layers), or a list whose entries are layer names
            (exact match on the last component of `layer.path`, e.g.
            `"query"`) or regular expressions matched in full against
            `layer.path` (e.g. `r".*decoder_block_0/.*"`).
        train_also: layer names or path regexes of layers that stay trainable
            (e.g. a classifier head). Defaults to none.

    Returns:
        An `AdapterReport` (print it for a per-layer table).

    Example:
    ```python
    report = apply_adapters(backbone, LoRA(rank=8))
    print(report)
    ```
    """
    if not isinstance(method, AdapterMethod):
        raise ValueError(
            f"`method` must be an adapter method spec such as LoRA(rank=8); got {method!r}."
        )
    if not model.built:
        raise ValueError(
            f"Model {model.name!r} is not built; call it on a batch (or build it) "
            "before applying adapters."
        )
    train_also_layers = _find_named(model, train_also, "train_also")
    sites = match_targets(model, method, targets, train_also)
    # Wrap all first (errors leave the model untouched), then swap.
    adapters = method.wrap_all([layer for _, layer in sites])
    spec = method_spec(method, _resolve_targets(model, method, targets))
    for adapter in adapters:
        adapter.method_spec = spec
    keep = [v for layer in train_also_layers for v in layer.weights if v.trainable]
    install_adapters(
        model,
        [(parent, layer, adapter) for (parent, layer), adapter in zip(sites, adapters)],
        keep_trainable=keep,
    )
    return build_report(model, method, adapters, train_also_layers)


def method_spec(method, targets):
    """A JSON string describing a method spec and its resolved targets (kept
    on each adapter as `adapter.method_spec`, written by `save_adapters`)."""
    return json.dumps(
        {
            "class_name": type(method).__name__,
            "config": method.get_config(),
            "targets": targets,
        },
        sort_keys=True,
    )


def install_adapters(model, swaps, keep_trainable=()):
    """Swap adapters into `model` and freeze it as `apply_adapters` does.

    Args:
        model: the model (its compiled functions are reset).
        swaps: `(parent, layer, adapter)` triples; `adapter` replaces `layer`
            in `parent`.
        keep_trainable: variables (besides the trainable variables of every
            adapter in the model, earlier ones included) that stay trainable;
            every other variable of `model` is frozen.
    """
    for parent, layer, adapter in swaps:
        swap_layer(parent, layer, adapter)
    _reset_compiled_functions(model)
    keep = {id(v) for a in find_adapters(model) for v in a.trainable_weights}
    keep |= {id(v) for v in keep_trainable}
    for variable in model.weights:
        if id(variable) not in keep and variable.trainable:
            variable.trainable = False


def merge_adapters(model, *, quantize=None):
    """Replace every adapter in `model` by its merged plain layer, in place.

    Afterwards the model holds plain `Dense`/`EinsumDense` layers again, with
    the same names and weight paths, so the usual saving and export work.
    Adapters on an int8-quantized base (`model.quantize("int8")`) merge into
    float layers (dequantized kernel plus update) unless `quantize="int8"`,
    which re-quantizes each merged layer with Keras's int8 (see
    `AdapterLayer.merge`).

    Args:
        model: a model holding adapters.
        quantize: `None` (float merged layers) or `"int8"` (quantize every
            merged layer, whether its base was float or int8). Defaults to
            None.

    Returns:
        The number of adapters merged.
    """
    sites = [(parent, layer) for parent, layer in walk(model) if isinstance(layer, AdapterLayer)]
    merged = [adapter.merge(quantize=quantize) for _, adapter in sites]  # all or nothing
    for (parent, adapter), layer in zip(sites, merged):
        swap_layer(parent, adapter, layer)
    _reset_compiled_functions(model)
    return len(sites)
