"""Adapters under Keras's distribution API (`keras.distribution`, jax backend).

`keras.distribution.DataParallel` replicates every variable, adapters
included: nothing to do beyond the order below. `keras.distribution.ModelParallel`
shards each variable by the `LayoutMap` entry that matches its `variable.path`
(an exact key first, else the one regular expression that matches in full)
and replicates variables without an entry. keras-hub's layout maps
(`GemmaBackbone.get_layout_map(mesh)`, `LlamaBackbone.get_layout_map(mesh)`)
know nothing of adapters. `layout_map_for` adds one exact-path entry per
adapter variable, sharded consistently with the wrapped kernel:

- a factor `A (d_in, r)` takes the kernel's sharding of its input axes, a
  factor `B (r, d_out)` that of its output axes; the rank axis is never
  sharded. So `x A` splits like `x W`'s contraction and `(x A) B` lands in
  `x W`'s output layout, and `A B` is laid out like the kernel's matrix view.
- everything else (FlexLoRA's `λ`, mask and counters, SincLoRA's amplitudes and
  bandwidths, SR-LoRA's sampler state) is small and replicated.

An adapter's variables are created when it wraps its layer (inside
`apply_adapters`), and a jax variable gets its layout when it is created
(`distribution.get_variable_layout(variable)`), while `layout_map_for` needs
the adapters to exist to know their paths. The order with `ModelParallel`:

```python
mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"))
base_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=base_map, batch_dim_name="batch")
)
backbone = keras_hub.models.GemmaBackbone.from_preset(...)  # base sharded as created
kal.apply_adapters(backbone, kal.LoRA(rank=8))  # adapters created replicated
layout_map = kal.layout_map_for(backbone, base_map)
keras.distribution.set_distribution(
    keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
)
kal.distribute_adapters(backbone)  # adapter variables moved to their layouts
model.compile(...)  # optimizer slots follow their variables' layouts
model.fit(...)
```

Without the three steps from `layout_map_for` to `distribute_adapters`,
training is just as correct, with replicated adapters. With `DataParallel`,
set the distribution before building the model and applying adapters, so
that every variable is replicated on the mesh (a variable created before a
distribution is set lives on one device, and jax refuses to mix the two in
one train step).
"""

import re

import keras

from keras_adaptive_lora.core.tree import find_adapters


# --------------------------------------------------------------------------
# Layouts of one adapter's variables
# --------------------------------------------------------------------------
def _mesh_axis_size(mesh, name):
    return int(mesh.shape[list(mesh.axis_names).index(name)])


def _flat_axis(specs, dims, mesh):
    """The mesh axis of a flattened group of kernel axes, or `None`.

    Row-major flattening of axes `(n, h)` keeps the blocks of an `n` sharding
    contiguous, so the flat axis can take the outermost axis's mesh axis when
    every inner axis is unsharded and the outermost axis splits evenly (then
    device `i` holds the same rows of the flat axis as of the kernel). A
    sharded inner axis would need a strided split, an uneven one a ragged
    split: replicate instead.
    """
    if not specs or specs[0] is None or any(s is not None for s in specs[1:]):
        return None
    if int(dims[0]) % _mesh_axis_size(mesh, specs[0]):
        return None
    return specs[0]


def adapter_layouts(adapter, kernel_axes, device_mesh):
    """`[(variable, axes)]`: the layout of each of `adapter`'s own variables.

    Args:
        adapter: an `AdapterLayer`.
        kernel_axes: the wrapped kernel's layout axes (one mesh axis name or
            `None` per kernel axis), or `None` for a replicated kernel.
        device_mesh: the `keras.distribution.DeviceMesh`.

    Returns:
        A list of `(variable, axes)` with `axes` a tuple of mesh axis names
        and `None`, one per variable dimension.
    """
    view = adapter.view
    in_spec = out_spec = None
    if kernel_axes is not None:
        kernel_axes = tuple(kernel_axes)
        if len(kernel_axes) != len(view.kernel_shape):
            raise ValueError(
                f"The layout of the kernel of '{adapter.path}' has "
                f"{len(kernel_axes)} axes {kernel_axes}, but the kernel has shape "
                f"{view.kernel_shape}. Fix the layout map entry for "
                f"'{adapter.wrapped.kernel.path}'."
            )
        in_spec = _flat_axis([kernel_axes[i] for i in view.in_axes], view.in_dims, device_mesh)
        out_spec = _flat_axis([kernel_axes[i] for i in view.out_axes], view.out_dims, device_mesh)
    layouts = []
    roles = adapter.factor_roles()
    for name, variable in adapter.own_variables():
        role = roles.get(name)
        if role == "in":
            axes = (in_spec, None)
        elif role == "out":
            axes = (None, out_spec)
        else:
            axes = (None,) * len(variable.shape)
        layouts.append((variable, axes))
    return layouts


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------
def _same_mesh(a, b):
    return (
        a is b
        or (
            tuple(a.shape) == tuple(b.shape)
            and tuple(a.axis_names) == tuple(b.axis_names)
            and a.devices.tolist() == b.devices.tolist()
        )
    )


def _layout_key(path):
    """An exact key for `path`: the path itself (looked up before any regex
    key), escaped only if it holds regex metacharacters."""
    return path if re.escape(path) == path else re.escape(path)


def layout_map_for(model, base_layout_map=None, *, device_mesh=None):
    """A `keras.distribution.LayoutMap` for `model` with its adapters.

    Copies the entries of `base_layout_map` (e.g. keras-hub's
    `GemmaBackbone.get_layout_map(mesh)`) and adds one entry per variable of
    every adapter in `model`, keyed by the variable's exact path. A factor
    `A (d_in, r)` takes the wrapped kernel's sharding (its entry in
    `base_layout_map`) of the kernel's input axes, `B (r, d_out)` that of its
    output axes, the rank axis is never sharded; when several kernel axes
    form `d_in` (or `d_out`), the flat axis takes the outermost one's mesh
    axis if the others are unsharded, else stays replicated, as it does when
    its size does not divide evenly. Other adapter variables (`λ`, masks,
    counters, sinc amplitudes and bandwidths, sampler state) are replicated.
    Entries already in `base_layout_map` for an adapter variable's exact path
    are kept. The base map is not changed.

    Adapters must be applied first: see the module docstring for the order
    with `ModelParallel`, and `distribute_adapters` to move adapters that were
    created before their entries existed.

    Args:
        model: a model with adapters (`apply_adapters` was called).
        base_layout_map: the layout map of the base model. Defaults to None
            (no base entries; every adapter variable replicated).
        device_mesh: the `keras.distribution.DeviceMesh`. Defaults to the
            mesh of `base_layout_map`; required without one.

    Returns:
        A new `keras.distribution.LayoutMap`.

    Example:
    ```python
    mesh = keras.distribution.DeviceMesh((2, 2), ("batch", "model"))
    base = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    layout_map = kal.layout_map_for(backbone, base)
    layout_map["decoder_block_0/attention/query/lora_a"].axes  # ('batch', None)
    ```
    """
    if base_layout_map is not None and not isinstance(
        base_layout_map, keras.distribution.LayoutMap
    ):
        raise ValueError(
            "`base_layout_map` must be a keras.distribution.LayoutMap (e.g. "
            "`GemmaBackbone.get_layout_map(mesh)`) or None, got "
            f"{type(base_layout_map).__name__}."
        )
    mesh = device_mesh
    if base_layout_map is not None:
        if mesh is None:
            mesh = base_layout_map.device_mesh
        elif not _same_mesh(mesh, base_layout_map.device_mesh):
            raise ValueError(
                f"`device_mesh` {mesh} differs from the mesh of `base_layout_map` "
                f"{base_layout_map.device_mesh}. Pass one of them, or the same mesh."
            )
    if not isinstance(mesh, keras.distribution.DeviceMesh):
        raise ValueError(
            "`layout_map_for` needs a keras.distribution.DeviceMesh: pass "
            "`device_mesh=` or a `base_layout_map` built on one; got "
            f"{mesh!r}."
        )
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model {model.name!r} has no adapters, so there is nothing to add to "
            "the layout map. Call `apply_adapters(model, method)` first."
        )
    layout_map = keras.distribution.LayoutMap(mesh)
    if base_layout_map is not None:
        for key in base_layout_map:
            layout_map[key] = base_layout_map[key]
    # `key in layout_map` is always true (a missing key reads as None): use
    # the set of keys.
    keys = set(layout_map)
    for adapter in adapters:
        kernel_axes = None
        if base_layout_map is not None:
            kernel_layout = base_layout_map[adapter.wrapped.kernel.path]
            kernel_axes = None if kernel_layout is None else kernel_layout.axes
        for variable, axes in adapter_layouts(adapter, kernel_axes, mesh):
            key = _layout_key(variable.path)
            if key not in keys:
                keys.add(key)
                layout_map[key] = axes
    return layout_map


def distribute_adapters(model, distribution=None):
    """Move every adapter variable of `model` to its layout under `distribution`.

    A jax variable keeps the layout it got when it was created. Adapters
    created before their layout map entries existed (the usual case, see the
    module docstring) are replicated; this re-lays them out with
    `distribution.get_variable_layout` (for `ModelParallel`, the layout map
    entry of the variable's path), values unchanged. Call it before the
    first `fit`: the optimizer creates its slots there with its variables'
    layouts, and the compiled train step records the layouts of all state.

    Args:
        model: a model with adapters.
        distribution: a `keras.distribution.Distribution`. Defaults to the
            global one (`keras.distribution.distribution()`).

    Returns:
        `{variable path: layout axes}` for every adapter variable.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            "`distribute_adapters` lays out variables with keras.distribution, "
            f"which places variables on the jax backend only (this is "
            f"{keras.backend.backend()!r}). On tensorflow, create the model and "
            "apply adapters inside `tf.distribute.MirroredStrategy().scope()`."
        )
    distribution = distribution or keras.distribution.distribution()
    if not callable(getattr(distribution, "get_variable_layout", None)):
        raise ValueError(
            "No distribution: pass `distribution=` (a keras.distribution."
            "DataParallel or ModelParallel) or set one with "
            "`keras.distribution.set_distribution(...)` first; got "
            f"{distribution!r}."
        )
    adapters = find_adapters(model)
    if not adapters:
        raise ValueError(
            f"Model {model.name!r} has no adapters. Call `apply_adapters(model, "
            "method)` first."
        )
    placed = {}
    for adapter in adapters:
        for _, variable in adapter.own_variables():
            # Keras reads a variable's layout from `_layout` (set at creation;
            # there is no public setter), and `assign` places the value there.
            variable._layout = None
            layout = distribution.get_variable_layout(variable)
            variable._layout = layout
            variable.assign(variable.value)
            placed[variable.path] = tuple(layout.axes)
    return placed
