"""PEFT LoRA adapters out (`save_peft_adapters`) and in (`load_peft_adapters`),
against real transformers and PEFT, and Hugging Face checkpoints in.

One torch subprocess per backend's suite (`_CHILD`, started once per module:
the PEFT side is always torch) builds tiny `LlamaForCausalLM`,
`GemmaForCausalLM` and `ViTForImageClassification` models from config,
`save_pretrained`s them, makes PEFT LoRA adapters with `get_peft_model`
(random non-zero `B`; Llama with `use_rslora`, `rank_pattern` and
`alpha_pattern`; a DoRA one) and their logits, then waits. This process,
under its Keras backend, loads each transformers folder with keras-hub, loads
the PEFT adapter (`load_peft_adapters`: logits equal PEFT's), adds LoRA,
SR-LoRA and FlexLoRA on the other projections (non-trivial weights, FlexLoRA
with masked components), and writes them all with `save_peft_adapters`. The
subprocess loads those with `PeftModel.from_pretrained` and returns the
logits, the logits after `merge_and_unload`, and each module's merged update
`W_merged - W`, compared here with each method's `delta_kernel()ᵀ`.
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
from keras_adaptive_lora.cli import main
from keras_adaptive_lora.saving import read_adapter_file
from keras_adaptive_lora.saving._safetensors import read_safetensors, write_safetensors
from keras_adaptive_lora.spectral import truncated_factors
from keras_adaptive_lora.targets import HF_MODULES, hf_modules

from conftest import tiny_gemma, tiny_llama, to_numpy

BACKEND = keras.backend.backend()
ARCHS = ("llama", "gemma", "vit")
#: The methods added after the PEFT adapter (on q and v): target layer names.
METHOD_TARGETS = {
    "llama": {"key": ["key"], "attention_output": ["attention_output"],
              "mlp": ["feedforward_gate_dense", "feedforward_intermediate_dense",
                      "feedforward_output_dense"]},
    "gemma": {"key": ["key"], "attention_output": ["attention_output"],
              "mlp": ["ffw_gating", "ffw_gating_2", "ffw_linear"]},
    "vit": {"key": ["key"], "attention_output": ["attention_output"], "mlp": ["dense_1", "dense_2"]},
}
METHODS = {  # method -> (spec, the targets it gets)
    "lora": (lambda: kal.LoRA(rank=2, alpha=3.0), "key"),
    "sr-lora": (lambda: kal.StableRankLoRA(max_rank=3, spu=False), "attention_output"),
    "flexlora": (lambda: kal.FlexLoRA(rank=2, max_rank=4), "mlp"),
}

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch, transformers, peft
    from safetensors.torch import load_file, save_file

    root = sys.argv[1]
    rng = np.random.default_rng(0)
    inputs = {"tokens": rng.integers(0, 32, (2, 5)), "images": rng.normal(size=(2, 16, 16, 3)).astype("float32")}
    np.savez(f"{root}/inputs.npz", **inputs)
    classes = {"llama": transformers.LlamaForCausalLM, "gemma": transformers.GemmaForCausalLM,
               "vit": transformers.ViTForImageClassification}
    configs = {
        "llama": transformers.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=32, tie_word_embeddings=False),
        "gemma": transformers.GemmaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=4,
            max_position_embeddings=32),
        "vit": transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=12,
            intermediate_size=24, num_hidden_layers=2, num_attention_heads=3, num_labels=5,
            layer_norm_eps=1e-6),
    }
    peft_configs = {
        "llama": peft.LoraConfig(r=4, lora_alpha=6, use_rslora=True, lora_dropout=0.1,
            target_modules=["q_proj", "v_proj"], init_lora_weights=False,
            rank_pattern={"model.layers.0.self_attn.q_proj": 2}, alpha_pattern={"v_proj": 3.0}),
        "gemma": peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
            init_lora_weights=False),
        "vit": peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
            init_lora_weights=False),
        "dora": peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
    }

    def base(arch):
        model = classes[arch].from_pretrained(f"{root}/hf/{arch}")
        return model.eval()

    def logits(model, arch):
        with torch.no_grad():
            if arch == "vit":
                pixels = torch.tensor(inputs["images"]).permute(0, 3, 1, 2)
                return model(pixel_values=pixels).logits.numpy()
            return model(input_ids=torch.tensor(inputs["tokens"])).logits.numpy()

    for arch, config in configs.items():
        torch.manual_seed(0)
        classes[arch](config).eval().save_pretrained(f"{root}/hf/{arch}")
        np.save(f"{root}/hf/{arch}.logits.npy", logits(base(arch), arch))
    for name, config in peft_configs.items():
        arch = "gemma" if name == "dora" else name
        torch.manual_seed(1)
        model = peft.get_peft_model(base(arch), config)
        model.save_pretrained(f"{root}/peft/{name}")
        np.save(f"{root}/peft/{name}.logits.npy", logits(model.eval(), arch))
    print("READY", flush=True)

    results = {}
    for arch, folder in json.loads(sys.stdin.readline()).items():
        model = base(arch)
        before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear)}
        model = peft.PeftModel.from_pretrained(model, folder)
        got = logits(model, arch)
        merged = model.merge_and_unload()
        modules = {k[len("base_model.model."):].rsplit(".lora_", 1)[0]
                   for k in load_file(f"{folder}/adapter_model.safetensors")}
        deltas = {m: (merged.get_submodule(m).weight.detach() - before[m]).numpy() for m in modules}
        np.savez(f"{folder}.torch.npz", logits=got, merged=logits(merged, arch),
                 **{"delta::" + m: d for m, d in deltas.items()})
        results[arch] = f"{folder}.torch.npz"
    print("RESULT " + json.dumps(results), flush=True)
    """
)


class TorchSide:
    """The torch subprocess: transformers folders and PEFT adapters first
    (`start`), then PEFT's view of the adapters this process wrote (`check`)."""

    def __init__(self, root):
        self.root = root
        self.log = open(os.path.join(root, "child.log"), "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error",
                   TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD, root], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        self._expect("READY")
        with np.load(os.path.join(root, "inputs.npz")) as data:
            tokens = data["tokens"].astype("int32")
            self.images = data["images"]
        self.tokens = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}

    def _expect(self, word):
        line = self.proc.stdout.readline()
        while line and not line.startswith(word):
            line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=60)
            with open(self.log.name) as f:
                tail = f.read()[-3000:]
            pytest.fail(f"torch subprocess exited {self.proc.returncode}:\n{tail}")
        return line[len(word):].strip()

    def check(self, folders):
        """`{arch: npz}` of PEFT logits, merged logits and `delta::<module>`."""
        self.proc.stdin.write(json.dumps(folders) + "\n")
        self.proc.stdin.flush()
        results = json.loads(self._expect("RESULT"))
        self.proc.wait(timeout=60)
        return {arch: dict(np.load(path)) for arch, path in results.items()}

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def hf(self, arch):
        return os.path.join(self.root, "hf", arch)

    def peft(self, name):
        return os.path.join(self.root, "peft", name)

    def peft_logits(self, name):
        return np.load(os.path.join(self.root, "peft", f"{name}.logits.npy"))

    def inputs(self, arch):
        return self.images if arch == "vit" else self.tokens


def task_model(side, arch):
    cls = keras_hub.models.ImageClassifier if arch == "vit" else keras_hub.models.CausalLM
    return cls.from_preset(side.hf(arch), preprocessor=None)


def forward(model, side, arch):
    if BACKEND == "jax":  # one compiled function: much faster than a first eager call
        return to_numpy(model.predict(side.inputs(arch), verbose=0))
    return to_numpy(model(side.inputs(arch), training=False))


def perturb(adapters, seed):
    """Seeded non-trivial values (FlexLoRA: some components masked off)."""
    rng = np.random.default_rng(seed)
    for adapter in adapters:
        for name, variable in adapter.own_variables():
            if name == "flex_mask":
                mask = (rng.random(variable.shape) < 0.6).astype("float32")
                mask[0] = 1.0
                variable.assign(mask)
            elif "float" in str(variable.dtype):
                variable.assign(rng.normal(0.0, 0.3, variable.shape).astype("float32"))


def module_of(adapter, arch):
    return HF_MODULES[arch]["prefix"] + hf_modules(arch, adapter.path)[0]


@pytest.fixture(scope="module")
def side(tmp_path_factory):
    torch_side = TorchSide(str(tmp_path_factory.mktemp("peft")))
    yield torch_side
    torch_side.close()


@pytest.fixture(scope="module")
def keras_side(side):
    """Per architecture: the logits after loading the PEFT adapter, the
    written folder, the adapted logits, each adapter's update by module and
    method, and PEFT's results for the folder."""
    out = {}
    for i, arch in enumerate(ARCHS):
        model = task_model(side, arch)
        report = kal.load_peft_adapters(model, side.peft(arch))
        loaded = forward(model, side, arch)
        for name, (make, group) in METHODS.items():
            before = set(map(id, kal.find_adapters(model)))
            kal.apply_adapters(model, make(), targets=METHOD_TARGETS[arch][group])
            perturb([a for a in kal.find_adapters(model) if id(a) not in before], seed=10 * i)
        folder = os.path.join(side.root, "keras", arch)
        summary = kal.save_peft_adapters(model, folder, base_model_name_or_path=side.hf(arch))
        updates = {
            module_of(a, arch): (json.loads(a.method_spec)["name"], to_numpy(a.delta_kernel()).T)
            for a in kal.find_adapters(model)
        }
        out[arch] = {"model": model, "report": report, "loaded": loaded, "folder": folder,
                     "summary": summary, "want": forward(model, side, arch), "updates": updates}
    results = side.check({arch: out[arch]["folder"] for arch in ARCHS})
    for arch in ARCHS:
        out[arch]["peft"] = results[arch]
    return out


def _scale(x):
    return float(np.abs(x).max())


def _record(**row):
    """With KAL_MEASUREMENTS=FILE, append the measured difference as a JSON
    line (for the closing notes' tables); otherwise nothing."""
    path = os.environ.get("KAL_MEASUREMENTS")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"backend": keras.backend.backend(), **row}) + "\n")


# --------------------------------------------------------------------------
# PEFT -> Keras
# --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_peft_lora_adapter_loads_with_equal_logits(arch, side, keras_side):
    want = side.peft_logits(arch)
    got = keras_side[arch]["loaded"]
    _record(test="peft->keras logits", arch=arch, relative=float(np.abs(got - want).max()) / _scale(want))
    assert np.abs(got - want).max() <= 1e-5 * _scale(want), arch
    base = np.load(os.path.join(side.root, "hf", f"{arch}.logits.npy"))
    assert np.abs(base - want).max() > 1e-2 * _scale(want)  # the adapter matters


def test_loaded_ranks_scalings_and_dropout_follow_the_config(keras_side):
    """Llama's adapter: r=4, rank_pattern {layer 0 q_proj: 2}, alpha 6 with
    alpha_pattern {v_proj: 3}, use_rslora, lora_dropout 0.1."""
    adapters = [a for a in kal.find_adapters(keras_side["llama"]["model"])
                if a.path.endswith(("/query", "/value"))]
    got = {a.path: (a.rank(), a.alpha, a.rslora, a.dropout) for a in adapters}
    assert got == {
        "transformer_layer_0/self_attention/query": (2, 6.0, True, 0.1),
        "transformer_layer_0/self_attention/value": (4, 3.0, True, 0.1),
        "transformer_layer_1/self_attention/query": (4, 6.0, True, 0.1),
        "transformer_layer_1/self_attention/value": (4, 3.0, True, 0.1),
    }
    assert adapters[0].scale == pytest.approx(6.0 / np.sqrt(2))
    assert [row["rank"] for row in keras_side["llama"]["report"].rows] == [2, 4, 4, 4]


# --------------------------------------------------------------------------
# Keras -> PEFT
# --------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapters_give_equal_logits_in_peft(arch, keras_side):
    got, want = keras_side[arch]["peft"], keras_side[arch]["want"]
    scale = _scale(want)
    assert np.abs(want - keras_side[arch]["loaded"]).max() > 1e-2 * scale  # the methods matter
    for key in ("logits", "merged"):
        _record(test=f"keras->peft {key}", arch=arch, relative=float(np.abs(got[key] - want).max()) / scale)
    assert np.abs(got["logits"] - want).max() <= 1e-5 * scale
    assert np.abs(got["merged"] - want).max() <= 1e-5 * scale  # merge_and_unload


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["lora", *METHODS])
def test_each_methods_update_is_peft_merged_update(arch, method, keras_side):
    """PEFT's `W_merged - W` of each module is the method's `delta_kernel()ᵀ`
    ('lora' covers the PEFT adapter loaded first and the LoRA added)."""
    updates = keras_side[arch]["updates"]
    modules = [m for m, (name, _) in updates.items() if name == method]
    assert modules, (arch, method)
    for module in modules:
        want = updates[module][1]
        got = keras_side[arch]["peft"][f"delta::{module}"]
        assert got.shape == want.shape
        _record(test="update", arch=arch, method=method, module=module,
                relative=float(np.abs(got - want).max()) / _scale(want))
        assert np.abs(got - want).max() <= 1e-5 * _scale(want), (module, method)


def test_written_config_is_what_vllm_and_peft_read(keras_side):
    """One global `lora_alpha = r` (the largest rank; scalings folded into
    lora_B) plus matching rank_pattern / alpha_pattern for the other ranks."""
    for arch in ARCHS:
        folder, summary = keras_side[arch]["folder"], keras_side[arch]["summary"]
        assert sorted(os.listdir(folder)) == ["adapter_config.json", "adapter_model.safetensors"]
        with open(os.path.join(folder, "adapter_config.json")) as f:
            config = json.load(f)
        ranks = {layer["module"]: layer["rank"] for layer in summary["layers"]}
        assert config["peft_type"] == "LORA" and not config["use_rslora"]
        assert config["r"] == config["lora_alpha"] == max(ranks.values()) == summary["r"]
        assert config["rank_pattern"] == config["alpha_pattern"]
        assert config["rank_pattern"] == {m: r for m, r in ranks.items() if r != config["r"]}
        assert config["rank_pattern"], arch  # per-layer ranks (FlexLoRA masks, the loaded r=2)
        assert config["target_modules"] == sorted({m.rsplit(".", 1)[-1] for m in ranks})
        assert config["task_type"] == HF_MODULES[arch]["task_type"]
        tensors, _ = read_safetensors(os.path.join(folder, "adapter_model.safetensors"))
        assert len(tensors) == 2 * len(ranks)
        for module, rank in ranks.items():
            assert tensors[f"base_model.model.{module}.lora_A.weight"].shape[0] == rank


def test_transformers4_vit_names_are_read(side, keras_side):
    """The same ViT adapter under transformers 4 module names loads the same."""
    folder = os.path.join(side.root, "vit_legacy")
    shutil.copytree(side.peft("vit"), folder)
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors, metadata = read_safetensors(path)
    old = {"vit.layers.": "vit.encoder.layer.", "attention.q_proj": "attention.attention.query",
           "attention.v_proj": "attention.attention.value"}
    renamed = {}
    for key, value in tensors.items():
        for a, b in old.items():
            key = key.replace(a, b)
        renamed[key] = value
    os.remove(path)
    write_safetensors(path, renamed, metadata)
    model = task_model(side, "vit")
    kal.load_peft_adapters(model, folder)
    want = {a.path: to_numpy(a.delta_kernel()) for a in kal.find_adapters(keras_side["vit"]["model"])}
    for adapter in kal.find_adapters(model):
        np.testing.assert_allclose(to_numpy(adapter.delta_kernel()), want[adapter.path], atol=1e-7)


# --------------------------------------------------------------------------
# Bad inputs: clear errors, nothing changed or written
# --------------------------------------------------------------------------
def _snapshot(model):
    return (
        [id(a) for a in kal.find_adapters(model)],
        [(v.path, v.trainable) for v in model.variables],
        [to_numpy(v).copy() for v in model.weights],
    )


def _unchanged(model, snapshot):
    adapters, flags, values = _snapshot(model)
    return (adapters, flags) == snapshot[:2] and all(
        np.array_equal(a, b) for a, b in zip(values, snapshot[2])
    )


def test_unsupported_architecture(side, tmp_path):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"load_peft_adapters .*gemma, llama, vit.*Sequential"):
        kal.load_peft_adapters(model, side.peft("gemma"))
    assert _unchanged(model, before)
    kal.apply_adapters(model, kal.LoRA(rank=2), targets="all-linear")
    with pytest.raises(ValueError, match=r"save_peft_adapters .*gemma, llama, vit.*Sequential"):
        kal.save_peft_adapters(model, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_sinc_is_refused_or_truncated_with_its_error(tmp_path):
    backbone = tiny_gemma()
    kal.apply_adapters(backbone, kal.SincLoRA(rank=2, grid_size=5), targets=["query"])
    [adapter] = kal.find_adapters(backbone)
    perturb([adapter], seed=3)
    out = str(tmp_path / "sinc")
    with pytest.raises(ValueError, match=r"not low-rank.*merge_adapters.*svd_rank"):
        kal.save_peft_adapters(backbone, out)
    assert not os.path.exists(out)
    [layer] = kal.save_peft_adapters(backbone, out, svd_rank=2)["layers"]
    tensors, _ = read_safetensors(os.path.join(out, "adapter_model.safetensors"))
    delta = to_numpy(adapter.delta_kernel())
    sv = np.linalg.svd(delta, compute_uv=False)
    want = np.sqrt(np.sum(sv[2:] ** 2) / np.sum(sv**2))
    assert layer["rank"] == 2 and want > 1e-3
    assert layer["relative_error"] == pytest.approx(want, rel=1e-4)
    key = f"base_model.model.{layer['module']}"
    product = (tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]).T
    assert np.linalg.norm(delta - product) / np.linalg.norm(delta) == pytest.approx(want, rel=1e-3)
    a, b, error = truncated_factors(delta, 64)  # a rank above min(d_in, d_out): exact
    assert error < 1e-6 and np.abs(a @ b - delta).max() <= 1e-5 * np.abs(delta).max()


def test_peft_file_for_another_base(side):
    model = tiny_llama()  # hidden 8: the Gemma adapter's q_proj is 16 x 16
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"another base model.*Nothing was changed"):
        kal.load_peft_adapters(model, side.peft("gemma"))
    assert _unchanged(model, before)


def test_dora_and_unmappable_modules_are_refused(side, tmp_path):
    model = tiny_gemma()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"DoRA.*use_dora=True.*merge_and_unload"):
        kal.load_peft_adapters(model, side.peft("dora"))
    folder = str(tmp_path / "extra")
    shutil.copytree(side.peft("gemma"), folder)
    path = os.path.join(folder, "adapter_model.safetensors")
    tensors, metadata = read_safetensors(path)
    tensors["base_model.model.lm_head.lora_A.weight"] = np.ones((2, 16), "float32")
    tensors["base_model.model.lm_head.lora_B.weight"] = np.ones((32, 2), "float32")
    os.remove(path)
    write_safetensors(path, tensors, metadata)
    with pytest.raises(ValueError, match=r"have no layer in .*'lm_head'.*nothing was changed"):
        kal.load_peft_adapters(model, folder)
    with open(os.path.join(folder, "adapter_config.json")) as f:
        config = json.load(f)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(dict(config, peft_type="LOHA"), f)
    with pytest.raises(ValueError, match=r"PEFT LOHA adapter; only LoRA"):
        kal.load_peft_adapters(model, folder)
    assert _unchanged(model, before)


def test_adapted_layer_is_refused(side, keras_side):
    model = keras_side["gemma"]["model"]
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"already has an adapter"):
        kal.load_peft_adapters(model, side.peft("gemma"))
    assert _unchanged(model, before)


# --------------------------------------------------------------------------
# Command line and Hugging Face folders in
# --------------------------------------------------------------------------
def test_cli_export_peft_and_import_peft(side, keras_side, tmp_path, capsys):
    adapters = str(tmp_path / "gemma.npz")
    kal.save_adapters(keras_side["gemma"]["model"], adapters)
    out = str(tmp_path / "peft")
    assert main(["export-peft", adapters, side.hf("gemma"), out]) == 0
    assert "wrote PEFT LoRA adapter" in capsys.readouterr().out
    got, _ = read_safetensors(os.path.join(out, "adapter_model.safetensors"))
    want, _ = read_safetensors(os.path.join(keras_side["gemma"]["folder"], "adapter_model.safetensors"))
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])
    back = str(tmp_path / "back.npz")
    assert main(["import-peft", side.peft("gemma"), side.hf("gemma"), back]) == 0
    metadata, arrays = read_adapter_file(back)
    ref, _ = read_safetensors(os.path.join(side.peft("gemma"), "adapter_model.safetensors"))
    assert {entry["rank"] for entry in metadata["layers"]} == {2}
    entry = next(e for e in metadata["layers"] if e["path"] == "decoder_block_1/attention/value")
    np.testing.assert_array_equal(
        arrays[f"{entry['path']}::lora_a"],
        ref["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"].T,
    )
    assert main(["import-peft", side.peft("dora"), side.hf("gemma"), str(tmp_path / "x.npz")]) == 2
    assert "DoRA" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["export-peft", "import-peft"])
def test_cli_help_has_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert f"example:\n  keras-adaptive-lora {command} " in text


def test_inspect_a_transformers_folder(side, capsys):
    assert main(["inspect", side.hf("llama"), "--quiet", "--method", "sr-lora"]) == 0
    text = capsys.readouterr().out
    assert "Llama3Backbone from" in text and "transformer_layer_1/self_attention/query" in text


def test_missing_hf_extra_is_named(side, monkeypatch, capsys, tmp_path):
    from keras_hub.src.utils.transformers import safetensor_utils

    monkeypatch.setattr(safetensor_utils, "safetensors", None)  # as without the package
    assert main(["inspect", side.hf("llama"), "--quiet"]) == 2
    assert "pip install 'keras-adaptive-lora[hf]'" in capsys.readouterr().err
    args = ["transfer", "--preset", side.hf("vit"), "--output-dir", str(tmp_path), "--verbose", "0"]
    assert main(args) == 2
    assert "pip install 'keras-adaptive-lora[hf]'" in capsys.readouterr().err


@pytest.mark.skipif(BACKEND != "torch", reason="the job's backend code is tested in "
                    "test_transfer.py; the transformers folder is loaded the same way here")
def test_transfer_with_a_transformers_vit(side, tmp_path, capsys):
    args = ["transfer", "--preset", side.hf("vit"), "--methods", "linear", "--seed", "0",
            "--epochs", "1", "--shots", "1", "--test-size", "8", "--no-export", "--no-plot",
            "--verbose", "0", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    with open(tmp_path / "results.json") as f:
        record = json.load(f)
    assert record["config"]["preset"] == side.hf("vit")
    assert record["input"]["image_size"] == [16, 16]
