"""Per-architecture target presets: which projection layers each method adapts.

Layer names are the keras-hub 0.32 names (see docs/methods.md); matching is by the
last component of `layer.path` and by type, never by list index.
"""

# Architecture name -> projection layer names, grouped by role.
ARCHITECTURES = {
    "vit": {
        "query": ("query",),
        "key": ("key",),
        "value": ("value",),
        "attention_output": ("attention_output",),
        "mlp": ("dense_1", "dense_2"),
    },
    "gemma": {
        "query": ("query",),
        "key": ("key",),
        "value": ("value",),
        "attention_output": ("attention_output",),
        "mlp": ("ffw_gating", "ffw_gating_2", "ffw_linear"),
    },
    "llama": {
        "query": ("query",),
        "key": ("key",),
        "value": ("value",),
        "attention_output": ("attention_output",),
        "mlp": (
            "feedforward_intermediate_dense",
            "feedforward_gate_dense",
            "feedforward_output_dense",
        ),
    },
}

# keras-hub class-name prefixes -> architecture name.
_CLASS_PREFIXES = {
    "ViT": "vit",
    "Gemma3": "gemma",
    "Gemma": "gemma",
    "Llama3": "llama",
    "Llama": "llama",
}


def role_targets(*roles):
    """`{architecture: layer names}` for the given roles, for every architecture.

    Example: `role_targets("query", "value")` is plain LoRA's default.
    """
    return {
        arch: tuple(name for role in roles for name in groups[role])
        for arch, groups in ARCHITECTURES.items()
    }


ALL_ROLES = ("query", "key", "value", "attention_output", "mlp")


def detect_architecture(model):
    """The architecture name of a keras-hub backbone or task model, or `None`.

    Looks at the class names of the model and of its `backbone` attribute
    (task models such as `GemmaCausalLM` hold one).
    """
    candidates = [model]
    backbone = getattr(model, "backbone", None)
    if backbone is not None:
        candidates.append(backbone)
    for obj in candidates:
        for klass in type(obj).__mro__:
            for prefix, arch in _CLASS_PREFIXES.items():
                if klass.__name__.startswith(prefix) and klass.__module__.startswith(
                    "keras_hub"
                ):
                    return arch
    return None
