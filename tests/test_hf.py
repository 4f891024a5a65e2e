"""Export from every backend, and keras-hub's own writers refusing adapters.

- `export_merged` under jax runs in process (Keras's jax2tf export; a
  keras-hub text model needs its `token_ids` and `padding_mask` lengths
  shared, the retry), under torch through a tensorflow subprocess; the
  SavedModel's `serve` equals the adapted model, at another batch size and
  length too. (Under tensorflow: tests/test_persistence_matrix.py.)
- keras-hub's `export_to_transformers` on an unmerged model refuses like
  `save_to_preset` (Gemma's exporter reads `weights[0]`, Llama 3's
  `kernel`), writing nothing; merged, it writes the adapted weights, and the
  Hugging Face weight of a projection is its matrix view transposed (what
  `targets.HF_MODULES` and the PEFT files rely on).

Hugging Face checkpoints in and PEFT adapters: tests/test_peft.py.
"""

import os

import keras
import keras_hub
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.saving._safetensors import read_safetensors
from keras_adaptive_lora.targets import HF_MODULES, hf_modules

from conftest import tiny_gemma, to_numpy, token_batch

BACKEND = keras.backend.backend()


def _adapted_gemma():
    model = tiny_gemma()
    kal.apply_adapters(model, kal.LoRA(rank=2))
    rng = np.random.default_rng(0)
    for adapter in kal.find_adapters(model):
        adapter.lora_b.assign(rng.normal(0.0, 0.5, adapter.lora_b.shape).astype("float32"))
    return model


def _check_served(model, path):
    import tensorflow as tf

    served = tf.saved_model.load(path)  # kept alive while serving
    for x in (token_batch(), token_batch(batch=3, seq=9, seed=1)):
        want = to_numpy(model.predict(x, verbose=0))  # jax: compiled, faster than eager
        got = np.asarray(served.serve(x))
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.skipif(BACKEND != "jax", reason="jax's in-process export; tensorflow's is in "
                    "test_persistence_matrix.py, torch's subprocess below")
def test_export_merged_under_jax_is_native(tmp_path):
    model = _adapted_gemma()
    path = kal.export_merged(model, str(tmp_path / "saved_model"))
    _check_served(model, path)
    assert len(kal.find_adapters(model)) == 2  # the merge was temporary


@pytest.mark.skipif(BACKEND != "torch", reason="Keras exports in process under tensorflow and jax")
def test_export_merged_under_torch_goes_through_tensorflow(tmp_path):
    model = _adapted_gemma()
    path = kal.export_merged(model, str(tmp_path / "saved_model"))
    _check_served(model, path)
    assert len(kal.find_adapters(model)) == 2
    with pytest.raises(ValueError, match=r"tensorflow subprocess, which cannot take export arg"):
        kal.export_merged(model, str(tmp_path / "other"), input_signature=[])
    assert not os.path.exists(tmp_path / "other")


def test_export_to_transformers_refuses_unmerged_adapters(tmp_path):
    gemma = tiny_gemma()  # the exporter reads `value_dense.weights[0]`
    llama = keras_hub.models.Llama3Backbone(  # ... and `_query_dense.kernel`
        vocabulary_size=10, num_layers=1, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=8, intermediate_dim=8,
    )
    for arch, backbone, targets in (("gemma", gemma, ["value"]), ("llama", llama, None)):
        kal.apply_adapters(backbone, kal.LoRA(rank=2), targets=targets)
        adapters = kal.find_adapters(backbone)
        for adapter in adapters:
            adapter.lora_b.assign(np.full(adapter.lora_b.shape, 0.3, "float32"))
        assert not hasattr(adapters[0], "kernel")
        out = str(tmp_path / arch)
        with pytest.raises(ValueError, match=r"unmerged LoRAAdapter; keras-hub's "
                           r"`export_to_transformers`.*merge_adapters.*save_adapters"):
            backbone.export_to_transformers(out)
        assert not os.path.exists(out)
        want = {a.path: to_numpy(a.view.to_matrix(a.merged_kernel())) for a in adapters}
        kal.merge_adapters(backbone)
        backbone.export_to_transformers(out)
        tensors, _ = read_safetensors(os.path.join(out, "model.safetensors"))
        for path, matrix in want.items():
            module = HF_MODULES[arch]["prefix"] + hf_modules(arch, path)[0]
            np.testing.assert_allclose(tensors[f"{module}.weight"], matrix.T, atol=1e-6)
