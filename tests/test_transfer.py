"""The main job (`keras_adaptive_lora.apps.transfer`) in its smallest offline
setting, end to end on the current backend (table, parameter counts, plot,
results.json, the exported SavedModel against the model's predictions), the
generated tasks of `keras_adaptive_lora.apps.transfer.synthetic`, and the
job's errors."""

import json
import os

import keras
import keras_hub
import numpy as np
import pytest

pytest.importorskip("tensorflow")  # tf.data pipelines and the SavedModel

from keras_adaptive_lora.apps import transfer  # noqa: E402
from keras_adaptive_lora.apps.transfer import cli, options, report, synthetic, train  # noqa: E402
from keras_adaptive_lora.core.method import method_names  # noqa: E402

QUICK = options.OFFLINE["quick"]
ALL = options.all_methods()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer")
    lines = []
    keras.utils.set_random_seed(0)
    result = transfer.run_transfer(quick=True, output_dir=str(out), verbose=0, log=lines.append)
    return result, lines, str(out)


# --------------------------------------------------------------------------
# The job end to end (quick setting)
# --------------------------------------------------------------------------
def test_quick_run_table_has_one_row_per_method(quick_run):
    result, lines, _ = quick_run
    assert [r["method"] for r in result.rows] == list(ALL)  # offline default adds scratch
    table = result.table()
    body = table.splitlines()[2 : 2 + len(ALL)]
    assert [line.split()[0] for line in body] == list(ALL)
    assert f"{result.best} *" in table
    # A progress line per method, in order, then the table in the log.
    progress = [line for line in lines if line.startswith("[")]
    assert [p.split()[1] for p in progress] == list(ALL)
    assert [p.split()[0] for p in progress] == [f"[{i}/{len(ALL)}]" for i in range(1, len(ALL) + 1)]
    assert table in lines
    for row in result.rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0 and 0.0 <= row["val_accuracy"] <= 1.0
        assert row["ms_per_step"] > 0 and row["steps"] == 3  # 12 images, batch 4, 1 epoch


def _adapter_params(ranks, shapes, per_rank_extra=0, per_layer_extra=0):
    return sum(
        r * (shapes[p][0] + shapes[p][1]) + r * per_rank_extra + per_layer_extra
        for p, r in ranks.items()
    )


def _projection_shapes(hidden, mlp):
    """(d_in, d_out) of the ViT projections by name."""
    return {
        "query": (hidden, hidden), "key": (hidden, hidden), "value": (hidden, hidden),
        "attention_output": (hidden, hidden), "dense_1": (hidden, mlp), "dense_2": (mlp, hidden),
    }


def test_quick_run_trainable_parameter_counts(quick_run):
    result, _, out = quick_run
    rows = {r["method"]: r for r in result.rows}
    hidden, mlp, layers = QUICK["hidden_dim"], QUICK["mlp_dim"], QUICK["num_layers"]
    classes = len(synthetic.TARGET_CLASSES)
    head = hidden * classes + classes
    named = _projection_shapes(hidden, mlp)
    shapes = lambda ranks: {p: named[p.rsplit("/", 1)[-1]] for p in ranks}  # noqa: E731
    backbone = keras_hub.models.Backbone.from_preset(os.path.join(out, "pretrained_vit"))
    assert rows["linear"]["trainable_params"] == head
    assert rows["full"]["trainable_params"] == backbone.count_params() + head
    assert rows["scratch"]["trainable_params"] == rows["full"]["trainable_params"]
    # LoRA: rank 8 on query and value of every block.
    lora = rows["lora"]
    assert sorted({p.rsplit("/", 1)[-1] for p in lora["ranks"]}) == ["query", "value"]
    assert len(lora["ranks"]) == 2 * layers and set(lora["ranks"].values()) == {8}
    assert lora["trainable_params"] == head + 2 * layers * 8 * (hidden + hidden)
    # SR-LoRA: its own ranks on query, value, attention output.
    sr = rows["sr-lora"]
    assert sorted({p.rsplit("/", 1)[-1] for p in sr["ranks"]}) == ["attention_output", "query", "value"]
    assert sr["trainable_params"] == head + _adapter_params(sr["ranks"], shapes(sr["ranks"]))
    # FlexLoRA: capacity R per layer (A, B and lambda), every projection.
    assert sr["capacity"] == sr["ranks"]  # fixed ranks: capacity is the rank
    flex = rows["flexlora"]
    assert len(flex["capacity"]) == 6 * layers
    assert flex["initial_rank"] == 8 and flex["schedule"]  # its scheduler's settings
    assert flex["trainable_params"] == head + _adapter_params(
        flex["capacity"], shapes(flex["capacity"]), per_rank_extra=1
    )
    assert sum(flex["ranks"].values()) == 8 * len(flex["ranks"])  # total active rank is kept
    # LR-LoRA: rank 8 factors plus 2 x 50 transfer parameters per layer.
    sinc = rows["sinc"]
    assert sinc["trainable_params"] == head + _adapter_params(
        sinc["ranks"], shapes(sinc["ranks"]), per_layer_extra=100
    )
    assert set(sinc["update_stable_ranks"]) == set(sinc["ranks"])
    assert rows["linear"]["trainable_params"] < lora["trainable_params"] < rows["full"]["trainable_params"]
    # The kept best model reports the same count.
    model_count = sum(int(np.prod(v.shape)) for v in result.best_model.trainable_weights)
    assert model_count == result.row(result.best)["trainable_params"]


def test_quick_run_plot_and_results_json(quick_run):
    result, _, out = quick_run
    with open(result.plot_path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n" and os.path.getsize(result.plot_path) > 5000
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)
    assert [m["method"] for m in record["methods"]] == list(ALL)
    assert record["best"] == result.best
    assert record["backend"] == keras.backend.backend()
    assert record["config"]["shots"] == QUICK["shots"] and record["config"]["quick"] is True
    assert record["data"]["counts"]["train"] == {str(c): QUICK["shots"] for c in range(6)}
    assert record["pretraining"]["preset"] == os.path.join(out, "pretrained_vit")
    assert record["input"]["scale"] == pytest.approx(1 / 127.5)
    assert record["input"]["offset"] == pytest.approx(-1.0)
    for m, row in zip(record["methods"], result.rows):
        assert m["test_accuracy"] == pytest.approx(row["test_accuracy"])
        assert m["trainable_params"] == row["trainable_params"]


def test_quick_run_exported_saved_model_matches_the_model(quick_run):
    result, _, out = quick_run
    assert result.export_error is None
    assert os.path.isfile(os.path.join(result.saved_model_path, "saved_model.pb"))
    probe = np.load(result.probe_path)
    inputs, logits = probe["inputs"], probe["logits"]
    assert inputs.shape[1:] == (QUICK["image_size"], QUICK["image_size"], 3)
    # The probe holds the adapted (unmerged) model's logits.
    adapted = np.asarray(keras.ops.convert_to_numpy(result.best_model.predict(inputs, verbose=0)))
    np.testing.assert_allclose(adapted, logits, rtol=1e-5, atol=1e-5)
    # The merged .keras file predicts the same.
    merged = keras.saving.load_model(result.merged_path, compile=False)
    np.testing.assert_allclose(
        np.asarray(keras.ops.convert_to_numpy(merged.predict(inputs, verbose=0))),
        logits, rtol=1e-4, atol=1e-4,
    )
    # The SavedModel's `serve` endpoint, loaded by the TensorFlow runtime
    # (in this process whatever the Keras backend: no Keras involved).
    import tensorflow as tf

    loaded = tf.saved_model.load(result.saved_model_path)  # keep it alive while serving
    served = np.asarray(loaded.serve(tf.constant(inputs)))
    np.testing.assert_allclose(served, logits, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------
def test_parse_methods():
    compared = options.compared_methods()
    assert compared == options.BASELINES + tuple(method_names())  # the registry's methods
    assert options.parse_methods(None, offline=False) == compared
    assert options.parse_methods(None, offline=True) == ALL == compared + ("scratch",)
    assert options.parse_methods("sinc, LoRA,linear,lora") == ("linear", "lora", "sinc")
    assert options.parse_methods(["all"], offline=False) == compared


def test_titles_come_from_the_registry():
    assert options.title("linear") == "linear probe" and options.title("scratch") == "from scratch"
    assert options.title("sr-lora") == "SR-LoRA"
    assert cli.description().endswith(f"{options.adapter_titles()[-1]}; offline by default.")


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 20, 160, 1000])
def test_every_method_builds_and_gives_its_callbacks(steps):
    """Each registered method's spec from the job's generic options, and the
    callbacks it asks for over runs long and short (a single step included)."""
    for name in method_names():
        spec = train.method_spec(name, rank=2, seed=0, alpha=None)
        assert spec is not None and spec.name == name
        schedule = train.callback_schedule(spec.callbacks(steps, verbose=0))
        assert schedule is None or "verbose" not in schedule
    for name in options.BASELINES + options.REFERENCE_METHODS:
        assert train.method_spec(name, rank=2, seed=0) is None


def test_rank_grid_layout():
    ranks = {
        "vit_encoder/transformer_block_1/mha/value": 3,
        "vit_encoder/transformer_block_1/mha/query": 5,
        "vit_encoder/transformer_block_2/mlp/dense_1": 7,
    }
    blocks, roles, matrix = report.rank_grid(ranks)
    assert blocks == [1, 2] and roles == ["query", "value", "dense_1"]
    expected = np.array([[5, 3, np.nan], [np.nan, np.nan, 7]])
    np.testing.assert_array_equal(matrix, expected)


# --------------------------------------------------------------------------
# The generated tasks
# --------------------------------------------------------------------------
@pytest.mark.parametrize("task", [synthetic.source_task, synthetic.target_task])
def test_generated_task_shapes_range_and_balance(task):
    images, labels, names = task(48, seed=3, image_size=20)
    assert images.shape == (48, 20, 20, 3) and images.dtype == np.float32
    assert labels.shape == (48,) and labels.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 255.0
    counts = np.bincount(labels, minlength=len(names))
    assert counts.max() - counts.min() <= 1 and len(counts) == len(names)


@pytest.mark.parametrize("task", [synthetic.source_task, synthetic.target_task])
def test_generated_task_is_determined_by_its_seed(task):
    a, la, _ = task(12, seed=5)
    b, lb, _ = task(12, seed=5)
    c, lc, _ = task(12, seed=6)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    assert np.abs(a - c).mean() > 10.0


def test_shape_masks_areas_and_distinct_classes():
    size, n = 64, len(synthetic.SOURCE_CLASSES)
    masks = synthetic._shape_masks(np.arange(n), np.zeros(n), np.zeros(n), np.full(n, 0.5), np.zeros(n), size)
    area = masks.reshape(n, -1).mean(axis=1)  # fraction of the [-1, 1]^2 image
    by_name = dict(zip(synthetic.SOURCE_CLASSES, area))
    # Hand-computed areas for radius 0.5 in a square of side 2 (area 4).
    assert by_name["circle"] == pytest.approx(np.pi * 0.25 / 4, rel=0.05)
    assert by_name["square"] == pytest.approx(0.8**2 / 4, rel=0.05)  # half side 0.4
    assert by_name["ring"] == pytest.approx(np.pi * 0.25 * (1 - 0.3) / 4, rel=0.08)
    assert by_name["triangle"] == pytest.approx(3 * np.sqrt(3) / 4 * 0.25 / 4, rel=0.08)
    flat = masks.reshape(n, -1)
    for i in range(n):
        for j in range(i + 1, n):
            assert (flat[i] != flat[j]).mean() > 0.01, (synthetic.SOURCE_CLASSES[i], synthetic.SOURCE_CLASSES[j])


def test_target_classes_are_the_designed_shapes():
    images, labels, names = synthetic.target_task(1200, seed=0)
    assert names == synthetic.TARGET_CLASSES
    ink = images.sum(axis=-1) < 300  # the ink is far darker than the stained background
    # Expected ink fraction: unit-radius area * E[r^2] / 4, r ~ U(0.45, 0.75).
    mean_r2 = (0.75**3 - 0.45**3) / (3 * 0.30)
    unit_area = {
        "circle": np.pi, "square": 1.6**2, "triangle": 3 * np.sqrt(3) / 4,
        "cross": 2 * 1.2 - 0.36, "ring": np.pi * 0.7, "bar": 2 * 0.7,
    }
    for k, name in enumerate(names):
        measured = ink[labels == k].mean()
        assert measured == pytest.approx(unit_area[name] * mean_r2 / 4, rel=0.08), name
    # Ink pixels have the stain's ink colour, the rest the stain background's.
    assert images[ink].mean(axis=0) == pytest.approx(synthetic.STAIN_INK, abs=12)
    light, dark = synthetic.STAIN_LIGHT, synthetic.STAIN_DARK
    assert np.all(images[~ink].mean(axis=0) <= light) and np.all(images[~ink].mean(axis=0) >= dark)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"num_images": 0}, "num_images"), ({"num_images": 4, "image_size": 8}, "image_size")],
)
def test_generated_task_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic.source_task(**kwargs)


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": "lora,bogus"}, "Unknown method 'bogus'"),
        ({"shots": 0}, "`shots` must be an integer >= 1"),
        ({"epochs": 0}, "`epochs`"),
        ({"learning_rate": -1.0}, "`learning_rate`"),
        ({"preset": "/nonexistent/preset"}, "Could not load the keras-hub preset"),
        ({"image_size": 20}, "multiple of the offline ViT's patch size 8"),
        ({"methods": ""}, "No method selected"),
    ],
)
def test_run_transfer_rejects_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        transfer.run_transfer(output_dir=str(tmp_path), log=lambda line: None, **kwargs)


def test_quick_cannot_use_a_preset(tmp_path):
    with pytest.raises(ValueError, match="`quick` is the smallest offline setting"):
        transfer.run_transfer(quick=True, preset="x", output_dir=str(tmp_path))


def test_dataset_without_network_gives_a_clear_error(tmp_path, monkeypatch):
    from keras_adaptive_lora import data

    def offline(name, **kwargs):
        raise OSError(f"Failed to resolve 'storage.googleapis.com' while fetching {name}")

    monkeypatch.setattr(data, "few_shot_splits", offline)
    with pytest.raises(ValueError, match=r"Could not load the tfds dataset 'eurosat/rgb'.*network"):
        transfer.run_transfer(dataset="eurosat/rgb", quick=True, output_dir=str(tmp_path), log=lambda line: None)
    assert not os.path.exists(os.path.join(tmp_path, "pretrained_vit"))  # failed before pre-training


def test_real_mode_with_a_local_preset_and_mocked_tfds(quick_run, tmp_path):
    """`--preset DIR --dataset NAME`: the preset's converter and
    `data.few_shot_splits` (tfds mocked offline), VTAB-1k-style 1-shot default."""
    tfds = pytest.importorskip("tensorflow_datasets")
    preset = os.path.join(quick_run[2], "pretrained_vit")
    with tfds.testing.mock_data(num_examples=120):
        result = transfer.run_transfer(
            preset=preset, dataset="eurosat/rgb", test_split="train", test_size=20,
            methods="linear", epochs=1, output_dir=str(tmp_path), verbose=0, export=False,
            plot=False, log=lambda line: None,
        )
    with open(result.results_path) as f:
        record = json.load(f)
    classes = 10
    assert record["data"]["task"] == "eurosat/rgb" and record["data"]["num_classes"] == classes
    assert record["data"]["counts"]["train"] == {str(c): 1 for c in range(classes)}
    assert record["config"]["shots"] == 1 and record["config"]["batch_size"] == 4
    assert record["pretraining"] is None and record["config"]["preset"] == preset
    assert record["input"]["image_size"] == [QUICK["image_size"]] * 2  # from the preset
    assert record["input"]["scale"] == pytest.approx(1 / 127.5)  # its image converter
    assert [r["method"] for r in result.rows] == ["linear"]
    assert result.row("linear")["trainable_params"] == QUICK["hidden_dim"] * classes + classes


def test_cli_returns_2_and_names_the_problem(tmp_path, capsys):
    code = transfer.main(["--methods", "nope", "--output-dir", str(tmp_path), "--quick"])
    assert code == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err


def test_python_dash_m_runs_the_job(tmp_path, capsys, monkeypatch):
    """`python -m keras_adaptive_lora.apps.transfer` (in process: `runpy`)."""
    import runpy
    import sys

    argv = ["transfer", "--methods", "nope", "--output-dir", str(tmp_path), "--quick"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("keras_adaptive_lora.apps.transfer", run_name="__main__")
    assert exit_info.value.code == 2
    assert "Unknown method 'nope'" in capsys.readouterr().err
