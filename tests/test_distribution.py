"""Multi-device training on each backend's own engine, every method at once.

- `layout_map_for` / `distribute_adapters` / `torch_data_parallel` unit tests
  (layouts against hand-written tables, guard clauses), in process.
- jax: `keras.distribution.DataParallel` and a 2x2 `ModelParallel` on 4
  forced host devices; tensorflow: `tf.distribute.MirroredStrategy` on two
  logical CPUs; torch: `DistributedDataParallel` (gloo, 2 processes) with a
  custom loop. Each runs in subprocesses (device setup must precede the
  backend's import) and only under its own `KERAS_BACKEND`, and is compared
  with a single-device run of the same steps.

One tiny Gemma carries all four methods (LoRA on `query`, SR-LoRA on `value`,
SincLoRA on `attention_output`, FlexLoRA on the three MLP projections with a
`FlexLoRAScheduler`), so each engine compiles one model, not four.
SGD is used for the comparison: Adam divides tiny gradients by their own
size, which turns float reduction-order noise into visible weight changes
(SincLoRA's factors drift ~3e-3 in 12 Adam steps on jax; losses still agree
to 1e-6).
"""

import json
import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

import keras_adaptive_lora as kal
from keras_adaptive_lora.backend import torch_data_parallel
from keras_adaptive_lora.distribution import adapter_layouts, distribute_adapters, layout_map_for

from conftest import tiny_gemma

BACKEND = keras.backend.backend()
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
BATCH, STEPS, SEQ = 8, 12, 8
TOLERANCE = 2e-5  # max abs difference of weights and losses vs one device


# --------------------------------------------------------------------------
# The shared workload (used by the parent and by the subprocesses)
# --------------------------------------------------------------------------
def gemma():
    """Tiny Gemma whose kernels split evenly on a 2x2 mesh (2 kv heads)."""
    return tiny_gemma(num_key_value_heads=2)


def adapt(backbone):
    kal.apply_adapters(backbone, kal.LoRA(rank=2), targets=["query"])
    kal.apply_adapters(backbone, kal.StableRankLoRA(max_rank=3, seed=1), targets=["value"])
    kal.apply_adapters(backbone, kal.SincLoRA(rank=2, grid_size=6), targets=["attention_output"])
    kal.apply_adapters(
        backbone,
        kal.FlexLoRA(rank=2, max_rank=4, seed=3),
        targets=["ffw_gating", "ffw_gating_2", "ffw_linear"],
    )
    return backbone


def data():
    rng = np.random.default_rng(0)
    x = {
        "token_ids": rng.integers(0, 20, (BATCH * STEPS, SEQ)).astype("int32"),
        "padding_mask": np.ones((BATCH * STEPS, SEQ), "int32"),
    }
    return x, rng.integers(0, 20, (BATCH * STEPS, SEQ)).astype("int32")


def build(weights=None):
    """The adapted causal LM, compiled; `weights` (a list) overrides the init."""
    keras.utils.set_random_seed(0)
    backbone = adapt(gemma())
    if weights is not None:
        backbone.set_weights(weights)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(
        optimizer=keras.optimizers.SGD(0.5, momentum=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def scheduler():
    return kal.FlexLoRAScheduler(STEPS, b0=2, warmup_steps=2, final_steps=2, interval=2, verbose=0)


class BatchLosses(keras.callbacks.Callback):
    """Records the running loss after every batch."""

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def fit(model):
    """`fit` for STEPS steps; returns (batch losses, scheduler)."""
    x, y = data()
    flex, losses = scheduler(), BatchLosses()
    model.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[flex, losses])
    return losses.losses, flex


def state(model):
    """`{"i:path": value}` for every variable of the backbone (sampler states too)."""
    return {f"{i}:{v.path}": np.array(keras.ops.convert_to_numpy(v)) for i, v in enumerate(model.backbone.variables)}


def initial_weights():
    """The workload's initial backbone weights (one list, for `set_weights`)."""
    return [np.array(w) for w in build().backbone.get_weights()]


def save(path, runs):
    """`runs`: {name: (losses, scheduler, model)} -> one npz."""
    arrays = {}
    for name, (losses, flex, model) in runs.items():
        arrays[f"{name}/losses"] = np.array(losses)
        arrays[f"{name}/ranks"] = flex.rank_history()["ranks"]
        for key, value in state(model).items():
            arrays[f"{name}/state/{key}"] = value
    np.savez(path, **arrays)


# --------------------------------------------------------------------------
# Subprocess entry points
# --------------------------------------------------------------------------
def adapter_variables(model):
    """Every adapter's own variables (not the wrapped layers'), in order."""
    out = []
    for adapter in kal.find_adapters(model):
        base = {id(v) for v in adapter.wrapped.variables}
        out += [v for v in adapter.variables if id(v) not in base]
    return out


def spec_of(variable):
    sharding = variable.value.sharding
    spec = tuple(sharding.spec) + (None,) * (len(variable.shape) - len(sharding.spec))
    return [list(spec), len(sharding.device_set)]


def jax_worker(out):
    """Single device, DataParallel and 2x2 ModelParallel runs from one init."""
    distribution = keras.distribution
    devices = distribution.list_devices()
    assert len(devices) == 4, devices
    weights = initial_weights()
    model = build(weights)
    runs = {"single": fit(model) + (model,)}
    specs = {}

    distribution.set_distribution(distribution.DataParallel(devices=devices))
    model = build(weights)
    runs["data_parallel"] = fit(model) + (model,)
    specs["data_parallel"] = {v.path: spec_of(v) for v in adapter_variables(model)}

    mesh = distribution.DeviceMesh((2, 2), ("batch", "model"), devices)
    base_map = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    distribution.set_distribution(distribution.ModelParallel(layout_map=base_map, batch_dim_name="batch"))
    model = build(weights)  # base sharded; adapters created replicated
    layout_map = layout_map_for(model.backbone, base_map)
    distribution.set_distribution(distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch"))
    distribute_adapters(model.backbone)
    runs["model_parallel"] = fit(model) + (model,)
    specs["model_parallel"] = {v.path: spec_of(v) for v in adapter_variables(model)}
    query = next(a for a in kal.find_adapters(model) if a.path.endswith("attention/query"))
    slot = model.optimizer.momentums[model.optimizer._get_variable_index(query.lora_a)]
    specs["query_lora_a_momentum"] = spec_of(slot)
    specs["base_kernel"] = spec_of(query.wrapped.kernel)
    save(out + ".npz", runs)
    with open(out + ".json", "w") as f:
        json.dump(specs, f)


def tensorflow_worker(out):
    """Single device and MirroredStrategy over two logical CPUs."""
    import tensorflow as tf

    weights = initial_weights()
    model = build(weights)
    runs = {"single": fit(model) + (model,)}
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = build(weights)
    runs["mirrored"] = fit(model) + (model,)
    replicas = {}
    for v in adapter_variables(model):
        parts = [np.array(p.numpy()) for p in v.value.values]
        replicas[v.path] = [
            type(v.value).__name__,
            len(parts),
            bool(all(np.array_equal(parts[0], p) for p in parts[1:])),
        ]
    save(out + ".npz", runs)
    with open(out + ".json", "w") as f:
        json.dump({"replicas": replicas, "replicas_in_sync": strategy.num_replicas_in_sync}, f)


def torch_train(rank=0, world=1, wrap=None):
    """A custom loop: rank `rank` of `world` takes its slice of each batch."""
    import torch

    model = build()  # same seeds in every process; DDP also broadcasts rank 0's
    variables = model.trainable_variables
    model.optimizer.build(variables)
    net = model if wrap is None else wrap(model)
    flex = scheduler()
    callbacks = keras.callbacks.CallbackList([flex], model=model)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x, y = data()
    per = BATCH // world
    losses, penalties = [], []
    callbacks.on_train_begin()
    callbacks.on_epoch_begin(0)
    for step in range(STEPS):
        rows = slice(step * BATCH + rank * per, step * BATCH + (rank + 1) * per)
        for v in variables:
            v.value.grad = None
        inputs = {k: torch.as_tensor(v[rows]) for k, v in x.items()}
        logits = net(inputs, training=True)
        penalties.append(len(model.losses))
        loss = loss_fn(torch.as_tensor(y[rows]), logits) + sum(model.losses)
        loss.backward()
        with torch.no_grad():
            model.optimizer.apply([v.value.grad for v in variables], variables)
        losses.append(float(loss.detach()))
        callbacks.on_train_batch_end(step, {})
    callbacks.on_epoch_end(0, {})
    return losses, flex, model, penalties


def torch_worker(rank, init_file, out):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        losses, flex, model, _ = torch_train(rank, 2, torch_data_parallel)
    finally:
        dist.destroy_process_group()
    save(out, {"ddp": (losses, flex, model)})


def run_python(code, backend, env=None):
    """Start `code` in a subprocess under `backend`, with this folder importable."""
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=ROOT, **(env or {}))
    prefix = f"import sys; sys.path.insert(0, {TESTS!r})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prefix + code], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )


def finish(process, timeout=600):
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    assert process.returncode == 0, output[-4000:]


# --------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------
def runs_of(path):
    with np.load(path) as f:
        arrays = dict(f)
    runs = {}
    for key, value in arrays.items():
        name, rest = key.split("/", 1)
        runs.setdefault(name, {})[rest] = value
    return runs


def assert_matches(reference, run, name):
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=0, atol=TOLERANCE, err_msg=name)
    np.testing.assert_array_equal(run["ranks"], reference["ranks"], err_msg=name)
    keys = [k for k in reference if k.startswith("state/")]
    assert keys and keys == [k for k in run if k.startswith("state/")], name
    for key in keys:
        np.testing.assert_allclose(run[key], reference[key], rtol=0, atol=TOLERANCE, err_msg=f"{name} {key}")


def assert_schedule_and_sampler_moved(reference):
    """The run did what the comparison relies on: FlexLoRA moved rank (its
    masks changed, the total kept) and SR-LoRA's SPU sampler advanced."""
    ranks = reference["ranks"]
    assert len(ranks) >= 2 and not np.array_equal(ranks[0], ranks[-1])
    assert ranks[0].sum() == ranks[-1].sum()
    initial = {
        f"state/{k}": v for k, v in state(build()).items() if k.endswith("seed_generator_state")
    }
    assert len(initial) == 1
    for key, value in initial.items():
        assert not np.array_equal(reference[key], value), key


# --------------------------------------------------------------------------
# Engine tests
# --------------------------------------------------------------------------
# Expected layouts under GemmaBackbone.get_layout_map on a ("batch", "model")
# mesh, worked out by hand from its kernel entries: q/k/v kernels
# (heads, hidden, head_dim) -> ("model", "batch", None): input axis hidden is
# "batch", output (heads, head_dim) flattens to "model"; attention_output
# (heads, head_dim, hidden) -> ("model", None, "batch"); ffw_gating(_2)
# (hidden, f) -> ("batch", "model"); ffw_linear (f, hidden) -> ("model", "batch").
B, M = "batch", "model"
EXPECTED_MODEL_PARALLEL = {
    "decoder_block_0/attention/query/lora_a": [B, None],
    "decoder_block_0/attention/query/lora_b": [None, M],
    "decoder_block_0/attention/value/lora_a": [B, None],
    "decoder_block_0/attention/value/lora_b": [None, M],
    "decoder_block_0/attention/attention_output/lora_a": [M, None],
    "decoder_block_0/attention/attention_output/lora_b": [None, B],
    "decoder_block_0/attention/attention_output/amplitudes": [None],
    "decoder_block_0/attention/attention_output/bandwidth_logits": [None],
    "decoder_block_0/ffw_gating/flex_a": [B, None],
    "decoder_block_0/ffw_gating/flex_b": [None, M],
    "decoder_block_0/ffw_gating_2/flex_a": [B, None],
    "decoder_block_0/ffw_gating_2/flex_b": [None, M],
    "decoder_block_0/ffw_linear/flex_a": [M, None],
    "decoder_block_0/ffw_linear/flex_b": [None, B],
}
for _layer in ("ffw_gating", "ffw_gating_2", "ffw_linear"):
    EXPECTED_MODEL_PARALLEL[f"decoder_block_0/{_layer}/flex_lambda"] = [None]
    EXPECTED_MODEL_PARALLEL[f"decoder_block_0/{_layer}/flex_mask"] = [None]
    EXPECTED_MODEL_PARALLEL[f"decoder_block_0/{_layer}/flex_expansions"] = []
    EXPECTED_MODEL_PARALLEL[f"decoder_block_0/{_layer}/flex_step"] = []


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution runs on the jax backend")
def test_jax_data_and_model_parallel_match_one_device(tmp_path):
    out = str(tmp_path / "jax")
    process = run_python(
        f"import test_distribution as t; t.jax_worker({out!r})",
        "jax",
        env={"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4"},
    )
    finish(process)
    runs = runs_of(out + ".npz")
    with open(out + ".json") as f:
        specs = json.load(f)
    assert_schedule_and_sampler_moved(runs["single"])
    assert_matches(runs["single"], runs["data_parallel"], "data_parallel")
    assert_matches(runs["single"], runs["model_parallel"], "model_parallel")
    # DataParallel: every adapter variable replicated on all 4 devices.
    assert specs["data_parallel"] and all(
        set(spec) <= {None} and devices == 4 for spec, devices in specs["data_parallel"].values()
    )
    # ModelParallel: the hand-written layouts; the sampler state is replicated.
    got = {path: spec for path, (spec, devices) in specs["model_parallel"].items()}
    samplers = [p for p in got if p.endswith("seed_generator_state")]
    assert len(samplers) == 1 and set(got.pop(samplers[0])) == {None}
    assert got == EXPECTED_MODEL_PARALLEL
    assert all(devices == 4 for _, devices in specs["model_parallel"].values())
    assert specs["query_lora_a_momentum"] == [[B, None], 4]  # optimizer slots follow
    assert specs["base_kernel"] == [[M, B, None], 4]


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute runs on the tensorflow backend")
def test_tensorflow_mirrored_strategy_matches_one_device(tmp_path):
    out = str(tmp_path / "tf")
    code = (
        "import tensorflow as tf\n"
        "cpu = tf.config.list_physical_devices('CPU')[0]\n"
        "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"
        f"import test_distribution as t; t.tensorflow_worker({out!r})"
    )
    finish(run_python(code, "tensorflow"))
    runs = runs_of(out + ".npz")
    with open(out + ".json") as f:
        info = json.load(f)
    assert info["replicas_in_sync"] == 2
    assert_schedule_and_sampler_moved(runs["single"])
    assert_matches(runs["single"], runs["mirrored"], "mirrored")
    # Every adapter variable is mirrored on both replicas, which agree
    # (FlexLoRA's masks set by the callback, the SPU sampler state included).
    replicas = info["replicas"]
    assert any(p.endswith("flex_mask") for p in replicas)
    assert any(p.endswith("seed_generator_state") for p in replicas)
    assert all(kind == "MirroredVariable" and n == 2 and same for kind, n, same in replicas.values())


@pytest.mark.skipif(BACKEND != "torch", reason="DistributedDataParallel runs on the torch backend")
def test_torch_ddp_two_processes_match_one_process(tmp_path):
    init_file = str(tmp_path / "rendezvous")
    outs = [str(tmp_path / f"rank{rank}.npz") for rank in (0, 1)]
    processes = [
        run_python(
            f"import test_distribution as t; t.torch_worker({rank}, {init_file!r}, {outs[rank]!r})",
            "torch",
            env={"GLOO_SOCKET_IFNAME": "lo"},
        )
        for rank in (0, 1)
    ]
    losses, flex, model, penalties = torch_train()  # one process, whole batches
    for process in processes:
        finish(process)
    reference = {"losses": np.array(losses), "ranks": flex.rank_history()["ranks"]}
    reference.update({f"state/{k}": v for k, v in state(model).items()})
    assert penalties == [3] * STEPS  # FlexLoRA's penalty, once per adapter and call
    assert_schedule_and_sampler_moved(reference)
    rank0, rank1 = (runs_of(path)["ddp"] for path in outs)
    for key in rank0:
        if key.startswith("state/"):  # DDP keeps the processes identical
            np.testing.assert_array_equal(rank0[key], rank1[key], err_msg=key)
    # Each process's loss is over its half batch: their mean is the full-batch loss.
    mean = dict(rank0, losses=(rank0["losses"] + rank1["losses"]) / 2)
    assert_matches(reference, mean, "ddp")


# --------------------------------------------------------------------------
# layout_map_for: hand-written layouts, in process, every backend
# --------------------------------------------------------------------------
def fake_mesh(shape=(2, 2), names=("batch", "model")):
    """A mesh of device names only: layouts are computed, nothing is placed."""
    return keras.distribution.DeviceMesh(shape, names, [f"cpu:{i}" for i in range(int(np.prod(shape)))])


def axes_of(layout_map, path):
    return layout_map[path].axes


@pytest.fixture(scope="module")
def adapted():
    """The workload's adapted backbone, built once (layouts only read it)."""
    return adapt(gemma())


def test_layout_map_for_gemma_every_method(adapted):
    backbone = adapted
    mesh = fake_mesh()
    base = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    layout_map = layout_map_for(backbone, base)
    assert layout_map.device_mesh is mesh
    for path, axes in EXPECTED_MODEL_PARALLEL.items():
        assert list(axes_of(layout_map, path)) == axes, path
    sampler = [v.path for v in adapter_variables(backbone) if "seed_generator" in v.path]
    assert len(sampler) == 1 and axes_of(layout_map, sampler[0]) == (None,)
    # The base entries are carried over, the base map is left unchanged.
    assert set(base) < set(layout_map)
    assert axes_of(layout_map, "decoder_block_0/attention/query/kernel") == (M, B, None)
    assert not any("lora" in key for key in base)
    # One exact key per adapter variable.
    adapter_paths = {v.path for v in adapter_variables(backbone)}
    assert set(layout_map) - set(base) == adapter_paths


def test_layout_map_for_flattened_and_uneven_axes():
    # conftest's Gemma has ONE kv head: the key kernel (1, 16, 4) is sharded
    # ("model", "batch", None) but its head axis cannot split in 2, so B stays
    # replicated; A takes "batch" from the hidden axis.
    backbone = tiny_gemma()
    kal.apply_adapters(backbone, kal.LoRA(rank=2), targets=["key"])
    base = keras_hub.models.GemmaBackbone.get_layout_map(fake_mesh())
    layout_map = layout_map_for(backbone, base)
    assert axes_of(layout_map, "decoder_block_0/attention/key/lora_a") == (B, None)
    assert axes_of(layout_map, "decoder_block_0/attention/key/lora_b") == (None, None)


def test_layout_map_for_inner_sharded_axis_replicates():
    # Kernel (heads=4, head_dim=4, hidden=16) sharded on head_dim only: the
    # flattened d_in = heads * head_dim would need a strided split.
    backbone = gemma()
    kal.apply_adapters(backbone, kal.LoRA(rank=2), targets=["attention_output"])
    mesh = fake_mesh()
    base = keras.distribution.LayoutMap(mesh)
    base["decoder_block.*attention_output.kernel"] = (None, M, B)
    layout_map = layout_map_for(backbone, base)
    assert axes_of(layout_map, "decoder_block_0/attention/attention_output/lora_a") == (None, None)
    assert axes_of(layout_map, "decoder_block_0/attention/attention_output/lora_b") == (None, B)


def test_layout_map_for_plain_dense_exact_keys_win():
    inputs = keras.Input((8,))
    outputs = keras.layers.Dense(4, name="head")(keras.layers.Dense(6, name="dense")(inputs))
    model = keras.Model(inputs, outputs)
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["dense"])
    kal.apply_adapters(model, kal.LoRA(rank=4), targets=["head"])
    base = keras.distribution.LayoutMap(fake_mesh((2,), ("model",)))
    base["dense/kernel"] = (M, None)
    base[".*lora_.*"] = (M, M)  # a user regex that also matches adapter paths
    base["head/lora_b"] = (M, None)  # a user's own exact entry is kept
    layout_map = layout_map_for(model, base)
    # Exact keys are looked up before regexes: ours win, no "matches multiple
    # layout specification keys" error.
    assert axes_of(layout_map, "dense/lora_a") == (M, None)
    assert axes_of(layout_map, "dense/lora_b") == (None, None)
    # head (6 -> 4) has no kernel entry; rank 4: lora_a (6, 4) is A-like.
    assert axes_of(layout_map, "head/lora_a") == (None, None)
    assert axes_of(layout_map, "head/lora_b") == (M, None)


def test_layout_map_for_dense_and_ambiguous_square_factors(monkeypatch):
    inputs = keras.Input((4,))
    outputs = keras.layers.Dense(8, name="wide")(keras.layers.Dense(4, name="square")(inputs))
    model = keras.Model(inputs, outputs)
    kal.apply_adapters(model, kal.LoRA(rank=4), targets=["square"])  # d_in = d_out = r
    kal.apply_adapters(model, kal.LoRA(rank=2), targets=["wide"])
    base = keras.distribution.LayoutMap(fake_mesh())
    base[".*kernel"] = (B, M)
    layout_map = layout_map_for(model, base)
    assert axes_of(layout_map, "wide/lora_a") == (B, None)
    assert axes_of(layout_map, "wide/lora_b") == (None, M)
    # (4, 4) factors of a rank-4 adapter on a 4x4 kernel: LoRA names its
    # factors (`AdapterLayer.factors`), so A follows the input axis, B the output.
    assert axes_of(layout_map, "square/lora_a") == (B, None)
    assert axes_of(layout_map, "square/lora_b") == (None, M)
    square = next(a for a in kal.find_adapters(model) if a.name == "square")
    assert square.factor_roles() == {"lora_a": "in", "lora_b": "out"}
    # Without names, the default roles (by shape) cannot tell them apart: replicated.
    monkeypatch.setattr(kal.LoRAAdapter, "factors", None)
    assert square.factor_roles() == {"lora_a": None, "lora_b": None}
    wide = next(a for a in kal.find_adapters(model) if a.name == "wide")
    assert wide.factor_roles() == {"lora_a": "in", "lora_b": "out"}  # (4, 2), (2, 8): by shape


@pytest.mark.parametrize(
    "method, roles",
    [
        (kal.SincLoRA(rank=4, grid_size=5), {"lora_a": "in", "lora_b": "out", "amplitudes": None, "bandwidth_logits": None}),
        (kal.FlexLoRA(rank=2, max_rank=4), {"flex_a": "in", "flex_b": "out"}),
        (kal.StableRankLoRA(), {"lora_a": "in", "lora_b": "out"}),
    ],
)
def test_every_method_names_its_factors_on_a_square_kernel(method, roles):
    layer = keras.layers.Dense(4)
    layer.build((None, 4))
    adapter = method.wrap(layer)  # (4, 4) factors: ambiguous by shape
    got = adapter.factor_roles()
    assert {k: got[k] for k in roles} == roles
    assert all(role is None for name, role in got.items() if name not in roles)


def test_layout_map_for_without_base_map_replicates(adapted):
    backbone = adapted
    layout_map = layout_map_for(backbone, device_mesh=fake_mesh())
    adapter_vars = adapter_variables(backbone)
    assert len(layout_map) == len(adapter_vars)
    assert all(set(axes_of(layout_map, v.path)) <= {None} for v in adapter_vars)


def test_adapter_layouts_rejects_wrong_kernel_rank(adapted):
    adapter = kal.find_adapters(adapted)[0]
    with pytest.raises(ValueError, match="Fix the layout map entry"):
        adapter_layouts(adapter, (M, B), fake_mesh())


def test_layout_map_for_errors(adapted):
    mesh = fake_mesh()
    plain = gemma()
    with pytest.raises(ValueError, match="has no adapters"):
        layout_map_for(plain, device_mesh=mesh)
    backbone = adapted
    with pytest.raises(ValueError, match="needs a keras.distribution.DeviceMesh"):
        layout_map_for(backbone)
    with pytest.raises(ValueError, match="must be a keras.distribution.LayoutMap"):
        layout_map_for(backbone, {"x": (None,)})
    base = keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    with pytest.raises(ValueError, match="differs from the mesh"):
        layout_map_for(backbone, base, device_mesh=fake_mesh((4, 1)))
    assert layout_map_for(backbone, base, device_mesh=fake_mesh()).device_mesh is not None


# --------------------------------------------------------------------------
# distribute_adapters and the torch shim: guards on every backend
# --------------------------------------------------------------------------
@pytest.mark.skipif(BACKEND == "jax", reason="checks the non-jax error")
def test_distribute_adapters_needs_jax(adapted):
    with pytest.raises(ValueError, match="jax backend only"):
        distribute_adapters(adapted)


@pytest.mark.skipif(BACKEND != "jax", reason="keras.distribution places variables on jax")
def test_distribute_adapters_one_device_in_process():
    backbone = adapt(gemma())  # its own: this re-lays out the variables
    before = {v.path: np.array(v) for v in adapter_variables(backbone)}
    with pytest.raises(ValueError, match="No distribution"):
        distribute_adapters(backbone)
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), keras.distribution.list_devices()[:1])
    layout_map = layout_map_for(backbone, keras_hub.models.GemmaBackbone.get_layout_map(mesh))
    placed = distribute_adapters(backbone, keras.distribution.ModelParallel(layout_map=layout_map))
    assert {k: list(v) for k, v in placed.items() if k in EXPECTED_MODEL_PARALLEL} == EXPECTED_MODEL_PARALLEL
    for v in adapter_variables(backbone):
        assert v._layout.axes == layout_map[v.path].axes
        np.testing.assert_array_equal(np.array(v), before[v.path])
    with pytest.raises(ValueError, match="has no adapters"):
        distribute_adapters(gemma(), keras.distribution.DataParallel(devices=mesh.devices.ravel()))


@pytest.mark.skipif(BACKEND == "torch", reason="checks the non-torch error")
def test_torch_data_parallel_needs_torch(adapted):
    with pytest.raises(ValueError, match="for the torch backend"):
        torch_data_parallel(adapted)


@pytest.mark.skipif(BACKEND != "torch", reason="torch.distributed")
def test_torch_data_parallel_needs_process_group(adapted):
    import torch.distributed as dist

    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        torch_data_parallel(adapted)
