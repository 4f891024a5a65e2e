"""Training-step time of our factored LoRA vs Keras's built-in `enable_lora`.

Same mid-size Gemma config built from config (hidden 512, 4 layers, sequence
128), same batch, same rank, same targets (query and value, the targets of
keras-hub's `Backbone.enable_lora`), measured side by side in one process per
backend: the two models' steps are interleaved in rounds and the median step
time of each is reported, so machine noise hits both alike.

Usage:
    python benchmarks/bench_lora_vs_builtin.py                 # all backends
    python benchmarks/bench_lora_vs_builtin.py --backends jax  # one backend
Prints per backend: ms/step for each and the ratio ours/built-in (target:
<= 1.0) for the whole model, and the same for one adapted query projection
alone (the adapter's own cost; in the whole model the 8 adapters are a few
percent of the step, so that ratio sits near 1 within machine noise).
"""

import sys

from _runner import run_per_backend

CHILD = r"""
import json, os, statistics, sys, time
import numpy as np
import keras, keras_hub
import keras_adaptive_lora as kal

cfg = json.loads(sys.argv[1])

def build():
    keras.utils.set_random_seed(0)
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=1000, num_layers=cfg["layers"], num_query_heads=8,
        num_key_value_heads=1, hidden_dim=cfg["hidden"], intermediate_dim=2 * cfg["hidden"],
        head_dim=cfg["hidden"] // 8)

rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(0, 1000, (cfg["batch"], cfg["seq"])).astype("int32"),
     "padding_mask": np.ones((cfg["batch"], cfg["seq"]), "int32")}
y = rng.normal(size=(cfg["batch"], cfg["seq"], cfg["hidden"])).astype("float32")

ours = build()
report = kal.apply_adapters(ours, kal.LoRA(rank=cfg["rank"]), targets=["query", "value"])
peer = build()
peer.enable_lora(cfg["rank"], target_layer_names=["query", "value"])
models = {"ours": ours, "builtin": peer}
for m in models.values():
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    for _ in range(3):  # compile / warm up
        m.train_on_batch(x, y)
counts = {k: sum(int(np.prod(v.shape)) for v in m.trainable_weights) for k, m in models.items()}
times = {k: [] for k in models}
for _ in range(cfg["rounds"]):
    for name, m in models.items():
        start = time.perf_counter()
        for _ in range(cfg["steps"]):
            loss = m.train_on_batch(x, y)
        float(np.asarray(loss))
        times[name].append((time.perf_counter() - start) / cfg["steps"])
med = {k: statistics.median(v) for k, v in times.items()}

# One adapted projection alone (Gemma's query equation, same tokens): the
# adapter's own cost, without the rest of the model diluting it.
def projection():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((cfg["seq"], cfg["hidden"]), batch_size=cfg["batch"])
    layer = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(cfg["seq"], 8, cfg["hidden"] // 8), name="query")
    return keras.Model(inputs, layer(inputs)), layer

px = rng.normal(size=(cfg["batch"], cfg["seq"], cfg["hidden"])).astype("float32")
py = rng.normal(size=(cfg["batch"], cfg["seq"], 8, cfg["hidden"] // 8)).astype("float32")
p_ours, _ = projection()
kal.apply_adapters(p_ours, kal.LoRA(rank=cfg["rank"]), targets=["query"])
p_peer, layer = projection()
layer.enable_lora(cfg["rank"])
projections = {"ours": p_ours, "builtin": p_peer}
for m in projections.values():
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    for _ in range(3):
        m.train_on_batch(px, py)
ptimes = {k: [] for k in projections}
for _ in range(cfg["rounds"]):
    for name, m in projections.items():
        start = time.perf_counter()
        for _ in range(5 * cfg["steps"]):
            loss = m.train_on_batch(px, py)
        float(np.asarray(loss))
        ptimes[name].append((time.perf_counter() - start) / (5 * cfg["steps"]))
pmed = {k: statistics.median(v) for k, v in ptimes.items()}
print(json.dumps({"backend": keras.backend.backend(), "ms_ours": 1e3 * med["ours"],
                  "ms_builtin": 1e3 * med["builtin"], "ratio": med["ours"] / med["builtin"],
                  "layer_ms_ours": 1e3 * pmed["ours"], "layer_ms_builtin": 1e3 * pmed["builtin"],
                  "layer_ratio": pmed["ours"] / pmed["builtin"],
                  "params_ours": counts["ours"], "params_builtin": counts["builtin"]}))
"""


def format_result(r):
    return (
        f"{r['backend']:>10}: ours {r['ms_ours']:.1f} ms/step, built-in enable_lora "
        f"{r['ms_builtin']:.1f} ms/step, ratio ours/built-in = {r['ratio']:.2f} "
        f"(trainable params {r['params_ours']:,} vs {r['params_builtin']:,})\n"
        f"{'':>10}  one adapted query projection alone: ours {r['layer_ms_ours']:.2f} ms/step, "
        f"built-in {r['layer_ms_builtin']:.2f} ms/step, ratio = {r['layer_ratio']:.2f}"
    )


def main():
    return run_per_backend(CHILD, __doc__.splitlines()[0], format_result)


if __name__ == "__main__":
    sys.exit(main())
