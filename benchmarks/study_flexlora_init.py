"""FlexLoRA's stable-rank start on the offline main job: a multi-seed study.

Compares, on the transfer job (`keras-adaptive-lora transfer`, offline: a
small ViT pre-trained in the run on a generated source task, then a few-shot
target task in another imaging domain):

- plain FlexLoRA (`FlexLoRA(rank=r)`: every layer starts at `r`),
- FlexLoRA with the stable-rank start (`FlexLoRA(rank=r,
  init_ranks="stable_rank")`: SR-LoRA's ranks scaled to the same total
  `r * layers`, then the same reallocation),
- SR-LoRA,

at the same budget (the job's `--budget same`: the same layers, adapter
parameters matched within 5%), over several seeds. The variant is not a
library method: this script registers it in its own process (a registered
method is offered everywhere, so the job runs it like any other) and calls
the job's own entry point. The job writes results.json (every seed's row:
test accuracy, initial and final ranks) and its plot (accuracy with error
bars, rank maps); this script prints the mean and standard error of the test
accuracy per method and writes `rank_heatmaps.png` (initial and final ranks
per layer, mean over seeds).

Run (CPU; the offline default setting is minutes per method and seed):
    KERAS_BACKEND=jax python benchmarks/study_flexlora_init.py --seeds 0,1,2,3,4 \\
        --output-dir study_output [--epochs 60] [--rank 8]
`--quick` runs the tiny offline setting (a check that it runs, not a result).
"""

import argparse
import dataclasses
import json
import math
import os

import numpy as np

from keras_adaptive_lora.core.method import register_method
from keras_adaptive_lora.methods.flexlora import FlexLoRA

VARIANT = "flexlora-sr-start"


@register_method
@dataclasses.dataclass(frozen=True, kw_only=True)
class FlexLoRAStableRankStart(FlexLoRA):
    """FlexLoRA with `init_ranks="stable_rank"` as its default (study only)."""

    name = VARIANT
    title = "FlexLoRA, stable-rank start"
    init_ranks: str = "stable_rank"


def summarize(results, methods):
    """`{method: (mean, standard error, n, per-seed accuracies)}` of test accuracy."""
    by_method = {m: [] for m in methods}
    for row in results["runs"] if "runs" in results else results["methods"]:
        if row["method"] in by_method:
            by_method[row["method"]].append((row.get("seed"), row["test_accuracy"]))
    out = {}
    for method, pairs in by_method.items():
        accs = np.array([a for _, a in sorted(pairs, key=lambda p: (p[0] is None, p[0]))])
        se = accs.std(ddof=1) / math.sqrt(len(accs)) if len(accs) > 1 else float("nan")
        out[method] = (float(accs.mean()), float(se), len(accs), accs.tolist())
    return out


def label(path):
    """`block 1 query` from `vit_encoder/transformer_block_1/mha/query`."""
    parts = path.split("/")
    block = next((p.rsplit("_", 1)[-1] for p in parts if "block" in p or "layer_" in p), "")
    return f"block {block} {parts[-1]}" if block else parts[-1]


def paired(results, methods, reference):
    """`{method: (mean, s.e.)}` of the per-seed difference of test accuracy
    from `reference` (same seed: same few-shot sample, head init, batches)."""
    rows = results["runs"] if "runs" in results else results["methods"]
    acc = {(r["method"], r.get("seed")): r["test_accuracy"] for r in rows}
    seeds = sorted({s for m, s in acc if m == reference})
    out = {}
    for method in methods:
        d = np.array([acc[(method, s)] - acc[(reference, s)] for s in seeds if (method, s) in acc])
        se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
        out[method] = (float(d.mean()), float(se))
    return out


def rank_maps(results, methods, path):
    """One heatmap per method: the active rank of each layer at the start and
    after training (rows), mean over seeds, each cell annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["runs"] if "runs" in results else results["methods"]
    fig, axes = plt.subplots(len(methods), 1, figsize=(11, 2.3 * len(methods)), squeeze=False)
    for ax, method in zip(axes[:, 0], methods):
        runs = [r for r in rows if r["method"] == method]
        layers = list(runs[0]["ranks"])
        grid = np.array([
            [[r.get("initial_ranks", r["ranks"])[p] for p in layers] for r in runs],
            [[r["ranks"][p] for p in layers] for r in runs],
        ], float)  # (start/end, seeds, layers)
        mean, spread = grid.mean(1), grid.std(1)
        im = ax.imshow(mean, aspect="auto", cmap="viridis")
        for (i, j), v in np.ndenumerate(mean):
            ax.text(j, i, f"{v:.1f}\n±{spread[i, j]:.1f}", ha="center", va="center", fontsize=7,
                    color="white" if v < mean.mean() else "black")
        ax.set_yticks([0, 1])
        ax.set_yticklabels(["start", "end"])
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels([label(p) for p in layers], fontsize=7)
        ax.set_title(f"{method}: active rank per layer, mean ± s.d. over {len(runs)} seeds "
                     f"(total {int(grid[0, 0].sum())})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--budget", default="same", choices=("same", "free"))
    parser.add_argument("--targets", default=None)
    parser.add_argument("--preset", default=None,
                        help="reuse a pre-trained offline preset folder (from an earlier run)")
    parser.add_argument("--output-dir", default="study_output")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--verbose", type=int, default=1)
    args = parser.parse_args()
    from keras_adaptive_lora.apps.transfer import run_transfer

    methods = ["flexlora", VARIANT, "sr-lora"]
    options = dict(methods=",".join(methods), seeds=args.seeds, rank=args.rank,
                   budget=args.budget, output_dir=args.output_dir, quick=args.quick,
                   export=False, verbose=args.verbose, epochs=args.epochs, preset=args.preset,
                   targets=args.targets)
    run_transfer(**{k: v for k, v in options.items() if v is not None})
    with open(os.path.join(args.output_dir, "results.json")) as f:
        results = json.load(f)
    print(f"\nload average {os.getloadavg()}")
    print(f"{'method':32s} {'test accuracy':>14s}   n   per seed")
    diffs = paired(results, methods, "flexlora")
    for method, (mean, se, n, accs) in summarize(results, methods).items():
        print(f"{method:32s} {mean:.4f} ± {se:.4f}  {n}   {' '.join(f'{a:.3f}' for a in accs)}"
              f"   minus flexlora (paired): {diffs[method][0]:+.4f} ± {diffs[method][1]:.4f}")
    try:
        print("rank maps:", rank_maps(results, methods, os.path.join(args.output_dir,
                                                                     "rank_heatmaps.png")))
    except ImportError:
        print("rank maps: matplotlib not installed")


if __name__ == "__main__":
    main()
