"""SincLoRA's initialization study: which `init` trains best, over seeds.

Candidates (`SincLoRA(init=...)`, all with amplitudes 0 so `ΔW = 0` at step 0):
`paper` (`B = 0`, grid `linspace(-c, c, K)`: degenerate, `A`, `B` get no
gradient in exact arithmetic), `shifted` (`B = 0`, the grid moved by half a
spacing), `random` (symmetric grid, `B` normal with `std(A B)` one spacing).

Part `regression` (in this process, the backend in KERAS_BACKEND): a frozen
`Dense(32 -> 32)` with `W0`, data `Y = X (W0 + ΔW*)` with `ΔW*` of rank 16
(singular values `0.5 · 0.85^i`), so the best update has rank > r = 4;
SincLoRA(rank 4) trained full-batch with Adam (`--lr`, `--steps`) on 256
examples, evaluated on 256 more. Reported per init: final train and test MSE
and `srank(ΔW)`, mean ± standard error over `--seeds` (seed: data, `ΔW*`,
`A`, `B`); LoRA(rank 4) and the best rank-4 update for reference.

Part `transfer`: the offline main job, `keras-adaptive-lora transfer --methods
sinc --seed S --preset P` (a ViT pre-trained once by the job, `--preset`),
once per init (all seeds in one run) with `SincLoRA`'s default `init` patched
in the child process; reported: test accuracy and the mean `srank(ΔW)` over the adapted
layers, mean ± standard error. `--epochs` shortens the job (default: the
job's 60).

Usage: `python benchmarks/study_sinc_init.py --part regression --seeds 0 1 2 3 4`;
`python benchmarks/study_sinc_init.py --part transfer --preset DIR/pretrained_vit
--seeds 0 1 2 3 4 [--epochs 30]`. The load average is printed with the results.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

INITS = ("paper", "shifted", "random")


def mean_se(values):
    values = np.asarray(values, np.float64)
    se = values.std(ddof=1) / np.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{values.mean():.4g} ± {se:.2g}"


def stable_rank(matrix):
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return float(np.sum(s**2) / s[0] ** 2) if s[0] > 0 else 0.0


def regression_run(init, seed, args):
    import keras

    import keras_adaptive_lora as kal

    keras.utils.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    d, rank, n = 32, 4, 256
    w0 = rng.normal(size=(d, d)) / np.sqrt(d)
    u, _ = np.linalg.qr(rng.normal(size=(d, d)))
    v, _ = np.linalg.qr(rng.normal(size=(d, d)))
    sigma = np.where(np.arange(d) < 16, 0.5 * 0.85 ** np.arange(d), 0.0)
    target = (u * sigma) @ v.T
    x = rng.normal(size=(2 * n, d))
    y = x @ (w0 + target)
    layer = keras.layers.Dense(d, use_bias=False)
    layer.build((None, d))
    layer.kernel.assign(w0.astype("float32"))
    spec = kal.LoRA(rank=rank) if init == "lora" else kal.SincLoRA(rank=rank, init=init, seed=seed)
    adapter = spec.wrap(layer)
    model = keras.Sequential([keras.Input((d,)), adapter])
    model.compile(optimizer=keras.optimizers.Adam(args.lr), loss="mse")
    xs, ys = x.astype("float32"), y.astype("float32")
    for _ in range(args.steps):
        model.train_on_batch(xs[:n], ys[:n])
    train, test = (float(model.evaluate(xs[s], ys[s], verbose=0)) for s in (slice(0, n), slice(n, None)))
    return {"train_mse": train, "test_mse": test, "srank": stable_rank(keras.ops.convert_to_numpy(adapter.delta_kernel()))}


def regression(args):
    import keras

    rows = {}
    for init in INITS + ("lora",):
        rows[init] = [regression_run(init, seed, args) for seed in args.seeds]
        print(f"  done {init}: {rows[init]}", file=sys.stderr, flush=True)
    print(f"regression (rank > r): Dense 32x32, r = 4, Adam lr {args.lr}, {args.steps} full-batch steps, "
          f"{keras.backend.backend()}, seeds {args.seeds}; load {os.getloadavg()}")
    print(f"{'init':<9}{'train MSE':>22}{'test MSE':>22}{'srank(ΔW)':>18}")
    for init, runs in rows.items():
        cells = [mean_se([r[k] for r in runs]) for k in ("train_mse", "test_mse", "srank")]
        print(f"{init:<9}{cells[0]:>22}{cells[1]:>22}{cells[2]:>18}")
    print("(srank of the target ΔW*: %.2f; `lora`: LoRA rank 4 for reference)" % stable_rank(np.diag(np.where(np.arange(32) < 16, 0.5 * 0.85 ** np.arange(32), 0.0))))
    return rows


CHILD = """
import sys
from keras_adaptive_lora.methods.sinc import SincLoRA
SincLoRA.__init__.__kwdefaults__["init"] = sys.argv[1]
from keras_adaptive_lora.cli import main
sys.exit(main(sys.argv[2:]))
"""


def transfer(args):
    rows = {}
    seeds = ",".join(str(s) for s in args.seeds)
    for init in INITS:
        out = tempfile.mkdtemp(prefix=f"sinc_init_{init}_")
        cmd = [sys.executable, "-c", CHILD, init, "transfer", "--methods", "sinc", "--seeds", seeds,
               "--preset", args.preset, "--output-dir", out, "--no-export", "--no-plot", "--verbose", "0"]
        if args.epochs:
            cmd += ["--epochs", str(args.epochs)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        path = os.path.join(out, "results.json")
        if proc.returncode or not os.path.exists(path):
            print(f"  {init} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        with open(path) as f:
            runs = [r for r in json.load(f)["runs"] if r["method"] == "sinc"]
        rows[init] = []
        for run in runs:
            ranks = list((run.get("update_stable_ranks") or {}).values())
            rows[init].append({"seed": run.get("seed"), "test_accuracy": run["test_accuracy"],
                               "val_accuracy": run["val_accuracy"], "ms_per_step": run["ms_per_step"],
                               "srank": float(np.mean(ranks)) if ranks else float("nan")})
        print(f"  done {init}: {rows[init]}", file=sys.stderr, flush=True)
    print(f"offline main job, sinc only, preset {args.preset}, epochs {args.epochs or 'default'}, seeds {args.seeds}; load {os.getloadavg()}")
    print(f"{'init':<9}{'test acc':>20}{'val acc':>20}{'mean srank(ΔW)':>20}")
    for init, runs in rows.items():
        if runs:
            cells = [mean_se([r[k] for r in runs]) for k in ("test_accuracy", "val_accuracy", "srank")]
            print(f"{init:<9}{cells[0]:>20}{cells[1]:>20}{cells[2]:>20}")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("regression", "transfer"), required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--preset", help="transfer: the pre-trained ViT preset folder")
    parser.add_argument("--epochs", type=int, help="transfer: epochs per run (default: the job's)")
    parser.add_argument("--json", help="also write the per-run numbers here")
    args = parser.parse_args()
    rows = regression(args) if args.part == "regression" else transfer(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
