"""`keras_adaptive_lora.inspection` and `keras-adaptive-lora inspect` on tiny
keras-hub presets saved to local folders (no downloads).

Oracles: stable ranks from a float64 numpy SVD of a matrix view rebuilt here
from the einsum equation; SR-LoRA ranks from `plan_ranks`; adapter
parameters from the variables `apply_adapters` actually creates.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import tiny_gemma, tiny_vit, to_numpy

import keras_adaptive_lora as kal
from keras_adaptive_lora import cli, inspection
from keras_adaptive_lora.core.tree import walk


@pytest.fixture(scope="module")
def presets(tmp_path_factory):
    """`{"gemma" | "vit": (preset folder, .keras file)}`, same weights in both."""
    keras.utils.set_random_seed(99)
    out = {}
    for name, build in (("gemma", tiny_gemma), ("vit", tiny_vit)):
        backbone = build()
        folder = tmp_path_factory.mktemp(f"{name}_preset")
        backbone.save_to_preset(str(folder))
        keras_file = str(folder.parent / f"{name}_model.keras")
        backbone.save(keras_file)
        out[name] = (str(folder), keras_file)
    return out


def _layers_by_path(model):
    return {layer.path: layer for _, layer in walk(model)}


def _oracle_matrix(layer):
    """The (d_in, d_out) matrix view, rebuilt from the equation (float64)."""
    kernel = to_numpy(layer.kernel).astype("float64")
    if isinstance(layer, keras.layers.Dense):
        return kernel
    inputs, out = layer.equation.replace(" ", "").split("->")
    lhs, ker = inputs.split(",")
    ins = [i for i, c in enumerate(ker) if c in lhs and c not in out]
    outs = [i for i, c in enumerate(ker) if c in out and c not in lhs]
    d_in = int(np.prod([kernel.shape[i] for i in ins]))
    return np.transpose(kernel, ins + outs).reshape(d_in, -1)


def _svd_stable_rank(matrix):
    s = np.linalg.svd(matrix, compute_uv=False)
    return float(np.sum(s**2) / s[0] ** 2)


@pytest.mark.parametrize("arch", ["gemma", "vit"])
def test_rows_against_svd_oracle(presets, arch):
    folder, _ = presets[arch]
    model = inspection.load_model(folder)
    calls = []
    report = inspection.inspect_model(
        model, "flexlora", rank=2, progress=lambda *args: calls.append(args)
    )
    layers = _layers_by_path(model)
    expected_names = (
        {"query", "key", "value", "attention_output", "ffw_gating", "ffw_gating_2", "ffw_linear"}
        if arch == "gemma"
        else {"query", "key", "value", "attention_output", "dense_1", "dense_2"}
    )
    assert {r["path"].rsplit("/", 1)[-1] for r in report.rows} == expected_names
    assert calls == [(i + 1, len(report.rows), r["path"]) for i, r in enumerate(report.rows)]
    for row in report.rows:
        layer = layers[row["path"]]
        matrix = _oracle_matrix(layer)
        assert row["kernel_shape"] == tuple(layer.kernel.shape)
        assert (row["d_in"], row["d_out"]) == matrix.shape
        assert row["stable_rank"] == pytest.approx(_svd_stable_rank(matrix), rel=5e-3)
        assert row["rank"] == 2 and row["capacity"] == min(4, *matrix.shape)
    assert report.model_params == model.count_params()


@pytest.mark.parametrize(
    "options", [{}, {"max_rank": 4}, {"budget": 1500}], ids=["plain", "max_rank", "budget"]
)
def test_sr_lora_plan_equals_plan_ranks(presets, options):
    model = inspection.load_model(presets["vit"][0])
    report = inspection.inspect_model(model, "sr-lora", **options)
    plan = kal.plan_ranks(model, kal.StableRankLoRA(**options))
    assert [r["path"] for r in report.rows] == [r["path"] for r in plan.rows]
    assert report.ranks == plan.ranks
    assert [r["params"] for r in report.rows] == [r["params"] for r in plan.rows]
    np.testing.assert_allclose(
        [r["stable_rank"] for r in report.rows], [r["stable_rank"] for r in plan.rows], rtol=1e-9
    )
    if "budget" in options:
        assert report.adapter_params <= options["budget"]
        assert report.ranks != kal.plan_ranks(model, kal.StableRankLoRA()).ranks


@pytest.mark.parametrize(
    "method",
    [
        kal.LoRA(rank=3),
        kal.StableRankLoRA(budget=300),
        kal.FlexLoRA(rank=2, max_rank=3),
        kal.SincLoRA(rank=2, grid_size=5),
    ],
    ids=["lora", "sr-lora", "flexlora", "sinc"],
)
def test_plan_matches_what_apply_adapters_builds(presets, method):
    report = inspection.inspect_model(inspection.load_model(presets["gemma"][0]), method)
    model = inspection.load_model(presets["gemma"][0])
    applied = kal.apply_adapters(model, method)
    assert [r["path"] for r in report.rows] == [r["path"] for r in applied.rows]
    assert report.ranks == [r["rank"] for r in applied.rows]
    assert [r["params"] for r in report.rows] == [r["params"] for r in applied.rows]
    assert report.adapter_params == applied.trainable_params


def test_keras_file_gives_the_same_rows(presets):
    folder, keras_file = presets["gemma"]
    from_preset = inspection.inspect_source(folder, "sr-lora")
    from_file = inspection.inspect_source(keras_file, "sr-lora")
    assert type(inspection.load_model(keras_file)).__name__ == "GemmaBackbone"
    assert from_file.rows == from_preset.rows
    assert keras_file in from_file.model_name


def test_format_report(presets):
    model = inspection.load_model(presets["gemma"][0])
    flex = str(inspection.inspect_model(model, "flexlora", rank=1))
    assert "rank/R" in flex and "1/2" in flex
    assert "total active rank (the method's budget, constant in training): 7; capacity: 14" in flex
    report = inspection.inspect_model(model, "lora", rank=2)
    text = inspection.format_report(report)
    lines = text.splitlines()
    assert lines[0].startswith("LoRA plan for GemmaBackbone: 2 target layers")
    query = next(line for line in lines if line.startswith("decoder_block_0/attention/query"))
    assert "(4, 16, 4)" in query and "16 x 16" in query
    assert f"{report.rows[0]['stable_rank']:.2f}" in query
    assert f"trainable (adapter) params: {report.adapter_params:,} ||" in text
    assert report.adapter_params == 2 * (16 + 16) + 2 * (16 + 4)


def test_errors(presets, tmp_path):
    with pytest.raises(ValueError, match="does not exist and is not a keras-hub preset name"):
        inspection.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="is not a keras-hub preset: it has no config.json"):
        inspection.load_model(str(tmp_path))
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match="is not a `.keras` file"):
        inspection.load_model(str(text))
    model = inspection.load_model(presets["gemma"][0])
    with pytest.raises(ValueError, match="Unknown method 'adalora'"):
        inspection.inspect_model(model, "adalora")
    with pytest.raises(ValueError, match="`rank` does not apply to sr-lora .*its options are alpha"):
        inspection.inspect_model(model, "sr-lora", rank=4)
    with pytest.raises(ValueError, match="`budget` does not apply to lora .*Methods with `budget`: sr-lora.$"):
        inspection.inspect_model(model, "lora", budget=100)
    with pytest.raises(ValueError, match="`max_rank` does not apply to sinc .*Methods with `max_rank`: sr-lora, flexlora."):
        inspection.inspect_model(model, "sinc", max_rank=4)
    with pytest.raises(ValueError, match="go with a method name"):
        inspection.inspect_model(model, kal.LoRA(rank=2), rank=3)
    with pytest.raises(ValueError, match="`progress` must be callable"):
        inspection.inspect_model(model, "lora", rank=2, progress=3)
    # As apply_adapters: value is a (16, 4) matrix.
    with pytest.raises(ValueError, match="Layer 'value': rank=8 is out of range"):
        inspection.inspect_model(model, "lora")


def test_cli_in_process(presets, capsys, tmp_path):
    assert {"smoke", "export", "inspect"} <= set(
        cli.build_parser()._subparsers._group_actions[0].choices
    )
    folder, _ = presets["vit"]
    assert cli.main(["inspect", folder, "--method", "sr-lora", "--max-rank", "5"]) == 0
    out, err = capsys.readouterr()
    plan = kal.plan_ranks(inspection.load_model(folder), kal.StableRankLoRA(max_rank=5))
    for row in plan.rows:
        line = next(line for line in out.splitlines() if line.startswith(row["path"]))
        assert line.split()[-2] == str(row["rank"])
    assert f"[3/3] stable rank of {plan.rows[-1]['path']}" in err
    assert cli.main(["inspect", folder, "--targets", "all-linear", "--rank", "1", "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert ": 6 target layers" in out and err == ""  # q, k, v, out, dense_1, dense_2
    assert cli.main(["inspect", str(tmp_path / "nothing")]) == 2
    out, err = capsys.readouterr()
    assert "does not exist" in err and out == ""


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="runs under the tensorflow suite only: it checks the `python -m` entry point "
    "and its stdout/stderr; test_cli_in_process covers the CLI on every backend",
)
def test_cli_subprocess(presets):
    folder, _ = presets["gemma"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, "-m", "keras_adaptive_lora.cli", "inspect", folder, "--method", "sr-lora"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plan = kal.plan_ranks(inspection.load_model(folder), kal.StableRankLoRA())
    assert f"SR-LoRA plan for GemmaBackbone from {folder}: 3 target layers" in result.stdout
    for row in plan.rows:
        line = next(l for l in result.stdout.splitlines() if l.startswith(row["path"]))
        assert line.split()[-3:-1] == [f"{row['stable_rank']:.2f}", str(row["rank"])]
    assert "[1/3] stable rank of decoder_block_0/attention/query" in result.stderr
