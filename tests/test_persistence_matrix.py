"""Persistence for every method (LoRA, SR-LoRA, FlexLoRA, SincLoRA):

- training resumed from `ModelCheckpoint(save_weights_only=True)` or
  `BackupAndRestore` equals an uninterrupted run (SR-LoRA's SPU sampler state
  and FlexLoRA's masks and schedule position included);
- adapter files of a fitted model loaded into a fresh
  `from_preset(local_dir)` base: tiny Gemma (the resume run's model) and
  tiny ViT classifier (with a `train_also` head);
- adapter files moved to another backend (torch -> jax,
  jax -> tensorflow, tensorflow -> torch), and merged SavedModel export
  (in-process under tensorflow; under jax, `save_merged` + `cli export` in
  the same tensorflow subprocess that loads jax's adapter files). The
  subprocesses handle all methods at once to keep the suite fast: one
  subprocess per backend's suite. A torch-written merged file exported by
  `cli export` under tensorflow is examples/backend_swap_export.py, run by
  tests/test_examples.py.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.methods.flexlora import FlexLoRAScheduler, rank_pattern

from conftest import image_batch, tiny_gemma, tiny_vit, to_numpy, token_batch
from test_io import METHODS, _lm

BACKEND = keras.backend.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = sorted(METHODS)


def _lm_data(n=4, seq=6, vocab=20):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab, (n, seq + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, seq), "int32")}
    return x, tokens[:, 1:]


def _state(model):
    """`{layer path::variable: value}` of every adapter variable."""
    return {
        f"{a.path}::{name}": to_numpy(v)
        for a in kal.find_adapters(model)
        for name, v in a.own_variables()
    }


@pytest.fixture(scope="module")
def gemma_preset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gemma") / "preset")
    keras.utils.set_random_seed(11)
    tiny_gemma().save_to_preset(path)
    return path


@pytest.fixture(scope="module")
def vit_preset(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("vit") / "preset")
    keras.utils.set_random_seed(12)
    tiny_vit().save_to_preset(path)
    return path


def _assert_states_equal(got, want, atol=0.0):
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=0, atol=atol, err_msg=key)


# --------------------------------------------------------------------------
# Resume from ModelCheckpoint / BackupAndRestore
# --------------------------------------------------------------------------
EPOCHS, CUT = 3, 1  # 2 steps per epoch; the run is cut after epoch CUT
FIT = dict(batch_size=2, shuffle=False, verbose=0)


class _CrashSnapshot(keras.callbacks.Callback):
    """At the end of epoch `CUT` (after the checkpoint callbacks before it in
    the list), copy the backup folder as a crash there would leave it, and
    record the adapter state and ranks."""

    def __init__(self, backup, copy):
        super().__init__()
        self.backup, self.copy = backup, copy

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == CUT:
            shutil.copytree(self.backup, self.copy)
            self.state = _state(self.model)
            self.ranks = rank_pattern(self.model)


class _StateAtStart(keras.callbacks.Callback):
    """Records the adapter state when training starts (after a restore by a
    callback before it in the list)."""

    def on_train_begin(self, logs=None):
        self.state = _state(self.model)


def _resume_model(preset, name, seed=7):
    """A fresh model; a rebuilt one (another `seed`) starts from other
    adapter values, so only a real restore can match the first run."""
    keras.utils.set_random_seed(seed)
    lm = _lm(keras_hub.models.GemmaBackbone.from_preset(preset))
    kal.apply_adapters(lm, METHODS[name]())
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return lm


def _schedule(name):
    """A fresh scheduler per run (FlexLoRA): moves at steps 1..3 of 6."""
    if name != "flexlora":
        return []
    return [FlexLoRAScheduler(EPOCHS * 2, b0=16, warmup_steps=0, final_steps=1, interval=1, verbose=0)]


@pytest.fixture(scope="module", params=NAMES)
def run(request, gemma_preset, tmp_path_factory):
    """One uninterrupted run per method (tiny GemmaCausalLM, EPOCHS x 2
    steps) that also leaves an epoch-CUT `ModelCheckpoint` weights file and
    a `BackupAndRestore` folder as a crash after epoch CUT would leave it."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"run_{name}")
    x, y = _lm_data()
    checkpoint = str(folder / "ckpt-{epoch}.weights.h5")
    snapshot = _CrashSnapshot(str(folder / "backup"), str(folder / "crashed"))
    model = _resume_model(gemma_preset, name)
    initial = _state(model)
    model.fit(
        x, y, epochs=EPOCHS, **FIT,
        callbacks=_schedule(name) + [
            keras.callbacks.ModelCheckpoint(checkpoint, save_weights_only=True),
            keras.callbacks.BackupAndRestore(snapshot.backup),
            snapshot,
        ],
    )
    return dict(
        name=name, model=model, x=x, y=y, preset=gemma_preset, initial=initial,
        at_cut=snapshot.state, ranks_at_cut=snapshot.ranks, state=_state(model),
        out=to_numpy(model(x, training=False)),
        checkpoint=checkpoint.format(epoch=CUT), crashed=snapshot.copy,
    )


def _assert_same_as_run(model, run):
    assert int(to_numpy(model.optimizer.iterations)) == 2 * EPOCHS
    _assert_states_equal(_state(model), run["state"], atol=1e-6)
    np.testing.assert_allclose(to_numpy(model(run["x"], training=False)), run["out"], rtol=0, atol=1e-5)
    if run["name"] == "flexlora":
        assert rank_pattern(model) == rank_pattern(run["model"])


def test_run_changes_what_a_resume_must_restore(run):
    """Guards the resume tests: the state at the cut differs from the start
    and from the end, so a resume that restored less would be caught."""
    at_cut, initial, final = run["at_cut"], run["initial"], run["state"]
    assert int(to_numpy(run["model"].optimizer.iterations)) == 2 * EPOCHS
    assert any(not np.array_equal(final[k], at_cut[k]) for k in at_cut)
    if run["name"] == "stable_rank":  # the SPU sampler advances at every step
        seeds = [k for k in at_cut if k.endswith("seed_generator_state")]
        assert seeds and all(not np.array_equal(at_cut[k], initial[k]) for k in seeds)
    if run["name"] == "flexlora":  # ranks moved before the cut and move again after it
        assert sorted(set(run["ranks_at_cut"].values())) != [2]
        assert run["ranks_at_cut"] != rank_pattern(run["model"])


def test_resume_from_model_checkpoint(run):
    model = _resume_model(run["preset"], run["name"], seed=8)
    assert any(not np.array_equal(v, run["initial"][k]) for k, v in _state(model).items())
    model.optimizer.build(model.trainable_variables)
    model.load_weights(run["checkpoint"])
    _assert_states_equal(_state(model), run["at_cut"])
    assert int(to_numpy(model.optimizer.iterations)) == 2 * CUT
    model.fit(run["x"], run["y"], epochs=EPOCHS, initial_epoch=CUT, callbacks=_schedule(run["name"]), **FIT)
    _assert_same_as_run(model, run)


def test_resume_from_backup_and_restore(run):
    model = _resume_model(run["preset"], run["name"], seed=8)
    start = _StateAtStart()
    history = model.fit(
        run["x"], run["y"], epochs=EPOCHS, **FIT,
        callbacks=_schedule(run["name"]) + [keras.callbacks.BackupAndRestore(run["crashed"]), start],
    )
    _assert_states_equal(start.state, run["at_cut"])
    assert history.epoch == list(range(CUT, EPOCHS))
    _assert_same_as_run(model, run)


def test_adapter_file_into_fresh_gemma_preset(run, tmp_path):
    name, trained, x = run["name"], run["model"], run["x"]
    path = str(tmp_path / "adapters.npz")
    metadata = kal.save_adapters(trained, path)

    fresh = _lm(keras_hub.models.GemmaBackbone.from_preset(run["preset"]))
    before = to_numpy(fresh(x, training=False))
    report = kal.load_adapters(fresh, path)
    assert np.abs(run["out"] - before).max() > 1e-4  # training changed the outputs
    np.testing.assert_allclose(to_numpy(fresh(x, training=False)), run["out"], rtol=0, atol=1e-6)
    # Every adapter variable, non-trainable state included, is restored.
    _assert_states_equal(_state(fresh), run["state"])
    # Same adapted layers, ranks and trainable variables; the base is frozen.
    assert [r["path"] for r in report.rows] == [layer["path"] for layer in metadata["layers"]]
    assert [a.rank() for a in kal.find_adapters(fresh)] == [a.rank() for a in kal.find_adapters(trained)]
    assert {v.path for v in fresh.trainable_variables} == {v.path for v in trained.trainable_variables}
    assert type(report.method) is type(METHODS[name]())
    if name == "flexlora":
        assert rank_pattern(fresh) == rank_pattern(trained)
    if name == "stable_rank":
        assert any(k.endswith("seed_generator_state") for k in run["state"])


# --------------------------------------------------------------------------
# save_adapters -> load_adapters into a fresh ViT from_preset
# --------------------------------------------------------------------------
def _vit_classifier(preset):
    return keras_hub.models.ViTImageClassifier(
        backbone=keras_hub.models.ViTBackbone.from_preset(preset),
        num_classes=3,
        preprocessor=None,
    )


@pytest.mark.parametrize("name", NAMES)
def test_vit_fit_save_load_into_fresh_preset(name, vit_preset, tmp_path):
    model = _vit_classifier(vit_preset)
    kal.apply_adapters(model, METHODS[name](), train_also=["predictions"])
    images = image_batch(batch=4)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callbacks = []
    if name == "flexlora":
        callbacks = [FlexLoRAScheduler(4, b0=8, warmup_steps=0, final_steps=1, interval=1, verbose=0)]
    model.fit(images, np.array([0, 1, 2, 0]), epochs=1, callbacks=callbacks, **FIT)
    path = str(tmp_path / "adapters.npz")
    metadata = kal.save_adapters(model, path)
    assert {e["path"] for e in metadata["train_also"]} == {"predictions/kernel", "predictions/bias"}

    fresh = _vit_classifier(vit_preset)
    kal.load_adapters(fresh, path)
    want = to_numpy(model(images, training=False))
    np.testing.assert_allclose(to_numpy(fresh(images, training=False)), want, rtol=0, atol=1e-6)
    _assert_states_equal(_state(fresh), _state(model))
    assert {v.path for v in fresh.trainable_variables} == {v.path for v in model.trainable_variables}
    if name == "flexlora":
        assert rank_pattern(fresh) == rank_pattern(model)
        assert sorted(set(rank_pattern(model).values())) != [2]  # the schedule moved ranks


# --------------------------------------------------------------------------
# Across backends, and merged SavedModel export, all methods per subprocess
# --------------------------------------------------------------------------
#: The backend each backend's adapter files are moved to.
MOVE_TO = {"torch": "jax", "jax": "tensorflow", "tensorflow": "torch"}
#: The backend whose merged `.keras` files a tensorflow subprocess exports
#: with `cli export` (its move target is tensorflow: one subprocess does both).
CLI_EXPORT_FROM = "jax"


def _perturb(model, seed=0):
    """Set every adapter variable to seeded non-default values (masks 0/1)."""
    rng = np.random.default_rng(seed)
    for adapter in kal.find_adapters(model):
        for name, variable in adapter.own_variables():
            shape = tuple(variable.shape)
            if name == "flex_mask":
                value = (rng.random(shape) < 0.6).astype("float32")
                value[0] = 1.0
            elif "int" in str(variable.dtype):
                value = rng.integers(1, 1000, shape).astype(str(variable.dtype))
            else:
                value = rng.normal(0.0, 0.3, shape).astype("float32")
            variable.assign(value)


@pytest.fixture(scope="module")
def exchange(gemma_preset, tmp_path_factory):
    """Adapter files, merged `.keras` files and expected outputs of a tiny
    Gemma with every method, written under this process's backend."""
    folder = tmp_path_factory.mktemp("exchange")
    x = token_batch(batch=2, seq=6, seed=3)
    np.savez(str(folder / "x.npz"), **x)
    models = {}
    for i, name in enumerate(NAMES):
        keras.utils.set_random_seed(20 + i)
        backbone = keras_hub.models.GemmaBackbone.from_preset(gemma_preset)
        base = to_numpy(backbone(x, training=False))
        kal.apply_adapters(backbone, METHODS[name]())
        _perturb(backbone, seed=i)
        want = to_numpy(backbone(x, training=False))
        assert np.abs(want - base).max() > 1e-2, name  # the adapters matter
        np.save(str(folder / f"{name}.want.npy"), want)
        kal.save_adapters(backbone, str(folder / f"{name}.npz"))
        if BACKEND == CLI_EXPORT_FROM:
            kal.save_merged(backbone, str(folder / f"{name}.keras"))
        models[name] = backbone
    return {"folder": str(folder), "x": x, "models": models, "preset": gemma_preset}


_CHILD = textwrap.dedent(
    """
    import json, sys
    import keras, keras_hub, numpy as np
    import keras_adaptive_lora as kal
    from keras_adaptive_lora.cli import main

    job = json.loads(sys.argv[1])
    folder, out = job["folder"], {"backend": keras.backend.backend()}
    x = dict(np.load(folder + "/x.npz"))
    for name in job["load"]:
        model = keras_hub.models.GemmaBackbone.from_preset(job["preset"])
        kal.load_adapters(model, f"{folder}/{name}.npz")
        got = np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))
        kal.save_adapters(model, f"{folder}/{name}.again.npz")
        with np.load(f"{folder}/{name}.npz") as a, np.load(f"{folder}/{name}.again.npz") as b:
            keys = sorted(k for k in a.files if k != "__metadata__")
            # Same values; same dtypes except seed-generator states, whose
            # integer dtype is the backend's (int32 torch, int64 tf, uint32 jax).
            exact = keys == sorted(k for k in b.files if k != "__metadata__") and all(
                np.array_equal(a[k], b[k])
                and (a[k].dtype == b[k].dtype or a[k].dtype.kind in "iu" and b[k].dtype.kind in "iu")
                for k in keys
            )
        out[f"load/{name}"] = {
            "diff": float(np.abs(got - np.load(f"{folder}/{name}.want.npy")).max()),
            "exact": bool(exact),
            "arrays": len(keys),
            "adapters": len(kal.find_adapters(model)),
        }
    if job["export"]:
        import tensorflow as tf
    for name in job["export"]:
        saved = f"{folder}/{name}.saved_model"
        assert main(["export", f"{folder}/{name}.keras", saved]) == 0
        loaded = tf.saved_model.load(saved)  # keep it alive while serving
        served = loaded.serve(x).numpy()
        out[f"export/{name}"] = float(np.abs(served - np.load(f"{folder}/{name}.want.npy")).max())
    print("RESULT " + json.dumps(out))
    """
)

_RESULTS = {}


def _child_results(exchange, backend, load, export):
    """Run `_CHILD` under `backend` once per module; its parsed results."""
    if backend not in _RESULTS:
        job = {
            "folder": exchange["folder"],
            "preset": exchange["preset"],
            "load": list(load),
            "export": list(export),
        }
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT)
        result = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(job)],
            env=env, capture_output=True, text=True, timeout=600,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        assert result.returncode == 0 and lines, (
            f"{backend} subprocess exited {result.returncode}\n"
            + result.stdout[-3000:] + result.stderr[-3000:]
        )
        _RESULTS[backend] = json.loads(lines[-1][len("RESULT "):])
        print(f"{BACKEND} -> {backend}:", _RESULTS[backend])  # shown with -s
    return _RESULTS[backend]


def _jobs(backend):
    """`(load, export)` method lists the subprocess under `backend` runs."""
    load = NAMES if MOVE_TO[BACKEND] == backend else []
    export = NAMES if backend == "tensorflow" and BACKEND == CLI_EXPORT_FROM else []
    return load, export


def test_adapter_files_move_to_another_backend(exchange):
    target = MOVE_TO[BACKEND]
    results = _child_results(exchange, target, *_jobs(target))
    assert results["backend"] == target
    for name in NAMES:
        got = results[f"load/{name}"]
        adapters = len(kal.find_adapters(exchange["models"][name]))
        assert got["exact"], f"{name}: values changed in the move"
        assert got["adapters"] == adapters and got["arrays"] >= 2 * adapters, (name, got)
        assert got["diff"] <= 1e-5, (name, got)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="in-process SavedModel export needs tensorflow")
@pytest.mark.parametrize("name", NAMES)
def test_export_merged_serves_adapted_outputs(name, exchange, tmp_path):
    import tensorflow as tf

    backbone, x = exchange["models"][name], exchange["x"]
    want = np.load(os.path.join(exchange["folder"], f"{name}.want.npy"))
    path = str(tmp_path / "saved_model")
    kal.export_merged(backbone, path)
    loaded = tf.saved_model.load(path)
    served = loaded.serve(x).numpy()
    assert np.abs(served - want).max() <= 1e-5
    assert len(kal.find_adapters(backbone)) > 0  # the merge was temporary
    np.testing.assert_array_equal(to_numpy(backbone(x, training=False)), want)


@pytest.mark.skipif(
    BACKEND != CLI_EXPORT_FROM,
    reason=f"runs under the {CLI_EXPORT_FROM} suite (whose tensorflow subprocess also loads "
    "its adapter files); a torch-written merged file is exported by "
    "examples/backend_swap_export.py (tests/test_examples.py)",
)
def test_export_from_other_backend_via_cli(exchange):
    results = _child_results(exchange, "tensorflow", *_jobs("tensorflow"))
    assert results["backend"] == "tensorflow"
    for name in NAMES:
        assert results[f"export/{name}"] <= 1e-5, (name, results[f"export/{name}"])
