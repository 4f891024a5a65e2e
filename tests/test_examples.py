"""Every example runs in smoke mode on every backend.

`plain_keras_lora` runs in this process; the keras-hub examples run as
`python examples/<name>.py --smoke` in a child process under the current
`KERAS_BACKEND` (the backend-swap example starts its own torch and
tensorflow children) and end with a `SUMMARY {json}` line that the tests
check against independent expectations.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_smoke(name, *extra):
    """Run an example with `--smoke` in a child process; return its SUMMARY dict."""
    env = dict(os.environ, KERAS_BACKEND=keras.backend.backend(), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py"), "--smoke", *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )
    log = f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"{name} --smoke exited {proc.returncode}\n{log}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SUMMARY ")]
    assert lines, f"{name} printed no SUMMARY line\n{log}"
    summary = json.loads(lines[-1][len("SUMMARY "):])
    assert summary["failures"] == [], log
    return summary, proc.stdout


def test_plain_keras_lora_smoke():
    result = load("plain_keras_lora").main(["--smoke"])
    assert result["reload_diff"] < 1e-5
    assert result["adapted_mse"] < 1.0


def test_vit_few_shot_sr_lora_smoke():
    summary, stdout = run_smoke("vit_few_shot_sr_lora")
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


def test_gemma_flexlora_generate_smoke():
    summary, stdout = run_smoke("gemma_flexlora_generate")
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


def test_llama_sinc_lora_smoke():
    summary, stdout = run_smoke("llama_sinc_lora")
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


def test_backend_swap_export_smoke(tmp_path):
    summary, stdout = run_smoke("backend_swap_export", "--workdir", str(tmp_path))
    assert (tmp_path / "merged.keras").is_file()
    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()
    assert summary["max_abs_diff"] <= 1e-4
    assert summary["outputs_shape"] == [8, 3]  # the probe images x the smoke classes
    assert "[torch]" in stdout and "[tensorflow]" in stdout
