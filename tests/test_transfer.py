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
from keras_adaptive_lora.apps.transfer import (  # noqa: E402
    budget,
    cli,
    options,
    plot,
    report,
    settings,
    splits,
    stats,
    synthetic,
    train,
)
from keras_adaptive_lora.apps.transfer import data as data_module  # noqa: E402
from keras_adaptive_lora.core.method import get_method, method_names  # noqa: E402

QUICK = options.OFFLINE["quick"]
SEEDS = (0, 1)
# Every method but `scratch` (the `full` code path from a random init): the
# run is compile-bound, two seeds each.
METHODS = options.compared_methods()
ADAPTERS = tuple(method_names())
HEAD = QUICK["hidden_dim"] * len(synthetic.TARGET_CLASSES) + len(synthetic.TARGET_CLASSES)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The quick setting with 2 seeds, every method but scratch, matched
    budgets (the default), on the current backend."""
    out = tmp_path_factory.mktemp("transfer")
    lines = []
    result = transfer.run_transfer(
        quick=True, seeds=",".join(map(str, SEEDS)), methods=",".join(METHODS),
        output_dir=str(out), log=lines.append,
    )
    return result, lines, str(out)


# --------------------------------------------------------------------------
# The job end to end (quick setting, 2 seeds)
# --------------------------------------------------------------------------
def test_quick_run_budgets_match_within_5_percent(quick_run):
    result, lines, _ = quick_run
    budget = result.budget
    assert budget["mode"] == "same" and budget["targets"] == ["query", "value"]
    assert budget["within_tolerance"] and budget["spread"] <= 0.05
    counts = {}
    for method in ADAPTERS:
        for run in result.runs[method]:
            # The same layers for every adapter method, and the planned count built.
            assert run["targets"] == ["query", "value"], method
            assert len(run["initial_ranks"]) == 2 * QUICK["num_layers"]
            assert run["adapter_params"] == budget["methods"][method]["adapter_params"]
            assert run["trainable_params"] == run["adapter_params"] + HEAD
            assert run["size"] == budget["methods"][method]["options"]
        counts[method] = result.row(method)["trainable_params"]
    assert max(counts.values()) / min(counts.values()) <= 1.05, counts
    # Each method is sized by its own option (a rank or a budget), and the
    # matched counts are printed.
    assert all(len(result.runs[m][0]["size"]) == 1 for m in ADAPTERS)
    printed = "\n".join(lines)
    for method in ADAPTERS:
        assert f"{budget['methods'][method]['adapter_params']:,} adapter parameters" in printed


def test_quick_run_table_has_mean_and_standard_error_per_method(quick_run):
    result, lines, _ = quick_run
    assert [r["method"] for r in result.rows] == list(METHODS)
    table = result.table()
    assert table in lines
    body = table.splitlines()[2 : 2 + len(METHODS)]
    for line, row in zip(body, result.rows):
        runs = result.runs[row["method"]]
        assert [r["seed"] for r in runs] == list(SEEDS) == row["seeds"]
        accuracies = np.array([r["test_accuracy"] for r in runs])
        mean, se = accuracies.mean(), accuracies.std(ddof=1) / np.sqrt(len(SEEDS))
        assert row["test_accuracy"] == pytest.approx(mean)
        assert row["test_accuracy_se"] == pytest.approx(se)
        assert line.split()[0] == row["method"]
        assert f"{mean:.3f} ± {se:.3f}" in line
    assert "mean ± standard error over 2 seeds (0, 1)" in table
    assert f"{result.best} *" in table and "* best mean validation accuracy (exported)" in table
    # The ViT is pre-trained once for all the seeds.
    assert sum(line.startswith("pre-training a ViT") for line in lines) == 1
    assert sum(line.startswith("pre-trained in") for line in lines) == 1
    # One progress line per method, in order, and few lines in all.
    progress = [line for line in lines if line.startswith("[")]
    assert [p.split()[1] for p in progress] == list(METHODS)
    assert all("±" in p for p in progress)
    assert len(lines) < 60


def test_quick_run_results_json_keeps_every_seed(quick_run):
    result, _, out = quick_run
    with open(os.path.join(out, "results.json")) as f:
        record = json.load(f)
    assert [m["method"] for m in record["methods"]] == list(METHODS)
    runs = record["runs"]
    assert len(runs) == len(METHODS) * len(SEEDS)
    assert {(r["method"], r["seed"]) for r in runs} == {(m, s) for m in METHODS for s in SEEDS}
    for run in runs:
        kept = next(r for r in result.runs[run["method"]] if r["seed"] == run["seed"])
        assert run["test_accuracy"] == pytest.approx(kept["test_accuracy"])
        assert run["val_accuracy"] == pytest.approx(kept["val_accuracy"])
    assert record["config"]["seeds"] == list(SEEDS) and record["config"]["budget"] == "same"
    assert record["budget"]["within_tolerance"] is True
    pairs = {(c["a"], c["b"]) for c in record["comparisons"]}
    assert len(pairs) == len(METHODS) * (len(METHODS) - 1) // 2
    assert record["best"] == result.best and record["best_seed"] in SEEDS
    assert record["backend"] == keras.backend.backend()
    assert record["config"]["shots"] == QUICK["shots"] and record["config"]["quick"] is True
    assert record["data"]["counts"]["train"] == {str(c): QUICK["shots"] for c in range(6)}
    assert record["pretraining"]["preset"] == os.path.join(out, "pretrained_vit")
    assert record["input"]["scale"] == pytest.approx(1 / 127.5)
    assert record["machine"]["cpus"] == os.cpu_count() and len(record["machine"]["load_average"]) == 3
    assert record["seconds"] > 0


def test_quick_run_seeds_change_the_sample(quick_run):
    result, _, _ = quick_run
    # A seed draws its own few-shot sample and test examples: the per-seed
    # accuracies differ somewhere.
    assert any(
        len({(r["val_accuracy"], r["test_accuracy"]) for r in result.runs[m]}) > 1 for m in METHODS
    )
    a = data_module.synthetic_splits(shots=2, seed=0, val_per_class=2, test_size=12, image_size=16)
    b = data_module.synthetic_splits(shots=2, seed=1, val_per_class=2, test_size=12, image_size=16)
    xa = np.concatenate([x for x, _ in a.train.batch(64).as_numpy_iterator()])
    xb = np.concatenate([x for x, _ in b.train.batch(64).as_numpy_iterator()])
    assert np.abs(xa - xb).mean() > 1.0
    # The adapters' inits follow the seed through Keras's global seed (the
    # job builds every spec without a seed of its own): the same method on
    # two seeds starts from different adapter weights.
    for name in ADAPTERS:
        starts = []
        for seed in SEEDS:
            keras.utils.set_random_seed(100)  # the same base layer
            dense = keras.layers.Dense(8)
            dense.build((None, 8))
            keras.utils.set_random_seed(seed)
            adapter = train.method_spec(name, rank=2, seed=None).wrap(dense)
            starts.append([np.asarray(keras.ops.convert_to_numpy(v)) for v in adapter.trainable_weights])
        assert any(np.abs(a - b).max() > 0 for a, b in zip(*starts)), name


def test_quick_run_plot_has_no_overlapping_labels(quick_run):
    result, _, _ = quick_run
    with open(result.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    fig = plot.build_figure(result.rows, best=result.best, title="a title")
    try:
        assert plot.overlapping_texts(fig) == []
        legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert f"{result.row(result.best)['title']} (exported)" in legend
        assert len(fig.axes[0].containers) == len(result.rows)  # one error bar per method
        titles = " ".join(ax.get_title() for ax in fig.axes)
        assert "initial rank" in titles and "capacity" in titles
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


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


def test_a_compiled_model_trained_again_from_a_new_seed_equals_a_fresh_one(quick_run):
    """The job trains a method's compiled model again for the next seed
    (no second trace and compile); that run must equal a fresh model's."""
    result, _, out = quick_run
    preset = os.path.join(out, "pretrained_vit")
    cfg = settings.resolve_settings(preset=preset)
    seed_data = splits.SeedData(cfg, (QUICK["image_size"],) * 2)
    seed_data.normalize(np.float32(1 / 127.5), np.float32(-1.0))
    opts = {k: cfg[k] for k in (
        "epochs", "batch_size", "rank", "alpha", "learning_rate", "weight_decay", "verbose")}

    def run(seed, compiled=None):
        data = seed_data.get(seed)
        return train.adapt(
            "lora", preset=preset, num_classes=6, train=data.train, evaluation=data.evaluation,
            steps_per_epoch=data.steps_per_epoch, seed=seed, options=opts, compiled=compiled,
            log=lambda line: None,
        )

    _, first, _ = run(0)
    fresh_row, fresh, fresh_logits = run(1)
    reused_row, reused, reused_logits = run(1, compiled=first)
    assert reused is first and reused_row["reused_compiled_model"]
    assert not fresh_row["reused_compiled_model"]
    np.testing.assert_allclose(reused_logits, fresh_logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(reused.get_weights(), fresh.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert int(keras.ops.convert_to_numpy(reused.optimizer.iterations)) == fresh_row["steps"]
    # A model of another method (other variables) is not reused.
    assert train.reuse_compiled(fresh, None) is None


def test_budget_free_keeps_each_methods_own_targets(quick_run, tmp_path):
    """`--budget free`: no matching, each method on its own default layers
    (LoRA: query and value; FlexLoRA: every projection)."""
    preset = os.path.join(quick_run[2], "pretrained_vit")
    names = [n for n in ADAPTERS if n in ("lora", "flexlora")] or list(ADAPTERS[:2])
    result = transfer.run_transfer(
        preset=preset, methods=",".join(names), seeds="0", budget="free",
        output_dir=str(tmp_path), export=False, plot=False, log=lambda line: None,
    )
    assert result.budget is None and result.config["budget"] == "free"
    for name in names:
        run = result.runs[name][0]
        assert run["size"] == {}
        defaults = get_method(name).default_targets["vit"]
        expected = sorted(defaults)
        assert run["targets"] == expected, name
    with open(result.results_path) as f:
        assert json.load(f)["budget"]["mode"] == "free"


def test_reusing_the_offline_preset_keeps_the_offline_settings(quick_run, tmp_path):
    """`--preset OUT/pretrained_vit` (what the job tells the user to do)
    keeps the offline settings of the run that wrote it, says so, and does
    not pre-train again."""
    preset = os.path.join(quick_run[2], "pretrained_vit")
    lines = []
    result = transfer.run_transfer(
        preset=preset, methods="linear", seeds="3", output_dir=str(tmp_path), export=False,
        plot=False, log=lines.append,
    )
    config = result.config
    assert config["mode"] == "reused" and config["setting"] == "quick" and config["offline"]
    assert (config["shots"], config["epochs"], config["test_size"]) == (
        QUICK["shots"], QUICK["epochs"], QUICK["test_size"])
    assert any(f"reusing the pre-trained ViT in {preset}" in line for line in lines)
    assert not any(line.startswith("pre-training") for line in lines)
    assert not os.path.exists(os.path.join(tmp_path, "pretrained_vit"))
    assert result.row("linear")["seeds"] == [3]
    # The default methods of a reused offline preset include the scratch reference.
    assert options.parse_methods(None, offline=True)[-1] == "scratch"


# --------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------
def test_parse_methods_and_seeds():
    compared = options.compared_methods()
    assert compared == options.BASELINES + tuple(method_names())  # the registry's methods
    assert options.parse_methods(None, offline=False) == compared
    assert options.parse_methods(None, offline=True) == compared + ("scratch",)
    assert options.parse_methods("sinc, LoRA,linear,lora") == ("linear", "lora", "sinc")
    assert options.parse_methods(["all"], offline=False) == compared
    assert options.parse_seeds("0, 1,2,1") == (0, 1, 2)
    assert options.parse_seeds(4) == (4,) and options.parse_seeds([3, 1]) == (3, 1)
    with pytest.raises(ValueError, match="comma-separated integers"):
        options.parse_seeds("0,a")
    with pytest.raises(ValueError, match="integer >= 0"):
        options.parse_seeds("-1")


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


def test_stats_mean_se_and_paired_comparison():
    mean, se = stats.mean_se([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6) and se == pytest.approx(0.1 / np.sqrt(3))
    assert stats.mean_se([0.4]) == (0.4, None)
    # Paired: a constant offset is certain, however noisy each method is.
    a, b = [0.50, 0.70, 0.60], [0.45, 0.65, 0.55]
    result = stats.paired(a, b)
    assert result["diff"] == pytest.approx(0.05) and result["exceeds_2se"]
    noisy = stats.paired([0.5, 0.7, 0.6], [0.6, 0.5, 0.65])
    assert noisy["diff"] == pytest.approx(0.05 / 3) and not noisy["exceeds_2se"]
    assert not stats.paired([0.5], [0.4])["exceeds_2se"]  # one seed: nothing marked
    runs = {
        "x": [{"seed": s, "test_accuracy": v} for s, v in zip((0, 1, 2), a)],
        "y": [{"seed": s, "test_accuracy": v} for s, v in zip((0, 1, 2), b)],
    }
    rows = [{"method": "x", "test_accuracy": 0.6, "trainable_params": 1},
            {"method": "y", "test_accuracy": 0.55, "trainable_params": 1}]
    assert stats.versus_best(rows, runs) == "x"
    assert rows[0]["vs_best"] is None and rows[1]["vs_best"]["exceeds_2se"]
    assert rows[1]["vs_best"]["diff"] == pytest.approx(-0.05)
    (pair,) = stats.compare(runs)
    assert (pair["a"], pair["b"], pair["seeds"]) == ("x", "y", [0, 1, 2])


def test_table_marks_differences_beyond_two_standard_errors():
    rows = [
        {"method": "x", "test_accuracy": 0.6, "test_accuracy_se": 0.01, "val_accuracy": 0.6,
         "trainable_params": 10, "total_params": 100, "ms_per_step": 1.0, "seeds": [0, 1, 2],
         "vs_best": None},
        {"method": "y", "test_accuracy": 0.5, "test_accuracy_se": 0.01, "val_accuracy": 0.5,
         "trainable_params": 10, "total_params": 100, "ms_per_step": 1.0, "seeds": [0, 1, 2],
         "vs_best": {"diff": -0.1, "se": 0.01, "exceeds_2se": True}},
        {"method": "z", "test_accuracy": 0.59, "test_accuracy_se": 0.05, "val_accuracy": 0.5,
         "trainable_params": 10, "total_params": 100, "ms_per_step": 1.0, "seeds": [0, 1, 2],
         "vs_best": {"diff": -0.01, "se": 0.03, "exceeds_2se": False}},
    ]
    table = report.format_table(rows, best="x", exported=False)
    lines = table.splitlines()
    assert "0.600 ± 0.010" in lines[2] and "best" in lines[2]
    assert "-0.100 ± 0.010 †" in lines[3] and "†" not in lines[4]
    assert table.endswith("* best mean validation accuracy")  # no "(exported)" without export


def _dense_model(widths):
    inputs = keras.Input((widths[0],))
    x = inputs
    for i, width in enumerate(widths[1:]):
        x = keras.layers.Dense(width, name=f"proj_{i}")(x)
    return keras.Model(inputs, x)


def test_match_budgets_on_given_layers():
    """Every registered method sized to the same count on the same layers,
    counts from each spec's own plan."""
    keras.utils.set_random_seed(0)
    model = _dense_model([64, 64, 64, 64])
    match = budget.match_budgets(model, method_names(), rank=8, targets=["proj_0", "proj_1", "proj_2"])
    assert match.within and match.spread <= budget.TOLERANCE
    assert len(match.layers) == 3
    for name, sizing in match.sizings.items():
        spec = train.method_spec(name, rank=8, seed=0, size=sizing.options)
        layers = [model.get_layer(f"proj_{i}") for i in range(3)]
        assert sum(p.params for p in spec.plan(layers)) == sizing.params
        assert list(sizing.options) == [budget.size_option(name)]
    # The reference method stays near the requested rank (the matched count
    # moves from its count at rank 8 only as far as the others' granularity
    # needs, within a factor of 2).
    assert 4 <= match.sizings[method_names()[0]].options["rank"] <= 16


def test_match_budgets_reports_when_it_cannot_match():
    """Two layers of 4x4: a rank step is 8 parameters per layer and
    LR-LoRA adds 100 per layer, so no setting lands within 5%: the match
    says so instead of pretending."""
    model = _dense_model([4, 4, 4])
    match = budget.match_budgets(model, method_names(), rank=2, targets=["proj_0", "proj_1"])
    assert not match.within and match.spread > budget.TOLERANCE
    assert any("WARNING" in line for line in match.lines())


def test_plot_overlap_check_can_fail():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.text(0.5, 0.5, "one label")
    ax.text(0.5, 0.5, "another label")
    try:
        assert plot.overlapping_texts(fig) == [("one label", "another label")]
    finally:
        plt.close(fig)


def test_plot_of_many_methods_at_one_budget_has_no_overlaps():
    rows = [
        {"method": m, "title": options.title(m), "test_accuracy": 0.5 + 0.01 * i,
         "test_accuracy_se": 0.02, "trainable_params": 6000 + 40 * i, "total_params": 120000,
         "seeds": [0, 1, 2], "ranks": {}}
        for i, m in enumerate(ADAPTERS + options.BASELINES)
    ]
    rows[0]["trainable_params"] = 390
    fig = plot.build_figure(rows, best=ADAPTERS[0], title="t" * 90)
    try:
        assert plot.overlapping_texts(fig) == []
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    x = plot.dodged([6000, 6040, 6100, 390])
    assert len(set(np.round(x))) == 4 and x[3] == 390


def test_rank_map_title_states_initial_rank_and_capacity():
    row = {"title": "M", "seeds": [0, 1], "schedule": {"interval": 3},
           "ranks": {"a/query": 3.5, "a/value": 4.5},
           "initial_ranks": {"a/query": 4, "a/value": 4}, "capacity": {"a/query": 8, "a/value": 8}}
    title = plot.rank_map_title(row)
    assert "after training (mean of 2 seeds)" in title and "initial rank 4, capacity 8" in title
    fixed = {"title": "S", "ranks": {"a/query": 3, "a/value": 7},
             "initial_ranks": {"a/query": 3, "a/value": 7}, "capacity": {"a/query": 3, "a/value": 7}}
    assert "set before training" in plot.rank_map_title(fixed)
    assert "initial rank 3-7, capacity 3-7" in plot.rank_map_title(fixed)


def test_rank_grid_layout():
    ranks = {
        "vit_encoder/transformer_block_1/mha/value": 3,
        "vit_encoder/transformer_block_1/mha/query": 5,
        "vit_encoder/transformer_block_2/mlp/dense_1": 7,
    }
    blocks, roles, matrix = plot.rank_grid(ranks)
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
        ({"seeds": "0,x"}, "comma-separated integers"),
        ({"seeds": "1", "seed": 1}, "not both"),
        ({"budget": "equal"}, "`budget` must be one of same, free"),
    ],
)
def test_run_transfer_rejects_bad_options(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        transfer.run_transfer(output_dir=str(tmp_path), log=lambda line: None, **kwargs)


def test_quick_cannot_use_a_preset(tmp_path):
    with pytest.raises(ValueError, match="`quick` is the smallest offline setting"):
        transfer.run_transfer(quick=True, preset="x", output_dir=str(tmp_path))
    # Nor an offline preset written with the default setting.
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / options.PRETRAINING_FILE).write_text(json.dumps({"setting": "default"}))
    with pytest.raises(ValueError, match="pre-trained with the 'default' one"):
        transfer.run_transfer(quick=True, preset=str(tmp_path / "p"), output_dir=str(tmp_path))


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
    import shutil

    tfds = pytest.importorskip("tensorflow_datasets")
    # A keras-hub preset folder that the offline job did not write.
    preset = str(tmp_path / "preset")
    shutil.copytree(os.path.join(quick_run[2], "pretrained_vit"), preset)
    os.remove(os.path.join(preset, options.PRETRAINING_FILE))
    with tfds.testing.mock_data(num_examples=120):
        result = transfer.run_transfer(
            preset=preset, dataset="eurosat/rgb", test_split="train", test_size=20,
            methods="linear", epochs=1, seeds="0", output_dir=str(tmp_path / "out"), verbose=0,
            export=False, plot=False, log=lambda line: None,
        )
    with open(result.results_path) as f:
        record = json.load(f)
    classes = 10
    assert record["data"]["task"] == "eurosat/rgb" and record["data"]["num_classes"] == classes
    assert record["data"]["counts"]["train"] == {str(c): 1 for c in range(classes)}
    assert record["config"]["shots"] == 1 and record["config"]["batch_size"] == 4
    assert record["config"]["mode"] == "real" and record["config"]["seeds"] == [0]
    # Real mode's defaults: the SR-LoRA paper's few-shot settings, 3 seeds.
    cfg = settings.resolve_settings(preset=preset, dataset="eurosat/rgb")
    assert (cfg["shots"], cfg["epochs"], cfg["seeds"]) == (1, 20, (0, 1, 2))
    assert "the SR-LoRA paper's few-shot defaults" in cfg["mode_line"]
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
