"""Per-architecture target presets: which projection layers each method adapts.

Layer names are the keras-hub 0.32 names (see docs/methods.md); matching is by the
last component of `layer.path` and by type, never by list index. `HF_MODULES`
maps the same layers to their Hugging Face transformers modules (PEFT files).
"""

import re

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

# keras-hub layer -> Hugging Face transformers module (the names of PEFT adapter
# keys, `base_model.model.<module>.lora_A.weight`, and of vLLM's LoRA modules),
# per architecture: PEFT's task type and the module prefix of the usual
# transformers class (`LlamaForCausalLM`, `GemmaForCausalLM`,
# `Gemma3ForCausalLM`, `ViTForImageClassification`), the keras-hub block (its
# name with the index, and the index of the first block) and, per projection
# layer name, its module in block `{i}`. keras-hub loads a transformers weight `W` (out, in) so that
# the layer's `(d_in, d_out)` matrix view is `Wᵀ` (no head permutation).
# Layouts after the first are older transformers names (ViT before
# transformers 5): read, never written.
HF_MODULES = {
    "llama": {
        "task_type": "CAUSAL_LM",
        "prefix": "model.",
        "block": (r"transformer_layer_(\d+)", 0),
        "layouts": (
            {
                "query": "layers.{i}.self_attn.q_proj",
                "key": "layers.{i}.self_attn.k_proj",
                "value": "layers.{i}.self_attn.v_proj",
                "attention_output": "layers.{i}.self_attn.o_proj",
                "feedforward_gate_dense": "layers.{i}.mlp.gate_proj",
                "feedforward_intermediate_dense": "layers.{i}.mlp.up_proj",
                "feedforward_output_dense": "layers.{i}.mlp.down_proj",
            },
        ),
    },
    "gemma": {
        "task_type": "CAUSAL_LM",
        "prefix": "model.",
        "block": (r"decoder_block_(\d+)", 0),
        "layouts": (
            {
                "query": "layers.{i}.self_attn.q_proj",
                "key": "layers.{i}.self_attn.k_proj",
                "value": "layers.{i}.self_attn.v_proj",
                "attention_output": "layers.{i}.self_attn.o_proj",
                "ffw_gating": "layers.{i}.mlp.gate_proj",
                "ffw_gating_2": "layers.{i}.mlp.up_proj",
                "ffw_linear": "layers.{i}.mlp.down_proj",
            },
        ),
    },
    "vit": {
        "task_type": None,
        "prefix": "vit.",
        "block": (r"transformer_block_(\d+)", 1),
        "layouts": (
            {
                "query": "layers.{i}.attention.q_proj",
                "key": "layers.{i}.attention.k_proj",
                "value": "layers.{i}.attention.v_proj",
                "attention_output": "layers.{i}.attention.o_proj",
                "dense_1": "layers.{i}.mlp.fc1",
                "dense_2": "layers.{i}.mlp.fc2",
            },
            {
                "query": "encoder.layer.{i}.attention.attention.query",
                "key": "encoder.layer.{i}.attention.attention.key",
                "value": "encoder.layer.{i}.attention.attention.value",
                "attention_output": "encoder.layer.{i}.attention.output.dense",
                "dense_1": "encoder.layer.{i}.intermediate.dense",
                "dense_2": "encoder.layer.{i}.output.dense",
            },
        ),
    },
}


def hf_modules(architecture, path):
    """The transformers module names of the keras-hub layer at `path`,
    without the model prefix (`HF_MODULES[architecture]["prefix"]`): the
    current name first, then older ones. Empty when the table has none.

    Example: `hf_modules("llama", "transformer_layer_3/self_attention/query")`
    is `("layers.3.self_attn.q_proj",)`.
    """
    entry = HF_MODULES.get(architecture)
    if entry is None:
        return ()
    pattern, first = entry["block"]
    blocks = re.findall(rf"(?:^|/){pattern}/", path)
    name = path.rsplit("/", 1)[-1]
    if len(blocks) != 1:
        return ()
    index = int(blocks[0]) - first
    return tuple(
        layout[name].format(i=index) for layout in entry["layouts"] if name in layout
    )


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
