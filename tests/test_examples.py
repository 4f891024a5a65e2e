"""Every example runs in smoke mode on every backend.

`plain_keras_lora` and the keras-hub examples (`vit_few_shot_sr_lora`,
`gemma_flexlora_generate`, `llama_sinc_lora`) run in this process under the
current `KERAS_BACKEND`: `main(["--smoke"])`, as `python examples/<name>.py
--smoke` would call it, without paying a fresh interpreter's imports for
each. The keras-hub examples end with a `SUMMARY {json}` line that the tests
check against independent expectations.

`backend_swap_export` fixes its own backends (train under torch, export
under tensorflow, each in a child process when this one runs another
backend), so it runs once, as a script (`python examples/backend_swap_export.py
--smoke`), under the tensorflow suite: there it takes its longest path (both
stages in child processes).
"""

import gc
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"
BACKEND = keras.backend.backend()


@pytest.fixture(autouse=True)
def _release_example_state():
    """An example run here leaves Keras state behind (models, traced
    functions, global names) that slows every later test in this process
    (tensorflow: test_quantized ~20%); drop it after each example."""
    yield
    keras.backend.clear_session()
    gc.collect()


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary_of(name, code, stdout, stderr=""):
    """The example's SUMMARY dict, after checking its exit code and failures."""
    log = f"--- stdout\n{stdout[-4000:]}\n--- stderr\n{stderr[-4000:]}"
    assert code == 0, f"{name} --smoke exited {code}\n{log}"
    lines = [line for line in stdout.splitlines() if line.startswith("SUMMARY ")]
    assert lines, f"{name} printed no SUMMARY line\n{log}"
    summary = json.loads(lines[-1][len("SUMMARY "):])
    assert summary["failures"] == [], log
    return summary


def run_in_process(name, capsys):
    """`main(["--smoke"])` of an example here; its SUMMARY dict and stdout."""
    capsys.readouterr()  # drop anything printed before
    code = load(name).main(["--smoke"])
    out, err = capsys.readouterr()
    return summary_of(name, code, out, err), out


def run_script(name, *extra):
    """`python examples/<name>.py --smoke` in a child process; its SUMMARY dict and stdout."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    return summary_of(name, proc.returncode, proc.stdout, proc.stderr), proc.stdout


def _temporary_entries(prefix):
    import tempfile

    return {name for name in os.listdir(tempfile.gettempdir()) if name.startswith(prefix)}


def test_plain_keras_lora_smoke():
    before = _temporary_entries("plain_keras_lora_")
    result = load("plain_keras_lora").main(["--smoke"])
    assert result["reload_diff"] < 1e-5
    assert result["adapted_mse"] < 1.0
    assert _temporary_entries("plain_keras_lora_") == before  # its temporary folder is gone


def test_vit_few_shot_sr_lora_smoke(capsys):
    summary, stdout = run_in_process("vit_few_shot_sr_lora", capsys)
    # 2 blocks x (query, value, attention_output); ranks = stable ranks
    # rounded half to even, clamped to [1, min(d_in, d_out)] = [1, 16].
    assert summary["merged"] == 6
    expected = [min(16, max(1, round(s))) for s in summary["stable_ranks"]]
    assert summary["ranks"] == expected
    assert summary["adapter_params"] == sum(r * (16 + 16) for r in expected)
    assert "stable rank" in stdout and "rank" in stdout  # the printed plan
    assert summary["loss_last"] < summary["loss_first"]
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["merge_diff"] < 1e-4


def test_gemma_flexlora_generate_smoke(capsys):
    summary, stdout = run_in_process("gemma_flexlora_generate", capsys)
    ranks = summary["rank_pattern"]
    # FlexLoRA's default targets on a 1-layer Gemma: q, k, v, o + 3 MLP projections.
    assert len(ranks) == 7 and summary["merged"] == 7
    assert sum(ranks.values()) == 7 * 2  # the global budget: initial rank 2 per layer
    assert set(summary["total_rank"]) == {14}
    assert any(rank != 2 for rank in ranks.values())  # the pattern moved
    assert summary["moves"] >= 1
    assert all(1 <= rank <= 4 for rank in ranks.values())  # capacity 2 * rank
    assert summary["merge_diff"] < 1e-4
    assert summary["generated"].startswith("Instruction: reverse")
    assert "rank pattern over time" in stdout


def test_llama_sinc_lora_smoke(capsys):
    summary, stdout = run_in_process("llama_sinc_lora", capsys)
    rank = summary["rank"]
    sranks, ranks = summary["update_stable_ranks"], summary["update_ranks"]
    assert len(sranks) == 7 and summary["merged"] == 7
    # ΔW = s f(A B) leaves the rank-r family (a LoRA update has rank <= r).
    assert any(ranks[path] > rank for path in ranks), ranks
    # srank (library, Krylov) is at least 1 and at most the rank (numpy SVD)
    # for a nonzero update.
    assert all(1.0 - 1e-6 <= sranks[path] <= ranks[path] + 1e-6 for path in sranks)
    assert summary["merge_diff"] < 1e-4
    assert "srank(ΔW)" in stdout


@pytest.mark.skipif(
    BACKEND != "tensorflow",
    reason="runs under the tensorflow suite only: the example picks its own backends "
    "(train: torch, export: tensorflow) whatever the suite's backend",
)
def test_backend_swap_export_smoke():
    """Without --workdir: the work folder is temporary and removed at the end."""
    before = _temporary_entries("backend_swap_")
    summary, stdout = run_script("backend_swap_export")
    assert summary["max_abs_diff"] <= 1e-4
    assert summary["outputs_shape"] == [8, 3]  # the probe images x the smoke classes
    assert "[torch]" in stdout and "[tensorflow]" in stdout
    assert "saved_model" in stdout
    assert _temporary_entries("backend_swap_") == before
