"""Stable ranks of a Gemma-2B-shaped model: Lanczos (`stable_rank`) vs numpy SVD.

All attention and MLP projections of a Gemma-2B-shaped config (hidden 2048,
intermediate 16384, 8 query heads and 1 key/value head of size 256, 18 layers:
126 kernels, 1.98 billion weights) are built one at a time as keras-hub's
EinsumDense layers (same equations, random Keras-initialized kernels; random
matrices are the hard case for an iterative method: their top singular values
are clustered) and their stable ranks computed with
`keras_adaptive_lora.stable_rank` (matrix view, float32, keras.ops).

The oracle is numpy's full SVD (`np.linalg.svd(W, compute_uv=False)`, all
singular values, the cheapest way numpy has to get them). An SVD of every
kernel would take tens of minutes here, so it is timed on the 7 kernels of the
first layer (each of the 4 distinct matrix shapes at least once) and scaled by
the number of kernels of each shape; the relative error is measured on those 7.

Run: KERAS_BACKEND=torch python benchmarks/bench_stable_rank.py [--layers 18]

`--quick` measures one layer (`--layers 1`, 7 kernels) and times the SVD on
one kernel of each of the 4 distinct matrix shapes only (the relative error is
then measured on those 4). The estimate is the same quantity, but
`stable_rank`'s one-off per-shape costs (tracing, jit compilation) are spread
over 7 kernels instead of 126, so the quick ratio understates the full one.

Prints `RESULT {json}` lines (time ratio, max relative error) for
`benchmarks/run_all.py`.
"""

import argparse
import gc
import time

import keras
import numpy as np

from _runner import report_ratio
from keras_adaptive_lora import kernel_matrix, stable_rank

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--quick", action="store_true",
                        help="one layer (7 kernels) instead of --layers")
    args = parser.parse_args()
    if args.quick:
        args.layers = 1
    print(f"backend: {keras.backend.backend()}, layers: {args.layers}, kernels: "
          f"{args.layers * len(PROJECTIONS)}")

    lanczos_time, count_by_shape = 0.0, {}
    svd_time_by_shape, errors = {}, []
    for index in range(args.layers):
        for name in PROJECTIONS:
            layer = build(name, seed=index * 10 + len(name))
            start = time.perf_counter()
            srank = stable_rank(layer)
            elapsed = time.perf_counter() - start
            lanczos_time += elapsed
            matrix_shape = (kernel_matrix(layer).shape[0], kernel_matrix(layer).shape[1])
            count_by_shape[matrix_shape] = count_by_shape.get(matrix_shape, 0) + 1
            if index == 0 and not (args.quick and matrix_shape in svd_time_by_shape):
                matrix = np.asarray(keras.ops.convert_to_numpy(kernel_matrix(layer)))
                start = time.perf_counter()
                expected = svd_stable_rank(matrix)
                svd_elapsed = time.perf_counter() - start
                svd_time_by_shape.setdefault(matrix_shape, []).append(svd_elapsed)
                error = abs(srank - expected) / expected
                errors.append(error)
                print(f"  {name:17s} {str(matrix_shape):14s} srank {srank:9.3f}  svd "
                      f"{expected:9.3f}  rel.err {error:.2e}  lanczos {elapsed:6.3f}s  "
                      f"svd {svd_elapsed:6.2f}s", flush=True)
                del matrix
            del layer
            gc.collect()
        print(f"layer {index}: cumulative stable_rank time {lanczos_time:.1f}s", flush=True)

    svd_total = sum(
        np.mean(svd_time_by_shape[shape]) * count for shape, count in count_by_shape.items()
    )
    print("\nmatrix shape    count  svd s/kernel (measured)")
    for shape, count in count_by_shape.items():
        print(f"{str(shape):14s} {count:6d}  {np.mean(svd_time_by_shape[shape]):8.2f}")
    print(f"\nstable_rank (Lanczos, float32, keras.ops) on all kernels: {lanczos_time:.1f} s")
    print(f"numpy full SVD, estimated for all kernels:            {svd_total:.1f} s")
    print(f"time ratio (SVD / stable_rank): {svd_total / lanczos_time:.1f}x")
    print(f"max relative error vs SVD ({len(errors)} kernels): {max(errors):.2e}")
    backend = keras.backend.backend()
    kernels = args.layers * len(PROJECTIONS)
    report_ratio("bench_stable_rank", backend, f"time numpy SVD / stable_rank ({kernels} kernels)",
                 svd_total / lanczos_time, ">= 50")
    report_ratio("bench_stable_rank", backend, "max relative error vs SVD", max(errors),
                 "<= 0.005")


if __name__ == "__main__":
    main()
