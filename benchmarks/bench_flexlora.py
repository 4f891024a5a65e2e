"""FlexLoRA cost: training-step time versus plain LoRA, and the cost of one
reallocation as a fraction of one step.

Same mid-size Gemma config as bench_lora_vs_builtin.py (hidden 512, 4 layers,
sequence 128), same rank, same targets (FlexLoRA's default: every projection).
1. Step time: `train_on_batch` of the FlexLoRA model (no scheduler) and of the
   LoRA model, interleaved in rounds; median of each (target ratio <= 1.10).
2. Reallocation: `fit` of the FlexLoRA model for `steps` steps with a
   `FlexLoRAScheduler(interval=1, warmup_steps=0)` (a reallocation after
   every step) and without, interleaved; the extra time per step divided by
   the step time (target <= 0.5).

Usage:
    python benchmarks/bench_flexlora.py                  # all backends
    python benchmarks/bench_flexlora.py --backends jax   # one backend
    python benchmarks/bench_flexlora.py --quick          # smaller config, ~1 min per backend

`--quick` sets hidden 128, 2 layers, sequence 32, batch 2, 3 rounds (explicit
size flags after it still win). At that size the fixed per-layer costs weigh
more, so its ratios are a smoke check, not the issue's measurement. Prints one
`RESULT {json}` line per ratio for `benchmarks/run_all.py`.
"""

import sys

from _runner import report_ratio, run_per_backend

# `--quick`: the sizes it stands for (prepended, so explicit flags override them).
QUICK = ("--hidden=128", "--layers=2", "--seq=32", "--batch=2", "--rounds=3")

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import keras, keras_hub
import keras_adaptive_lora as kal
from keras_adaptive_lora.methods.flexlora import FlexLoRAScheduler

cfg = json.loads(sys.argv[1])

def build(method):
    keras.utils.set_random_seed(0)
    model = keras_hub.models.GemmaBackbone(
        vocabulary_size=1000, num_layers=cfg["layers"], num_query_heads=8,
        num_key_value_heads=1, hidden_dim=cfg["hidden"], intermediate_dim=2 * cfg["hidden"],
        head_dim=cfg["hidden"] // 8)
    kal.apply_adapters(model, method, targets=list(kal.FlexLoRA.default_targets["gemma"]))
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model

rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(0, 1000, (cfg["batch"], cfg["seq"])).astype("int32"),
     "padding_mask": np.ones((cfg["batch"], cfg["seq"]), "int32")}
y = rng.normal(size=(cfg["batch"], cfg["seq"], cfg["hidden"])).astype("float32")
models = {"flexlora": build(kal.FlexLoRA(rank=cfg["rank"], seed=0)),
          "lora": build(kal.LoRA(rank=cfg["rank"]))}
for m in models.values():
    for _ in range(3):
        m.train_on_batch(x, y)
times = {k: [] for k in models}
for _ in range(cfg["rounds"]):
    for name, m in models.items():
        start = time.perf_counter()
        for _ in range(cfg["steps"]):
            loss = m.train_on_batch(x, y)
        float(np.asarray(loss))
        times[name].append((time.perf_counter() - start) / cfg["steps"])
med = {k: statistics.median(v) for k, v in times.items()}

# Reallocation cost: fit with a reallocation after every step vs plain fit.
flex = models["flexlora"]
n = cfg["steps"]
xs = {k: np.repeat(v, n, axis=0) for k, v in x.items()}
ys = np.repeat(y, n, axis=0)
fit_kw = dict(batch_size=cfg["batch"], epochs=1, shuffle=False, verbose=0)
flex.fit(xs, ys, **fit_kw)  # build the fit function
fit_times = {"plain": [], "scheduled": []}
moves = 0
for _ in range(cfg["rounds"]):
    for kind in fit_times:
        callbacks = []
        if kind == "scheduled":
            it = int(np.asarray(flex.optimizer.iterations))
            sched = FlexLoRAScheduler(it + 10 * n, b0=4, warmup_steps=it, final_steps=n,
                                      interval=1, verbose=0)
            callbacks = [sched]
        start = time.perf_counter()
        hist = flex.fit(xs, ys, callbacks=callbacks, **fit_kw)
        fit_times[kind].append((time.perf_counter() - start) / n)
        if kind == "scheduled":
            moves += sum(hist.history["flexlora/moves"])
fmed = {k: statistics.median(v) for k, v in fit_times.items()}

# Direct: one reallocation (budget b0, host side) next to one train step.
it = int(np.asarray(flex.optimizer.iterations))
sched = FlexLoRAScheduler(it + 1000, b0=4, warmup_steps=it, final_steps=10, interval=1, verbose=0)
sched.set_model(flex)
sched.on_train_begin()
sched.on_epoch_begin(0)
direct = {"step": [], "realloc": []}
for r in range(cfg["rounds"]):
    start = time.perf_counter()
    float(np.asarray(flex.train_on_batch(x, y)))
    direct["step"].append(time.perf_counter() - start)
    start = time.perf_counter()
    sched._sync()
    sched._reallocate(it + 1 + r, 4)
    direct["realloc"].append(time.perf_counter() - start)
dmed = {k: statistics.median(v) for k, v in direct.items()}
print(json.dumps({
    "backend": keras.backend.backend(),
    "ms_flexlora": 1e3 * med["flexlora"], "ms_lora": 1e3 * med["lora"],
    "ratio": med["flexlora"] / med["lora"],
    "ms_fit_plain": 1e3 * fmed["plain"], "ms_fit_scheduled": 1e3 * fmed["scheduled"],
    "realloc_fraction": (fmed["scheduled"] - fmed["plain"]) / fmed["plain"],
    "direct_fraction": dmed["realloc"] / dmed["step"], "ms_realloc": 1e3 * dmed["realloc"],
    "moves": moves, "adapters": len(kal.find_adapters(flex)),
}))
"""


def format_result(r):
    """Print the RESULT lines of one backend and return its summary line."""
    report_ratio("bench_flexlora", r["backend"], "step time FlexLoRA/LoRA", r["ratio"], "<= 1.10")
    report_ratio("bench_flexlora", r["backend"], "reallocation cost / step (fit, interval=1)",
                 r["realloc_fraction"], "<= 0.5")
    report_ratio("bench_flexlora", r["backend"], "reallocation cost / step (timed alone)",
                 r["direct_fraction"], "")
    return (
        f"{r['backend']:>10}: FlexLoRA {r['ms_flexlora']:.1f} ms/step, LoRA "
        f"{r['ms_lora']:.1f} ms/step, ratio = {r['ratio']:.2f} (target <= 1.10); "
        f"fit {r['ms_fit_plain']:.1f} -> {r['ms_fit_scheduled']:.1f} ms/step with a "
        f"reallocation every step, one reallocation = {r['realloc_fraction']:.2f} step "
        f"(target <= 0.5; {r['moves']} moves over {r['adapters']} adapters); timed "
        f"alone: {r['ms_realloc']:.1f} ms = {r['direct_fraction']:.3f} step"
    )


def main():
    if "--quick" in sys.argv[1:]:
        rest = [arg for arg in sys.argv[1:] if arg != "--quick"]
        sys.argv[1:] = [*QUICK, *rest]
    return run_per_backend(CHILD, __doc__.splitlines()[0], format_result)


if __name__ == "__main__":
    sys.exit(main())
