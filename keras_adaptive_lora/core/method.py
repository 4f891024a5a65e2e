"""Method specs and the method registry.

A method is two classes: a small, validated *spec* (a frozen, keyword-only
dataclass derived from `AdapterMethod`: its hyper-parameters, written once as
fields) and its `AdapterLayer` subclass. `@register_method` puts the spec
class in the registry under its one name (`"lora"`, `"sr-lora"`,
`"flexlora"`, `"sinc"`, ...). Everything that lists or builds methods by name
(the command line's choices, `inspect`, the transfer job, reports, adapter
files) reads the registry: no method name appears outside its own module, and
a new method that registers itself is offered everywhere.

What a spec class declares (class attributes, not dataclass fields):

- `name`: the one spelling, used on the command line, in reports and files.
- `title`: the display name (e.g. `"SR-LoRA"`).
- `layer_class`: its `AdapterLayer` subclass.
- `default_targets`: `{architecture: layer names}` (see `targets.py`).
- `per_layer_ranks`: True when ranks differ across layers (plots show a
  rank map). `learned_rank`: True when the effective rank of the update is
  learned, not set (reports show `update_stable_ranks`).
  `identity_at_init`: True (the default) when `ΔW = 0` at initialization,
  so that adapting leaves the model's outputs unchanged.

and what it implements: `wrap(layer)` (or `wrap_all(layers)` when one layer's
choice depends on the others, e.g. a global budget), `plan(layers)` (rank,
capacity and parameters per layer before anything is built) and, when it
needs one, `callbacks(total_steps)` (e.g. FlexLoRA's scheduler).
"""

import abc
import dataclasses
from typing import ClassVar

from keras_adaptive_lora.core.adapter import AdapterLayer

_REGISTRY = {}


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What a method gives one layer, computed before anything is built.

    Attributes:
        rank: the rank the layer starts with (FlexLoRA: active components).
        capacity: the most components the layer can hold (FlexLoRA's `R`;
            `rank` for fixed-rank methods).
        params: the adapter's trainable parameters.
        stable_rank: the stable rank of the pretrained kernel when the method
            computed it (SR-LoRA), else None.
    """

    rank: int
    capacity: int
    params: int
    stable_rank: float = None


class AdapterMethod(abc.ABC):
    """Base class of the method specs (frozen, keyword-only dataclasses).

    Subclasses are declared with `@register_method` and
    `@dataclasses.dataclass(frozen=True, kw_only=True)`; their fields are the
    hyper-parameters (with defaults), checked in `__post_init__` (use
    `self._set(name, value)` to store a normalized value). Equality, hash,
    repr and `get_config` come from the fields.
    """

    name: ClassVar[str] = "adapter"
    title: ClassVar[str] = "adapter"
    layer_class: ClassVar[type] = None
    default_targets: ClassVar[dict] = {}
    per_layer_ranks: ClassVar[bool] = False
    learned_rank: ClassVar[bool] = False
    identity_at_init: ClassVar[bool] = True

    def _set(self, field, value):
        """Store a normalized field value on the frozen spec (in `__post_init__`)."""
        object.__setattr__(self, field, value)

    # Wrapping ------------------------------------------------------------------
    @abc.abstractmethod
    def wrap(self, layer):
        """Return an `AdapterLayer` wrapping the built `layer`."""

    def wrap_all(self, layers):
        """Wrap every layer of one `apply_adapters` call; returns the adapters.

        Methods whose per-layer choices depend on all targeted layers at once
        (e.g. a global parameter budget) override this; the default wraps
        each layer on its own.
        """
        return [self.wrap(layer) for layer in layers]

    @abc.abstractmethod
    def plan(self, layers):
        """One `LayerPlan` per layer: what `wrap_all(layers)` would build.

        Checks what wrapping checks (a rank out of range raises the same
        `ValueError`), without creating any variable.
        """

    def callbacks(self, total_steps, *, verbose=0):
        """The Keras callbacks `fit` needs for this method over `total_steps`
        optimizer steps (empty for most methods)."""
        return []

    # Options -------------------------------------------------------------------
    @classmethod
    def option_names(cls):
        """The spec's hyper-parameters (its dataclass fields), in order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_options(cls, *, strict=True, **options):
        """A spec from generic options such as `rank`, `budget`, `seed`.

        Options that are None are left at the spec's defaults. An option the
        method does not have raises a `ValueError` naming the method's
        options (`strict=True`) or is dropped (`strict=False`, for callers
        that pass one set of options to every method).
        """
        fields = cls.option_names()
        given = {k: v for k, v in options.items() if v is not None}
        unknown = sorted(k for k in given if k not in fields)
        if unknown and strict:
            option = unknown[0]
            having = [n for n, c in _REGISTRY.items() if option in c.option_names()]
            raise ValueError(
                f"`{option}` does not apply to {cls.name} ({cls.title}); its options "
                f"are {', '.join(fields)}. Methods with `{option}`: "
                f"{', '.join(having) or 'none'}."
            )
        return cls(**{k: v for k, v in given.items() if k in fields})

    # Config --------------------------------------------------------------------
    def get_config(self):
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def register_method(cls):
    """Class decorator: add a method spec class to the registry.

    The class must derive from `AdapterMethod`, be a dataclass, and declare
    a `name` that no other registered method uses, a `title`, and a
    `layer_class` (an `AdapterLayer` subclass). Registering the same class
    again (a module reload) replaces it.
    """
    if not (isinstance(cls, type) and issubclass(cls, AdapterMethod)):
        raise TypeError(f"{cls!r} is not an AdapterMethod subclass; it cannot be registered.")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(
            f"{cls.__name__} must be a dataclass "
            "(`@dataclasses.dataclass(frozen=True, kw_only=True)`) to be registered."
        )
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name or name != name.strip():
        raise TypeError(f"{cls.__name__} must declare its own `name` (a non-empty string).")
    layer_class = getattr(cls, "layer_class", None)
    if not (isinstance(layer_class, type) and issubclass(layer_class, AdapterLayer)):
        raise TypeError(f"{cls.__name__}.layer_class must be an AdapterLayer subclass.")
    existing = _REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(
            f"Method name '{name}' is already registered by {existing.__qualname__}; "
            f"choose another name for {cls.__qualname__}."
        )
    _REGISTRY[name] = cls
    return cls


def unregister_method(name):
    """Remove a method from the registry (for tests of toy methods)."""
    _REGISTRY.pop(name, None)


def method_names():
    """The registered method names, in registration order."""
    return tuple(_REGISTRY)


def registered_methods():
    """`{name: spec class}` of every registered method, in registration order."""
    return dict(_REGISTRY)


def get_method(name):
    """The spec class registered as `name`; a `ValueError` lists the names."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown method {name!r}; registered methods: {', '.join(_REGISTRY) or 'none'}."
        ) from None


def method_of(obj):
    """The registered spec class of a spec, an adapter layer or their class, or None."""
    klass = obj if isinstance(obj, type) else type(obj)
    for cls in _REGISTRY.values():
        if issubclass(klass, cls) or (cls.layer_class is not None and klass is cls.layer_class):
            return cls
    return None
