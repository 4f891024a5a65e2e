"""Model surgery: put adapters on the projections of a built model and take them off.

Layers are found by walking the layer tree (`core.tree.walk`) and matched by
`layer.path` and type, never by list index; the swap itself is
`core.tree.swap_layer`. Adapting is all or nothing (`all_or_nothing`): a
failure on any target leaves the model exactly as it was. A model holding
adapters has its `save` guarded (`guard_save`): a whole-model file cannot
hold them, and the refusal comes before Keras opens the file.
"""

import contextlib
import json
import re
import weakref

import keras

from keras_adaptive_lora.core.adapter import AdapterLayer, check_wrappable, unmerged_save_error
from keras_adaptive_lora.core.method import AdapterMethod, method_of
from keras_adaptive_lora.core.tree import (
    PROJECTION_TYPES,
    find_adapters,
    layer_path,
    reset_compiled_functions,
    saved_state,
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


def _check_pattern(pattern, what):
    """Raise a `ValueError` naming `pattern` when it is not a valid regex."""
    if _NAME_RE.match(pattern):
        return
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(
            f"{what} {pattern!r} is not a valid regular expression ({error}). An "
            "entry is a layer name (letters, digits, `_`: exact match on the last "
            "component of `layer.path`) or a regular expression matched in full "
            "against `layer.path`, e.g. r'.*block_0/query'; escape special "
            "characters (`re.escape`) to match them literally. Nothing was changed."
        ) from None


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
        for pattern in patterns:
            _check_pattern(pattern, "Target")
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
        _check_pattern(name, f"`{what}` entry")
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

    All or nothing: every target is checked first, and if any target fails
    (a rank too large for it, an unsupported quantization, Keras's built-in
    LoRA, a budget too small, ...) the `ValueError` names it and the model is
    left exactly as it was (layers, activations, trainable flags, weights).
    Afterwards `model.save(...)` refuses (before touching the file) until the
    adapters are merged; see `merge_adapters` and `save_adapters`.

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
    layers = [layer for _, layer in sites]
    for layer in layers:  # what every method needs, before anything is built
        check_wrappable(layer)
    keep = [v for layer in train_also_layers for v in layer.weights if v.trainable]
    spec = method_spec(method, _resolve_targets(model, method, targets))
    with all_or_nothing(model, layers) as swapped:
        # Wrapping changes each layer (frozen, activation moved): undone on error.
        adapters = method.wrap_all(layers)
        for adapter in adapters:
            adapter.method_spec = spec
        install_adapters(
            model,
            [(parent, layer, adapter) for (parent, layer), adapter in zip(sites, adapters)],
            keep_trainable=keep,
            swapped=swapped,
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


@contextlib.contextmanager
def all_or_nothing(model, layers):
    """Context manager around adapting `layers` of `model`: yields a list for
    `install_adapters(..., swapped=)`. On any error in the block the recorded
    swaps are undone (last first), the trainable flags and the activations of
    `layers` are restored (`saved_state`) and the error is re-raised, so the
    model is as before."""
    restore = saved_state(model, layers)
    guarded = {id(each) for each in _guarded_models(model)}
    swapped = []
    try:
        yield swapped
    except BaseException:
        for parent, layer, adapter in reversed(swapped):
            swap_layer(parent, adapter, layer)
        restore()
        for each in _guarded_models(model):
            if id(each) not in guarded:
                del each.save
        reset_compiled_functions(model)
        raise


class _GuardedSave:
    """`model.save` of a model holding adapters: refuses (`ValueError`)
    before Keras opens the file; without adapters it is Keras's own."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.__doc__ = keras.Model.save.__doc__

    def __call__(self, filepath, *args, **kwargs):
        model = self._model()
        adapters = find_adapters(model)
        if adapters:
            raise unmerged_save_error(adapters[0])
        return type(model).save(model, filepath, *args, **kwargs)


def _models(model):
    return [model] + [m for _, m in walk(model) if isinstance(m, keras.Model)]


def _guarded_models(model):
    return [m for m in _models(model) if isinstance(vars(m).get("save"), _GuardedSave)]


def guard_save(model):
    """Guard `save` of `model` and of its nested models (`_GuardedSave`)."""
    for each in _models(model):
        if not isinstance(vars(each).get("save"), _GuardedSave):
            each.save = _GuardedSave(each)


def unguard_save(model):
    """Remove the guard of `model` and its nested models without adapters."""
    for each in _guarded_models(model):
        if not find_adapters(each):
            del each.save


def install_adapters(model, swaps, keep_trainable=(), swapped=None):
    """Swap adapters into `model` and freeze it as `apply_adapters` does.

    Args:
        model: the model (its compiled functions are reset, its `save`
            guarded, see `guard_save`).
        swaps: `(parent, layer, adapter)` triples; `adapter` replaces `layer`
            in `parent`.
        keep_trainable: variables (besides the trainable variables of every
            adapter in the model, earlier ones included) that stay trainable;
            every other variable of `model` is frozen.
        swapped: a list (from `all_or_nothing`) that gets each swap once done.
    """
    for parent, layer, adapter in swaps:
        swap_layer(parent, layer, adapter)
        if swapped is not None:
            swapped.append((parent, layer, adapter))
    guard_save(model)
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
    unguard_save(model)
    reset_compiled_functions(model)
    return len(sites)
