"""The layer tree: walking it, finding adapters, swapping a layer in its parent.

Every private Keras graph field this library touches is in this one file:
the tracked sublayers (`layer._layers`), a layer's `_tracker`, a functional
model's operation lists, nodes and node keys, a Sequential model's
`_functional`, and the compiled train/test/predict functions. A swap updates
the parent everywhere it refers to the old layer: attributes, lists and dicts
of layers, the tracker and, for functional models, the nodes of the graph.
"""

import keras

from keras_adaptive_lora.core.adapter import AdapterLayer
from keras_adaptive_lora.core.kernel_view import PROJECTION_TYPES  # noqa: F401 (re-export)

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


def check_finite(adapters, when):
    """Raise a `ValueError` naming the first adapter variable of `adapters`
    that holds NaN or inf (training diverged); `when` says where, e.g.
    `"at step 12"`. Reductions on the device, one value read back."""
    ops = keras.ops
    named = [
        (adapter, name, variable)
        for adapter in adapters
        for name, variable in adapter.own_variables()
        if "float" in str(variable.dtype)
    ]
    flags = [ops.all(ops.isfinite(variable)) for _, _, variable in named]
    if not flags or bool(ops.convert_to_numpy(ops.all(ops.stack(flags)))):
        return
    for (adapter, name, _), finite in zip(named, flags):
        if not bool(ops.convert_to_numpy(finite)):
            raise ValueError(
                f"Training diverged: adapter variable '{adapter.path}/{name}' "
                f"holds NaN or infinite values {when}. Lower the learning rate "
                "(or clip gradients), restart from the last good checkpoint, and "
                "add `keras.callbacks.TerminateOnNaN()` to stop at the first "
                "non-finite loss."
            )


def layer_path(layer):
    return layer.path or layer.name


def short_name(layer):
    """The last component of the layer's path (what a target name matches)."""
    return layer_path(layer).rsplit("/", 1)[-1]


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
    # A new list, assigned through the trackers: under tensorflow
    # `_operations` is a tracked `ListWrapper`, and one with a replaced
    # element cannot be exported (SavedModel). The untracked per-depth lists
    # are updated in place.
    function._operations = [new if op is old else op for op in function._operations]
    for ops in getattr(function, "_operations_by_depth", {}).values():
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
                if tracked is not None and tracked.is_in_store("layers", old):
                    tracked.replace_tracked_value("layers", old, new)
                _replace_in_functional(functional, old, new)
            finally:
                if tracked is not None:
                    tracked.lock()
    finally:
        if tracker is not None:
            tracker.lock()
    reset_compiled_functions(parent)


def saved_state(model, layers):
    """A function that restores what wrapping `layers` and swapping adapters
    into `model` change besides the swaps themselves: the trainable flag of
    every layer (the private `_trainable`, so no cascade) and variable of
    `model`, and the activation of each of `layers`."""
    every = [model, *(layer for _, layer in walk(model)), *layers]
    flags = [(layer, layer._trainable) for layer in every]
    variables = [(v, v.trainable) for v in model.variables]
    variables += [(v, v.trainable) for layer in layers for v in layer.variables]
    activations = [(layer, layer.activation) for layer in layers]

    def restore():
        for layer, activation in activations:
            if layer.activation is not activation:
                layer.activation = activation
        for layer, trainable in flags:
            if layer._trainable != trainable:
                layer._trainable = trainable
        for variable, trainable in variables:
            if variable.trainable != trainable:
                variable.trainable = trainable

    return restore


def reset_compiled_functions(model):
    for attr in ("train_function", "test_function", "predict_function"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)




def layer_sites(model):
    """`{path: (parent, layer)}` for every layer of `model` (first wins)."""
    sites = {}
    for parent, layer in walk(model):
        sites.setdefault(layer_path(layer), (parent, layer))
    return sites
