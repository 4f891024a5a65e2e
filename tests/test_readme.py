"""Every code block of README.md, read from the file itself, run as written.

- ```python blocks run in a fresh namespace, in a temporary working folder,
  under the suite's backend. The names of real keras-hub presets
  (`gemma_2b_en`, `vit_base_patch16_224_imagenet21k`, ...) resolve to tiny
  local presets of the same architecture made here (a 1-layer model; Gemma
  with a small SentencePiece tokenizer), through keras-hub's own preset file
  lookup: the block's code is unchanged, only the downloaded files are
  stand-ins, as the README says.
- A block may be preceded by `<!-- readme-test: KEY=VALUE ... -->` (not
  rendered): `backend=NAME` runs it under that backend's suite only (the
  others skip it, naming where it runs); `devices=N` runs it in a
  subprocess with N host devices (jax); `tfds=mock` runs it inside
  `tensorflow_datasets.testing.mock_data`; `files=NAME` makes fixtures
  first (see `FIXTURES`).
- ```bash blocks: every command line is run (`keras-adaptive-lora ...
  --help`-cheap ones) or checked as far as a test can without its side
  effects: each `keras-adaptive-lora` command is parsed by the real parser
  (a wrong option fails), `make` targets and variables exist in the
  Makefile, `pip` extras exist in pyproject.toml, example scripts exist and
  accept their flags; long jobs (`make test`, the full `transfer`) run
  elsewhere (the test suite itself, `tests/test_transfer.py`) and third-party
  servers (`vllm`, `curl`) are not run.
"""

import contextlib
import io
import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap

import keras
import keras_hub
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BACKEND = keras.backend.backend()
FENCE = re.compile(
    r"(?:<!-- readme-test: (?P<marks>[^>]*?) -->\n(?:[ \t]*\n)*)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>\w*)\n(?P<body>.*?)^(?P=indent)```",
    re.M | re.S,
)


def readme_blocks():
    """`(line, lang, code, marks)` of every fenced block of README.md."""
    text = README.read_text()
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start("body"))
        code = textwrap.dedent(match.group("body"))
        marks = dict(m.split("=", 1) for m in (match.group("marks") or "").split())
        out.append((line, match.group("lang"), code, marks))
    return out


BLOCKS = readme_blocks()
PYTHON = [b for b in BLOCKS if b[1] == "python"]
SHELL = [b for b in BLOCKS if b[1] in ("bash", "sh", "shell", "console")]


def block_id(block):
    line, lang, code, _ = block
    first = next((x for x in code.splitlines() if x.strip() and not x.startswith("#")), "")
    return f"L{line}-{lang}-{re.sub(r'[^A-Za-z0-9]+', '_', first)[:40]}"


def test_the_readme_has_blocks_and_every_one_has_a_language():
    assert len(PYTHON) >= 8 and SHELL
    # An unlabelled fence would escape both runners; ```text is for output.
    unlabelled = [line for line, lang, _, _ in BLOCKS if not lang]
    assert not unlabelled, f"label the README code blocks at lines {unlabelled}"
    assert all(lang in ("python", "bash", "text") for _, lang, _, _ in BLOCKS)


# --------------------------------------------------------------------------
# Tiny stand-ins for the presets the README names
# --------------------------------------------------------------------------
TEXTS = [
    "Instruction: name the colour of the sky.\nResponse: blue.",
    "Instruction: name the colour of grass.\nResponse: green.",
    "Question: what colour is snow?\nAnswer: white.",
    "Question: what colour is coal?\nAnswer: black.",
    "Hello world. The cat sat on the mat and the dog ran in the park.",
]


def _tiny_gemma_preset(directory):
    import sentencepiece

    proto = io.BytesIO()
    words = " ".join(TEXTS).replace("\n", " ").split()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXTS + words), model_writer=proto, vocab_size=64,
        hard_vocab_limit=False, model_type="word", pad_id=0, eos_id=1, bos_id=2, unk_id=3,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2,
    )
    tokenizer = keras_hub.models.GemmaTokenizer(proto=proto.getvalue())
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), num_layers=1, num_query_heads=2,
        # Two key/value heads: keras-hub's Gemma layout map splits heads over
        # the model axis (the README's model-parallel block, Gemma 7B's layout).
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32, head_dim=8,
    )
    preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer, sequence_length=32)
    keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=preprocessor).save_to_preset(
        directory
    )


def _tiny_vit_preset(directory):
    backbone = keras_hub.models.ViTBackbone(
        image_shape=(224, 224, 3), patch_size=(32, 32), num_layers=1, num_heads=2,
        hidden_dim=16, mlp_dim=32,
    )
    converter = keras_hub.layers.ViTImageConverter(
        image_size=(224, 224), scale=1.0 / 127.5, offset=-1.0
    )
    preprocessor = keras_hub.models.ViTImageClassifierPreprocessor(image_converter=converter)
    keras_hub.models.ViTImageClassifier(
        backbone=backbone, preprocessor=preprocessor, num_classes=3
    ).save_to_preset(directory)


STAND_INS = {"gemma": _tiny_gemma_preset, "vit": _tiny_vit_preset}


def stand_in_for(preset):
    """The stand-in architecture of a keras-hub preset name, or None."""
    if not isinstance(preset, str) or os.path.sep in preset or "://" in preset:
        return None
    if preset in keras_hub.models.GemmaCausalLM.presets:
        return "gemma"
    if preset in keras_hub.models.ViTBackbone.presets:
        return "vit"
    return None


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Preset name -> a tiny local preset, resolved inside keras-hub."""
    root = tmp_path_factory.mktemp("stand_in_presets")
    made = {}
    for arch, make in STAND_INS.items():
        folder = str(root / arch)
        keras.utils.set_random_seed(0)
        make(folder)
        made[arch] = folder
    return made


@pytest.fixture
def presets_resolved(stand_ins, monkeypatch):
    from keras_hub.src.tokenizers import tokenizer as tokenizer_module
    from keras_hub.src.utils import preset_utils

    original = preset_utils.get_file

    def get_file(preset, path):
        arch = stand_in_for(preset)
        return original(stand_ins[arch] if arch else preset, path)

    monkeypatch.setattr(preset_utils, "get_file", get_file)
    monkeypatch.setattr(tokenizer_module, "get_file", get_file)
    return stand_ins


# --------------------------------------------------------------------------
# Fixtures a block may ask for (`files=...`)
# --------------------------------------------------------------------------
def _vit_folder(cwd, stand_ins):
    import shutil

    shutil.copytree(stand_ins["vit"], cwd / "my_vit_preset")


def _llama_hf(cwd, stand_ins):
    """`./llama_hf`: a tiny transformers Llama (`save_pretrained`)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(cwd / "llama_hf")


def _peft_adapter(cwd, stand_ins):
    """`./peft_adapter`: a PEFT LoRA adapter of `./llama_hf`."""
    pytest.importorskip("peft")
    import keras_adaptive_lora as kal

    lm = keras_hub.models.CausalLM.from_preset(str(cwd / "llama_hf"), preprocessor=None)
    kal.apply_adapters(lm, kal.LoRA(rank=2))
    kal.save_peft_adapters(lm, str(cwd / "peft_adapter"), base_model_name_or_path="./llama_hf")


FIXTURES = {"my_vit_preset": _vit_folder, "llama_hf": _llama_hf, "peft_adapter": _peft_adapter}


# --------------------------------------------------------------------------
# Python blocks
# --------------------------------------------------------------------------
def _skip_for(marks):
    wanted = marks.get("backend")
    if wanted and wanted != BACKEND:
        pytest.skip(f"this README block is for the {wanted} backend: it runs in the {wanted} suite")


@pytest.mark.parametrize("block", PYTHON, ids=block_id)
def test_python_block_runs_as_written(block, presets_resolved, tmp_path, monkeypatch, capsys):
    line, _, code, marks = block
    _skip_for(marks)
    monkeypatch.chdir(tmp_path)
    for name in filter(None, marks.get("files", "").split(",")):
        FIXTURES[name](tmp_path, presets_resolved)
    keras.utils.set_random_seed(0)
    if "devices" in marks:
        _run_in_subprocess(code, int(marks["devices"]), tmp_path, presets_resolved)
        return
    context = contextlib.nullcontext()
    if marks.get("tfds") == "mock":
        tfds = pytest.importorskip("tensorflow_datasets")
        context = tfds.testing.mock_data(num_examples=200)
    namespace = {"__name__": "__readme__"}
    try:
        with context:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    finally:
        if BACKEND == "jax":
            keras.distribution.set_distribution(None)
        keras.backend.clear_session()


# The subprocess resolves the same preset names to the same stand-ins.
PRELUDE = """
import json, sys
from keras_hub.src.tokenizers import tokenizer as _tokenizer_module
from keras_hub.src.utils import preset_utils as _preset_utils
_STAND_INS, _ORIGINAL = json.loads(sys.argv[1]), _preset_utils.get_file
def _get_file(preset, path):
    return _ORIGINAL(_STAND_INS.get(preset, preset), path)
_preset_utils.get_file = _tokenizer_module.get_file = _get_file
"""


def _run_in_subprocess(code, devices, cwd, stand_ins):
    import json

    names = {}
    for name in re.findall(r"from_preset\(\s*\"([^\"]+)\"", code):
        arch = stand_in_for(name)
        if arch:
            names[name] = stand_ins[arch]
    env = dict(os.environ, KERAS_BACKEND=BACKEND, TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    proc = subprocess.run([sys.executable, "-c", PRELUDE + code, json.dumps(names)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


# --------------------------------------------------------------------------
# Shell blocks
# --------------------------------------------------------------------------
NOT_RUN = {
    "vllm": "a third-party server (vLLM is not installed in the tests)",
    "curl": "a request to that server",
}


def _commands(code):
    """Command lines of a shell block (continuations joined, comments dropped)."""
    joined = re.sub(r"\\\n\s*", " ", code)
    out = []
    for raw in joined.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            out.extend(part.strip() for part in line.split("&&"))
    return out


def _check_make(words):
    makefile = (ROOT / "Makefile").read_text()
    for word in words[1:]:
        if "=" in word:
            name = word.split("=", 1)[0]
            assert re.search(rf"^{name} \?=", makefile, re.M), f"Makefile has no variable {name}"
        else:
            assert re.search(rf"^{re.escape(word)}:", makefile, re.M), f"no make target {word!r}"


def _check_pip(words):
    pyproject = (ROOT / "pyproject.toml").read_text()
    for word in words:
        for extra in re.findall(r"\[([a-z,]+)\]", word):
            for name in extra.split(","):
                assert re.search(rf"^{name} = \[", pyproject, re.M), f"no extra {name!r}"


def _check_cli(words):
    from keras_adaptive_lora import cli

    args = words[1:]
    command = next((a for a in args if not a.startswith("-")), None)
    parser = cli.build_parser(command)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as exit_info:  # --help
            assert exit_info.code == 0, words


def _check_example(words):
    script = ROOT / words[1]
    assert script.is_file(), words
    flags = [w for w in words[2:] if w.startswith("--")]
    source = script.read_text()
    for flag in flags:
        assert f'"{flag}"' in source, f"{script.name} has no {flag}"


@pytest.mark.parametrize("block", SHELL, ids=block_id)
def test_shell_block_commands_exist_and_parse(block):
    for command in _commands(block[2]):
        words = shlex.split(command)
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):
            words.pop(0)  # KERAS_BACKEND=jax make demo
        tool = os.path.basename(words[0])
        if tool in NOT_RUN:
            continue
        if tool == "make":
            _check_make(words)
        elif tool in ("pip", "pip3") or words[:3] == ["python3", "-m", "venv"]:
            _check_pip(words)
        elif tool == "keras-adaptive-lora":
            _check_cli(words)
        elif tool in ("python", "python3") and words[1:2] == ["-m"]:
            assert words[2] in ("keras_adaptive_lora", "keras_adaptive_lora.cli",
                                "keras_adaptive_lora.apps.transfer", "pip", "venv"), words
            if words[2].startswith("keras_adaptive_lora"):
                _check_cli(["keras-adaptive-lora", *words[3:]])
        elif tool in ("python", "python3"):
            _check_example(words)
        else:
            raise AssertionError(f"README.md:{block[0]}: no check for command {command!r}")
