"""Every example runs in smoke mode on every backend."""

import importlib.util
import pathlib

EXAMPLES = pathlib.Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_keras_lora_smoke():
    result = load("plain_keras_lora").main(["--smoke"])
    assert result["reload_diff"] < 1e-5
    assert result["adapted_mse"] < 1.0
