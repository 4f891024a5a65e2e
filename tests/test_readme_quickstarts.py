"""The README's quick starts, run as written on a tiny Gemma causal LM."""

import keras
import keras_hub
import numpy as np
import pytest
from conftest import tiny_gemma, to_numpy, token_batch

import keras_adaptive_lora as kal
from keras_adaptive_lora.methods.flexlora import FlexLoRAScheduler


def tiny_lm():
    backbone = tiny_gemma()
    lm = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm, backbone


DATA = token_batch(batch=8, seq=6)
LABELS = np.random.default_rng(0).integers(0, 20, (8, 6))


@pytest.mark.parametrize(
    "method",
    [
        kal.LoRA(rank=2, alpha=4),
        kal.StableRankLoRA(alpha=1.0, spu=True, max_rank=None, budget=None, seed=0),
        kal.SincLoRA(rank=2, grid_size=8),
    ],
    ids=["lora", "sr-lora", "sinc"],
)
def test_quick_start(method):
    lm, backbone = tiny_lm()
    if isinstance(method, kal.StableRankLoRA):
        plan = kal.plan_ranks(backbone, method)
        assert "stable" in str(plan).lower()
    report = kal.apply_adapters(backbone, method)
    assert len(report) > 0 and str(report)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lm.fit(DATA, LABELS, epochs=2, batch_size=4, verbose=0)
    sranks = kal.update_stable_ranks(backbone)
    assert set(sranks) == {row["path"] for row in report.rows}
    assert all(np.isfinite(v) and v > 0 for v in sranks.values())
    logits = to_numpy(lm.predict(DATA, verbose=0))
    assert kal.merge_adapters(backbone) == len(report)
    np.testing.assert_allclose(to_numpy(lm.predict(DATA, verbose=0)), logits, rtol=1e-4, atol=1e-4)


def test_flexlora_quick_start():
    lm, backbone = tiny_lm()
    report = kal.apply_adapters(backbone, kal.FlexLoRA(rank=2))
    scheduler = FlexLoRAScheduler(total_steps=12, b0=2, warmup_steps=2, final_steps=2, interval=1, verbose=0)
    history = lm.fit(DATA, LABELS, epochs=6, batch_size=4, verbose=0, callbacks=[scheduler])
    pattern = scheduler.rank_pattern
    assert set(pattern) == {row["path"] for row in report.rows}
    assert sum(pattern.values()) == 2 * len(report)
    assert history.history["flexlora/total_rank"][-1] == 2 * len(report)
    h = scheduler.rank_history()
    assert np.asarray(h["ranks"]).shape[1] == len(report)
    logits = to_numpy(lm.predict(DATA, verbose=0))
    kal.merge_adapters(backbone)
    np.testing.assert_allclose(to_numpy(lm.predict(DATA, verbose=0)), logits, rtol=1e-4, atol=1e-4)
