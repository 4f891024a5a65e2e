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
alone (the adapter's own cost). Two target sets: query+value (keras-hub's
default; there the 8 adapters are a few percent of the step, so the
whole-model ratio sits near 1 within machine noise) and every projection of
the blocks. On jax it also prints the FLOPs of one loss-and-gradient step
from XLA's cost analysis, a count machine noise cannot move.
"""

import sys

from _runner import report_ratio, run_per_backend

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

TARGETS = {
    # keras-hub's `Backbone.enable_lora` default targets.
    "query+value": ["query", "value"],
    # Every projection of the decoder blocks (attention and MLP).
    "all projections": ["query", "key", "value", "attention_output",
                        "ffw_gating", "ffw_gating_2", "ffw_linear"],
}


def timed_pair(models, inputs, targets_, steps):
    # Median step time of each model, interleaved in rounds, order alternating.
    for m in models.values():
        m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
        for _ in range(3):  # compile / warm up
            m.train_on_batch(inputs, targets_)
    times = {k: [] for k in models}
    names = list(models)
    for round_ in range(cfg["rounds"]):
        for name in names if round_ % 2 == 0 else names[::-1]:
            m = models[name]
            start = time.perf_counter()
            for _ in range(steps):
                loss = m.train_on_batch(inputs, targets_)
            float(np.asarray(loss))
            times[name].append((time.perf_counter() - start) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def xla_flops(model):
    # FLOPs of one loss-and-gradient step from XLA's cost analysis (jax only):
    # a deterministic count that machine noise cannot move.
    if keras.backend.backend() != "jax":
        return None
    import jax

    def loss(trainable, non_trainable):
        out, _ = model.stateless_call(trainable, non_trainable, x, training=True)
        return jax.numpy.mean((out - y) ** 2)

    args = ([v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables])
    cost = jax.jit(jax.value_and_grad(loss)).lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


whole = {}
for label, names in TARGETS.items():
    ours = build()
    kal.apply_adapters(ours, kal.LoRA(rank=cfg["rank"]), targets=names)
    peer = build()
    peer.enable_lora(cfg["rank"], target_layer_names=names)
    models = {"ours": ours, "builtin": peer}
    counts = {k: sum(int(np.prod(v.shape)) for v in m.trainable_weights) for k, m in models.items()}
    med = timed_pair(models, x, y, cfg["steps"])
    flops = {k: xla_flops(m) for k, m in models.items()}
    whole[label] = {"flops_ours": flops["ours"], "flops_builtin": flops["builtin"],"ms_ours": 1e3 * med["ours"], "ms_builtin": 1e3 * med["builtin"],
                    "ratio": med["ours"] / med["builtin"],
                    "params_ours": counts["ours"], "params_builtin": counts["builtin"]}
    del ours, peer, models

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
pmed = timed_pair({"ours": p_ours, "builtin": p_peer}, px, py, 5 * cfg["steps"])
print(json.dumps({"backend": keras.backend.backend(), "whole": whole,
                  "layer_ms_ours": 1e3 * pmed["ours"], "layer_ms_builtin": 1e3 * pmed["builtin"],
                  "layer_ratio": pmed["ours"] / pmed["builtin"]}))
"""


def format_result(r):
    lines = []
    for label, w in r["whole"].items():
        lines.append(
            f"{r['backend']:>10}: LoRA on {label}: ours {w['ms_ours']:.1f} ms/step, built-in "
            f"enable_lora {w['ms_builtin']:.1f} ms/step, ratio ours/built-in = {w['ratio']:.2f} "
            f"(trainable params {w['params_ours']:,} vs {w['params_builtin']:,})")
        if w.get("flops_ours"):
            flops_ratio = w["flops_ours"] / w["flops_builtin"]
            lines.append(
                f"{'':>10}  XLA FLOPs per loss+gradient step: ours {w['flops_ours'] / 1e9:.2f} G, "
                f"built-in {w['flops_builtin'] / 1e9:.2f} G, ratio = {flops_ratio:.3f}")
            report_ratio("bench_lora_vs_builtin", r["backend"],
                         f"XLA FLOPs ours/built-in, whole model, LoRA on {label}", flops_ratio, "<= 1.0")
        report_ratio("bench_lora_vs_builtin", r["backend"],
                     f"step time ours/built-in, whole model, LoRA on {label}", w["ratio"], "<= 1.0")
    lines.append(
        f"{'':>10}  one adapted query projection alone: ours {r['layer_ms_ours']:.2f} ms/step, "
        f"built-in {r['layer_ms_builtin']:.2f} ms/step, ratio = {r['layer_ratio']:.2f}")
    report_ratio("bench_lora_vs_builtin", r["backend"],
                 "step time ours/built-in, one query projection", r["layer_ratio"], "<= 1.0")
    return "\n".join(lines)


def main():
    return run_per_backend(CHILD, __doc__.splitlines()[0], format_result)


if __name__ == "__main__":
    sys.exit(main())
