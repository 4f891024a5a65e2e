"""A toy fifth method, defined and registered in this file alone, gets the
contract suite, the command line's choices, `inspect` and adapter files with
no edit anywhere else (the architecture's promise).

The toy: LoRA with a learnable scalar gate, `ΔW = g · s · A B` (`g` starts at
1, `B` at 0, so `ΔW = 0` at init); `r (d_in + d_out) + 1` parameters.
"""

import contextlib
import dataclasses
import io

import keras
import numpy as np
import pytest
from contract import MethodContract
from conftest import tiny_gemma, to_numpy, token_batch
from keras import ops

import keras_adaptive_lora as kal
from keras_adaptive_lora import cli, inspection
from keras_adaptive_lora._validation import check_positive_int
from keras_adaptive_lora.core.kernel_view import check_rank, kernel_view
from keras_adaptive_lora.core.method import unregister_method
from keras_adaptive_lora.targets import role_targets


@keras.saving.register_keras_serializable(package="keras_adaptive_lora_tests")
class GatedLoRAAdapter(kal.AdapterLayer):
    def __init__(self, layer, *, rank, **kwargs):
        self.lora_rank = check_positive_int("rank", rank)
        check_rank(layer, self.lora_rank)
        super().__init__(layer, **kwargs)

    def build_adapter(self):
        self.gate_a = self.add_adapter_weight("gate_a", (self.d_in, self.lora_rank), "he_uniform")
        self.gate_b = self.add_adapter_weight("gate_b", (self.lora_rank, self.d_out), "zeros")
        self.gate = self.add_adapter_weight("gate", (), "ones")

    def delta_kernel(self):
        return ops.multiply(self.gate, ops.matmul(self.gate_a, self.gate_b)) / self.lora_rank

    def rank(self):
        return self.lora_rank

    def adapter_config(self):
        return {"rank": self.lora_rank}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GatedLoRA(kal.AdapterMethod):
    name = "toy-gated"
    title = "Toy gated LoRA"
    layer_class = GatedLoRAAdapter
    default_targets = role_targets("query", "value")

    rank: int = 4

    def __post_init__(self):
        self._set("rank", check_positive_int("rank", self.rank))

    def wrap(self, layer):
        return GatedLoRAAdapter(layer, rank=self.rank)

    def plan(self, layers):
        out = []
        for layer in layers:
            check_rank(layer, self.rank)
            view = kernel_view(layer)
            out.append(kal.LayerPlan(self.rank, self.rank, self.rank * (view.d_in + view.d_out) + 1))
        return out


@pytest.fixture(autouse=True, scope="module")
def registered():
    kal.register_method(GatedLoRA)
    yield
    unregister_method(GatedLoRA.name)


@pytest.fixture
def method_name():
    return GatedLoRA.name


class TestToyContract(MethodContract):
    pass


def test_registry_lists_it_and_rejects_a_second_owner_of_its_name():
    assert kal.method_names()[-1] == "toy-gated"
    assert kal.get_method("toy-gated") is GatedLoRA
    impostor = dataclasses.dataclass(frozen=True, kw_only=True)(
        type("GatedLoRA2", (GatedLoRA,), {"name": "toy-gated"})
    )
    with pytest.raises(ValueError, match="'toy-gated' is already registered by GatedLoRA"):
        kal.register_method(impostor)
    with pytest.raises(TypeError, match="must be a dataclass"):
        kal.register_method(type("Plain", (kal.AdapterMethod,), {"name": "plain"}))


def test_command_line_offers_it_and_inspect_plans_it(tmp_path):
    backbone = tiny_gemma()
    backbone(token_batch())
    folder = str(tmp_path / "gemma")
    backbone.save_to_preset(folder)
    choices = {
        action.dest: action.choices
        for sub in cli.build_parser()._subparsers._group_actions
        for action in sub.choices["inspect"]._actions
    }
    assert "toy-gated" in choices["method"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["inspect", folder, "--method", "toy-gated", "--rank", "2", "--quiet"]) == 0
    text = out.getvalue()
    assert "Toy gated LoRA plan for GemmaBackbone" in text
    # query (16 -> 4x4) and value (16 -> 1x4): 2 (d_in + d_out) + 1 each = 65 + 41.
    assert "trainable (adapter) params: 106 ||" in text
    report = inspection.inspect_model(backbone, "toy-gated", rank=2)
    assert [r["params"] for r in report.rows] == [2 * (16 + 16) + 1, 2 * (16 + 4) + 1]
    with pytest.raises(ValueError, match="`budget` does not apply to toy-gated"):
        inspection.inspect_model(backbone, "toy-gated", budget=10)


def test_adapter_file_of_a_keras_hub_model_names_it(tmp_path):
    keras.utils.set_random_seed(5)
    backbone = tiny_gemma()
    x = token_batch()
    kal.apply_adapters(backbone, GatedLoRA(rank=2))
    for adapter in kal.find_adapters(backbone):
        adapter.gate_b.assign(np.full(adapter.gate_b.shape, 0.1, "float32"))
    path = str(tmp_path / "toy.npz")
    metadata = kal.save_adapters(backbone, path)
    assert metadata["methods"][0]["name"] == "toy-gated"
    keras.utils.set_random_seed(5)
    fresh = tiny_gemma()  # the same base weights
    report = kal.load_adapters(fresh, path)
    assert report.method == GatedLoRA(rank=2)
    assert [type(a) for a in kal.find_adapters(fresh)] == [GatedLoRAAdapter] * 2
    np.testing.assert_allclose(to_numpy(fresh(x)), to_numpy(backbone(x)), atol=1e-5)
