"""Stable ranks of a Gemma-2B-shaped model: `stable_rank` (Lanczos) vs numpy SVD.

The projections of a Gemma-2B-shaped config (hidden 2048, intermediate 16384,
8 query heads and 1 key/value head of size 256, 18 layers: 126 kernels, 1.98
billion weights) are built as keras-hub's EinsumDense layers (same equations,
random Glorot-initialized kernels; random matrices are the hard case for an
iterative method: their top singular values are clustered). A layer's 7
kernels have 4 distinct matrix shapes.

Side by side: in each round, one kernel of each of the 4 shapes (a new draw per
round) is measured with `stable_rank` (matrix view, float32 `keras.ops`, the
certified stopping rule) and with numpy's full SVD (`np.linalg.svd(W,
compute_uv=False)`: all singular values, the cheapest full SVD numpy has),
back to back, the order alternating between rounds, with
`os.getloadavg()` printed per round. The whole-model time of each is the median
time per shape times the number of kernels of that shape (126 for 18 layers);
the ratio is theirs. The relative error and the Lanczos steps are reported
for every kernel measured. `--layers N` also times `stable_rank` on all
`7 N` kernels in a row (no SVD), a check on the per-shape extrapolation.

numpy's SVD runs on the BLAS threads numpy was given: on a loaded machine a
threaded OpenBLAS is several times slower than with `OPENBLAS_NUM_THREADS=1`
(e.g. 41 s vs 5.7 s for 2048 x 2048 at a load of 7 on 2 cores), which moves
the ratio as much as anything measured here. Run it both ways when it matters.

Run: KERAS_BACKEND=jax python benchmarks/bench_stable_rank.py [--rounds 3] [--layers 0]

`--quick`: one round, no whole-model pass.

Prints `RESULT {json}` lines (time ratio, max relative error) for
`benchmarks/run_all.py`.
"""

import argparse
import gc
import os
import time

import keras
import numpy as np

from _runner import report_ratio
from keras_adaptive_lora import kernel_matrix, spectral

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2048, 16384, 8, 1, 256

# name -> (equation, kernel shape, input shape) as in keras-hub's Gemma.
PROJECTIONS = {
    "query": ("btd,ndh->btnh", (HEADS, HIDDEN, HEAD_DIM), (None, None, HIDDEN)),
    "key": ("bsd,kdh->bskh", (KV_HEADS, HIDDEN, HEAD_DIM), (None, None, HIDDEN)),
    "value": ("bsd,kdh->bskh", (KV_HEADS, HIDDEN, HEAD_DIM), (None, None, HIDDEN)),
    "attention_output": ("btnh,nhd->btd", (HEADS, HEAD_DIM, HIDDEN), (None, None, HEADS, HEAD_DIM)),
    "ffw_gating": ("btd,df->btf", (HIDDEN, INTERMEDIATE), (None, None, HIDDEN)),
    "ffw_gating_2": ("btd,df->btf", (HIDDEN, INTERMEDIATE), (None, None, HIDDEN)),
    "ffw_linear": ("btf,fd->btd", (INTERMEDIATE, HIDDEN), (None, None, INTERMEDIATE)),
}
# The (d_in, d_out) matrix view of each.
MATRIX = {
    "query": (HIDDEN, HEADS * HEAD_DIM), "key": (HIDDEN, KV_HEADS * HEAD_DIM),
    "value": (HIDDEN, KV_HEADS * HEAD_DIM), "attention_output": (HEADS * HEAD_DIM, HIDDEN),
    "ffw_gating": (HIDDEN, INTERMEDIATE), "ffw_gating_2": (HIDDEN, INTERMEDIATE),
    "ffw_linear": (INTERMEDIATE, HIDDEN),
}
# One projection per distinct matrix shape (query and attention_output are
# both 2048 x 2048; query's matrix view is a transposed copy, the slower one).
REPRESENTATIVES = ("query", "key", "ffw_gating", "ffw_linear")


def build(name, seed):
    equation, kernel_shape, input_shape = PROJECTIONS[name]
    out = equation.split("->")[1]
    ker = equation.split(",")[1].split("->")[0]
    sizes = dict(zip(ker, kernel_shape))
    output_shape = tuple(sizes.get(c) for c in out[1:])
    layer = keras.layers.EinsumDense(
        equation,
        output_shape=output_shape,
        kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        name=name,
    )
    layer.build(input_shape)
    return layer


def svd_stable_rank(matrix):
    s = np.linalg.svd(matrix, compute_uv=False).astype("float64")
    return float(np.sum(s**2) / s[0] ** 2)


def time_stable_rank(layer):
    start = time.perf_counter()
    value, steps, certified = spectral._stable_rank(layer)  # what `stable_rank` runs
    return time.perf_counter() - start, value, steps, certified


def time_svd(layer):
    matrix = np.asarray(keras.ops.convert_to_numpy(kernel_matrix(layer)))
    start = time.perf_counter()
    value = svd_stable_rank(matrix)
    return time.perf_counter() - start, value


def load():
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=0,
                        help="also time stable_rank on all kernels of this many layers")
    parser.add_argument("--quick", action="store_true", help="one round, no whole-model pass")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.layers = 1, 0
    backend = keras.backend.backend()
    print(f"backend: {backend}, rounds: {args.rounds}, OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, {load()}", flush=True)

    times = {name: {"stable_rank": [], "svd": []} for name in REPRESENTATIVES}
    errors = []
    for index in range(args.rounds):
        for name in REPRESENTATIVES:
            layer = build(name, seed=1000 + 10 * index + len(name))
            if name == REPRESENTATIVES[0] and index == 0:
                time_stable_rank(build("key", seed=1))  # first-call costs (imports, dispatch)
            if index % 2 == 0:
                sr_time, value, steps, certified = time_stable_rank(layer)
                svd_time, expected = time_svd(layer)
            else:
                svd_time, expected = time_svd(layer)
                sr_time, value, steps, certified = time_stable_rank(layer)
            error = abs(value - expected) / expected
            errors.append(error)
            times[name]["stable_rank"].append(sr_time)
            times[name]["svd"].append(svd_time)
            print(f"  round {index} {name:12s} {str(MATRIX[name]):14s} srank {value:9.3f} "
                  f"svd {expected:9.3f} rel.err {error:.1e} steps {steps:3d}"
                  f"{'' if certified else ' (NOT certified)'}  stable_rank {sr_time:6.2f}s  "
                  f"svd {svd_time:7.2f}s  ratio {svd_time / sr_time:6.1f}  {load()}", flush=True)
            del layer
            gc.collect()

    counts = {}
    for shape in MATRIX.values():
        counts[shape] = counts.get(shape, 0) + 1
    print("\nshape          kernels/layer  median stable_rank s  median svd s  ratio")
    total_sr = total_svd = 0.0
    for name in REPRESENTATIVES:
        shape = MATRIX[name]
        assert tuple(kernel_matrix(build(name, seed=0)).shape) == shape
        sr, svd = np.median(times[name]["stable_rank"]), np.median(times[name]["svd"])
        total_sr += counts[shape] * sr
        total_svd += counts[shape] * svd
        print(f"{str(shape):14s} {counts[shape]:13d}  {sr:20.3f}  {svd:12.2f}  {svd / sr:6.1f}")
    kernels = 18 * len(PROJECTIONS)
    ratio = total_svd / total_sr
    print(f"\nper layer (7 kernels): stable_rank {total_sr:.2f} s, numpy SVD {total_svd:.1f} s")
    print(f"whole model ({kernels} kernels): stable_rank {18 * total_sr:.0f} s, numpy SVD "
          f"{18 * total_svd:.0f} s, ratio {ratio:.1f}x  ({load()})")
    print(f"max relative error vs SVD ({len(errors)} kernels): {max(errors):.2e}", flush=True)

    if args.layers:
        start = time.perf_counter()
        for index in range(args.layers):
            for name in PROJECTIONS:
                spectral.stable_rank(build(name, seed=index * 10 + len(name)))
                gc.collect()
        elapsed = time.perf_counter() - start
        print(f"stable_rank on all {args.layers * len(PROJECTIONS)} kernels of {args.layers} "
              f"layer(s) in a row: {elapsed:.1f} s ({elapsed / args.layers:.2f} s per layer; "
              f"the per-shape estimate: {total_sr:.2f} s)  ({load()})")

    report_ratio("bench_stable_rank", backend, f"time numpy SVD / stable_rank ({kernels} kernels)",
                 ratio, ">= 50")
    report_ratio("bench_stable_rank", backend, "max relative error vs SVD", max(errors), "<= 0.005")


if __name__ == "__main__":
    main()
