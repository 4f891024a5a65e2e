"""Every registered method against LoRA: training-step time and trainable
parameters on the same layers (for the README's "Choosing a method").

Same mid-size Gemma config as bench_lora_vs_builtin.py (hidden 512, 4 layers,
sequence 128, batch 4), every method at matched budgets (the transfer job's
`--budget same`: each method's rank or budget chosen so its adapter
parameters match LoRA's at `--rank`, within 5%), on two target sets:
query+value, and every projection (FlexLoRA's and LR-LoRA's default). `train_on_batch` of each model, interleaved in rounds
(each round times every method once, in turn), median per method; the ratio
is method / LoRA. Methods come from the registry, so a new method is
measured too.

Usage:
    python benchmarks/bench_methods.py                  # all backends
    python benchmarks/bench_methods.py --backends jax   # one backend
    python benchmarks/bench_methods.py --quick          # hidden 128, 2 layers, seq 32, 3 rounds

Prints one `RESULT {json}` line per method and target set for
`benchmarks/run_all.py` (informative: no target).
"""

import sys

from _runner import report_ratio, run_per_backend

QUICK = ("--hidden=128", "--layers=2", "--seq=32", "--batch=2", "--rounds=3")

CHILD = r"""
import json, statistics, sys, time
import numpy as np
import keras, keras_hub
import keras_adaptive_lora as kal
from keras_adaptive_lora.apps.transfer.budget import match_budgets
from keras_adaptive_lora.targets import ALL_ROLES, role_targets

cfg = json.loads(sys.argv[1])
names = kal.method_names()
TARGETS = {"query+value": list(role_targets("query", "value")["gemma"]),
           "all projections": list(role_targets(*ALL_ROLES)["gemma"])}

def backbone():
    keras.utils.set_random_seed(0)
    return keras_hub.models.GemmaBackbone(
        vocabulary_size=1000, num_layers=cfg["layers"], num_query_heads=8,
        num_key_value_heads=1, hidden_dim=cfg["hidden"], intermediate_dim=2 * cfg["hidden"],
        head_dim=cfg["hidden"] // 8)

def build(name, targets, match):
    model = backbone()
    options = dict({"rank": cfg["rank"], "seed": 0}, **match.options(name))
    spec = kal.get_method(name).from_options(strict=False, **options)
    report = kal.apply_adapters(model, spec, targets=targets)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    return model, report.adapter_params

rng = np.random.default_rng(0)
x = {"token_ids": rng.integers(0, 1000, (cfg["batch"], cfg["seq"])).astype("int32"),
     "padding_mask": np.ones((cfg["batch"], cfg["seq"]), "int32")}
y = rng.normal(size=(cfg["batch"], cfg["seq"], cfg["hidden"])).astype("float32")
out = {"backend": keras.backend.backend(), "sets": {}}
for label, targets in TARGETS.items():
    match = match_budgets(backbone(), names, rank=cfg["rank"], targets=targets)
    models = {name: build(name, targets, match) for name in names}
    for model, _ in models.values():
        for _ in range(3):
            model.train_on_batch(x, y)
    times = {name: [] for name in names}
    for _ in range(cfg["rounds"]):
        for name, (model, _) in models.items():
            start = time.perf_counter()
            for _ in range(cfg["steps"]):
                loss = model.train_on_batch(x, y)
            float(np.asarray(loss))
            times[name].append((time.perf_counter() - start) / cfg["steps"])
    med = {name: statistics.median(v) for name, v in times.items()}
    out["sets"][label] = {
        name: {"ms": 1e3 * med[name], "ratio": med[name] / med[names[0]],
               "params": int(models[name][1]), "size": match.options(name)}
        for name in names
    }
    del models
    keras.backend.clear_session()
print(json.dumps(out))
"""


def format_result(r):
    """Print the RESULT lines of one backend and return its summary lines."""
    lines = []
    for label, methods in r["sets"].items():
        for name, m in methods.items():
            report_ratio("bench_methods", r["backend"], f"step time {name}/first ({label})",
                         m["ratio"], "")
        lines.append(f"{r['backend']:>10} {label}: " + ", ".join(
            f"{name} {m['ms']:.1f} ms ({m['ratio']:.2f}x, {m['params']:,} params)"
            for name, m in methods.items()))
    return "\n".join(lines)


def main():
    if "--quick" in sys.argv[1:]:
        rest = [arg for arg in sys.argv[1:] if arg != "--quick"]
        sys.argv[1:] = [*QUICK, *rest]
    return run_per_backend(CHILD, __doc__.splitlines()[0], format_result)


if __name__ == "__main__":
    sys.exit(main())
