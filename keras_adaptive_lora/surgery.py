"""Model surgery: put adapters on the projections of a built model and take them off.

Layers are found by walking the layer tree (`core.tree.walk`) and matched by
`layer.path` and type, never by list index; the swap itself is
`core.tree.swap_layer`.
"""

import json
import re

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.method import AdapterMethod, method_of
from keras_adaptive_lora.core.tree import (
    PROJECTION_TYPES,
    find_adapters,
    layer_path,
    reset_compiled_functions,
    short_name,
    swap_layer,
    walk,
)
from keras_adaptive_lora.reports import build_report
from keras_adaptive_lora.targets import detect_architecture

_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


# --------------------------------------------------------------------------
# Target matching
# --------------------------------------------------------------------------
def _candidate_names(model):
    names = sorted(
        {
            short_name(layer)
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
        return short_name(layer) == pattern
    return re.fullmatch(pattern, layer_path(layer)) is not None


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
                    kinds = ", ".join(f"'{layer_path(layer)}' ({type(layer).__name__})" for _, layer in hits[:5])
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
            f"Layer '{layer_path(adapted[0])}' already has an adapter "
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
                f"Layer names include: {sorted({short_name(l) for l in every})[:40]}."
            )
        found.extend(hits)
    return found


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
            "name": getattr(method_of(method), "name", None),
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
    reset_compiled_functions(model)
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
    reset_compiled_functions(model)
    return len(sites)
