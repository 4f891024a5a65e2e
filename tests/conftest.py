"""Shared fixtures: tiny keras-hub backbones built from config (no downloads)
and plain Keras models. The backend comes from KERAS_BACKEND."""

import os

# XLA on CPU (jax, and the jax subprocesses some tests start): compile with
# LLVM's cheap pipeline. The suite's models are tiny, so compiling each
# function, not running it, is most of the jax suite's time; this halves it.
# The HLO passes (fusion, layouts, buffers) are unchanged, only the machine
# code is less optimized. Set before the first computation; a caller's own
# setting of these flags wins.
_FAST_XLA_CPU = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_XLA_CPU}".strip()

import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from keras import ops  # noqa: E402


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def tiny_gemma(cls=None, **overrides):
    cls = cls or keras_hub.models.GemmaBackbone
    config = dict(
        vocabulary_size=20,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=4,
    )
    config.update(overrides)
    return cls(**config)


def tiny_gemma2():
    return tiny_gemma(
        query_head_dim_normalize=False,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
        final_logit_soft_cap=30,
        attention_logit_soft_cap=50,
        use_sliding_window_attention=True,
        sliding_window_size=4,
    )


def tiny_gemma3():
    return keras_hub.models.Gemma3Backbone(
        vocabulary_size=20,
        image_size=None,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=4,
        vision_encoder=None,
    )


def tiny_llama(cls=None):
    cls = cls or keras_hub.models.LlamaBackbone
    return cls(
        vocabulary_size=10,
        num_layers=1,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=8,
        intermediate_dim=8,
    )


def tiny_vit():
    return keras_hub.models.ViTBackbone(
        image_shape=(28, 28, 3),
        patch_size=(4, 4),
        num_layers=1,
        num_heads=6,
        hidden_dim=48,
        mlp_dim=96,
    )


def token_batch(vocab=20, batch=2, seq=6, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, vocab, (batch, seq)).astype("int32"),
        "padding_mask": np.ones((batch, seq), "int32"),
    }


def image_batch(batch=2, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, 28, 28, 3)).astype("float32")


@pytest.fixture(autouse=True)
def _seed_and_policy():
    """Each test starts from the same seed and the float32 policy."""
    keras.utils.set_random_seed(1234)
    keras.mixed_precision.set_global_policy("float32")
    yield
    keras.mixed_precision.set_global_policy("float32")
