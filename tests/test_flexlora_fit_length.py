"""FlexLoRAScheduler and the length of the fit: a schedule the fit cannot
reach warns, `total_steps=None` takes the fit's own length, and the
orthogonality penalty is logged apart from the loss
(`flexlora/orth_penalty`)."""

import warnings

import keras
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.methods.flexlora import FlexLoRAScheduler

SAMPLES, BATCH = 32, 4  # 8 steps per epoch


def flex_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((12,))
    x = keras.layers.Dense(16, name="proj_a")(inputs)
    x = keras.layers.Dense(16, name="proj_b")(x)
    x = keras.layers.Dense(8, name="proj_c")(x)
    model = keras.Model(inputs, x)
    kal.apply_adapters(model, kal.FlexLoRA(rank=2, seed=seed), targets=["proj_a", "proj_b", "proj_c"])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    return model


def task(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SAMPLES, 12)).astype("float32")
    return x, rng.normal(size=(SAMPLES, 8)).astype("float32")


def test_a_schedule_longer_than_the_fit_warns_and_moves_nothing():
    model = flex_model()
    x, y = task()
    scheduler = FlexLoRAScheduler(total_steps=3000, b0=2, warmup_steps=300, final_steps=600,
                                  interval=10, verbose=0)
    with pytest.warns(UserWarning, match=r"ends at step 24 \(3 epochs x 8\).*no rank will move"):
        history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[scheduler])
    assert sum(history.history["flexlora/moves"]) == 0


def test_total_steps_none_takes_the_fit_length_and_moves_ranks():
    model = flex_model()
    x, y = task()
    scheduler = FlexLoRAScheduler(b0=2, warmup_steps=4, final_steps=4, interval=2, verbose=0)
    assert scheduler.total_steps is None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = model.fit(x, y, batch_size=BATCH, epochs=5, verbose=0, callbacks=[scheduler])
    assert not [w for w in caught if "FlexLoRAScheduler" in str(w.message)]  # it fits
    assert scheduler.total_steps == 5 * SAMPLES // BATCH
    assert scheduler.get_config()["total_steps"] == 40
    assert sum(history.history["flexlora/moves"]) > 0
    assert history.history["flexlora/total_rank"][-1] == 2 * 3


def test_total_steps_none_needs_a_fit_that_knows_its_length():
    model = flex_model()
    x, y = task()

    def batches():
        for start in range(0, SAMPLES, BATCH):
            yield x[start : start + BATCH], y[start : start + BATCH]

    scheduler = FlexLoRAScheduler(b0=2, warmup_steps=4, final_steps=4, interval=2, verbose=0)
    with pytest.raises(ValueError, match="needs a fit that knows its steps per epoch"):
        model.fit(batches(), epochs=2, verbose=0, callbacks=[scheduler])


def test_total_steps_none_still_checks_the_schedule():
    model = flex_model()
    x, y = task()
    scheduler = FlexLoRAScheduler(b0=2, warmup_steps=20, final_steps=20, interval=2, verbose=0)
    with pytest.raises(ValueError, match="must be smaller than total_steps = 16"):
        model.fit(x, y, batch_size=BATCH, epochs=2, verbose=0, callbacks=[scheduler])


def _penalty_oracle(adapter, weight):
    a = np.asarray(keras.ops.convert_to_numpy(adapter.flex_a), np.float64)
    b = np.asarray(keras.ops.convert_to_numpy(adapter.flex_b), np.float64)
    m = np.asarray(keras.ops.convert_to_numpy(adapter.flex_mask), np.float64)
    am, bm = a * m[None, :], b * m[:, None]
    return weight * (((am.T @ am - np.diag(m)) ** 2).sum() + ((bm @ bm.T - np.diag(m)) ** 2).sum())


def test_orth_penalty_is_logged_apart_from_the_loss():
    model = flex_model()
    x, y = task()
    scheduler = FlexLoRAScheduler(b0=2, warmup_steps=4, final_steps=4, interval=2, verbose=0)
    history = model.fit(x, y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[scheduler])
    logged = history.history["flexlora/orth_penalty"]
    assert len(logged) == 3 and all(0.0 < p for p in logged)
    adapters = kal.find_adapters(model)
    expected = sum(_penalty_oracle(a, a.orth_reg_weight) for a in adapters)
    assert logged[-1] == pytest.approx(expected, rel=1e-4)
    # It is a part of the loss: the loss with it removed is what the task costs.
    plain = float(keras.ops.convert_to_numpy(keras.losses.mean_squared_error(
        y, model.predict(x, verbose=0))).mean())
    evaluated = model.evaluate(x, y, verbose=0)
    assert evaluated == pytest.approx(plain + expected, rel=1e-3)
