"""What a newcomer meets first: the command line answers `--help` without
importing a backend, `python -m keras_adaptive_lora` is the command line,
commands print no TensorFlow log lines and load TensorFlow only when they
need it, merged files carry no optimizer state, and the README cites the
papers it implements."""

import os
import pathlib
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
BACKEND = keras.backend.backend()
HEAVY = ("keras", "tensorflow", "torch", "jax", "keras_hub")


def run_python(code, **env):
    # As from a shell: TensorFlow, imported in this process, set this one.
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT,
        env=dict(environ, **env),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_help_imports_no_backend():
    """`keras-adaptive-lora --help` (and the package import it needs) loads
    none of keras, tensorflow, torch, jax, keras-hub: that is what makes it
    answer at once."""
    code = (
        "import sys, contextlib, io\n"
        "from keras_adaptive_lora.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
        "print('transfer' in out.getvalue() and 'smoke' in out.getvalue())\n"
    )
    lines = run_python(code).stdout.splitlines()
    assert lines == ["[]", "True"]


def test_python_dash_m_is_the_command_line():
    proc = subprocess.run(
        [sys.executable, "-m", "keras_adaptive_lora", "--help"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0 and "usage: keras-adaptive-lora" in proc.stdout
    assert proc.stderr == ""


def test_the_package_imports_lazily_and_every_public_name_resolves():
    code = (
        "import sys\n"
        "import keras_adaptive_lora as kal\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert run_python(code).stdout.strip() == "[]"
    for name in kal.__all__:
        assert getattr(kal, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        kal.nope  # noqa: B018


def test_subcommands_and_the_demo_name():
    choices = cli.build_parser()._subparsers._group_actions[0].choices
    assert {"transfer", "smoke", "export", "inspect"} <= set(choices)
    assert "demo" not in choices  # `make demo` is the main job, `transfer`
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t.*keras-adaptive-lora transfer", makefile, re.M)


@pytest.mark.skipif(
    BACKEND != "torch",
    reason="subprocesses under torch, run by the torch suite only: the checks are what a "
    "non-tensorflow backend prints and loads",
)
def test_commands_under_torch_print_no_native_logs_and_inspect_loads_no_tensorflow(tmp_path):
    import keras_hub

    folder = str(tmp_path / "vit")
    keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=(8, 8), num_layers=1, num_heads=2, hidden_dim=8,
        mlp_dim=16,
    ).save_to_preset(folder)
    # As the console script runs it: `main()` reads sys.argv.
    template = (
        "import sys\n"
        "sys.argv = ['keras-adaptive-lora', *{args!r}]\n"
        "from keras_adaptive_lora.cli import main\n"
        "code = main()\n"
        "print('TF_LOADED', sys.modules.get('tensorflow') is not None)\n"
        "sys.exit(code)\n"
    )
    inspect = run_python(template.format(args=["inspect", folder, "--quiet"]), KERAS_BACKEND="torch")
    assert "TF_LOADED False" in inspect.stdout  # inspecting needs no TensorFlow
    assert "query" in inspect.stdout
    smoke = run_python(template.format(args=["smoke", "--epochs", "1"]), KERAS_BACKEND="torch")
    assert "adapters into plain layers" in smoke.stdout  # keras-hub's fit loads TensorFlow
    for proc in (inspect, smoke):
        for noise in ("cudart_stub", "cuInit", "absl::InitializeLog", "cpu_feature_guard"):
            assert noise not in proc.stderr, proc.stderr


def test_save_merged_writes_no_optimizer_state_by_default(tmp_path):
    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4, name="proj")(inputs))
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["proj"])
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((8, 8)), np.ones((8, 4)), verbose=0)
    lean, full = str(tmp_path / "lean.keras"), str(tmp_path / "full.keras")
    kal.save_merged(model, lean)
    kal.save_merged(model, full, include_optimizer=True)
    assert model.compiled and model.optimizer is not None  # the model is as it was
    assert os.path.getsize(lean) < os.path.getsize(full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = keras.saving.load_model(lean)
    assert not [w for w in caught if "optimizer" in str(w.message).lower()]
    assert not loaded.compiled
    x = np.random.default_rng(0).normal(size=(3, 8)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)), keras.ops.convert_to_numpy(model(x)), atol=1e-5
    )
    assert keras.saving.load_model(full).compiled  # asked for: kept


def test_readme_cites_the_three_papers_and_no_private_notes():
    readme = (ROOT / "README.md").read_text()
    for arxiv in re.findall(r"arXiv[: ]+(\d{4}\.\d{4,5})", (ROOT / "docs" / "methods.md").read_text()):
        assert arxiv in readme
    assert len(set(re.findall(r"arXiv[: ]+\d{4}\.\d{4,5}", readme))) >= 3
    for private in ("METHODS.md", "shared/papers", "DESIGN.md"):
        assert private not in readme
    sources = [p for p in (ROOT / "keras_adaptive_lora").rglob("*.py")]
    for path in sources:
        text = path.read_text()
        assert "METHODS.md" not in text and "shared/papers" not in text, path
