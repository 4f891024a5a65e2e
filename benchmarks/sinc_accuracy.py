"""LR-LoRA's tabulated transfer against the exact sinc sum in float64 numpy.

For each backend (one subprocess each) and each bandwidth regime, the transfer
`f(x) = Σ_k a_k sinc(b_k (x − g_k))` (K = 50 on [-3, 3], amplitudes normal,
bandwidths uniform in the regime's interval) is evaluated through
`sinc_transfer` on `x = A B`, a 256x512 product of Gaussian rank-8 factors
scaled so that entries reach beyond the grid (|x| up to about 6), with its
first 50 entries set exactly on the grid points. Printed: the largest error of
`f(x)` and of the gradients of `sum(w ⊙ f(x))` (random `w`) with respect to
`x`, `a` and `b`, each relative to the largest magnitude of the exact value
(issue 15's targets: value 1e-6, gradients 1e-5). The gradients are the
backend's own autodiff, compiled as training compiles them (`jax.jit`,
`tf.function`, eager torch).

Usage: `python benchmarks/sinc_accuracy.py [--backends torch tensorflow jax]`
(about 20 s per backend on CPU).
"""

import argparse
import json
import sys

import numpy as np
from _runner import worker_results

REGIMES = {"narrow b in [0.2, 0.2]": (0.2, 0.2), "unit b in [0.5, 1.5]": (0.5, 1.5),
           "mixed b in [0.2, 8]": (0.2, 8.0), "wide b in [4, 8]": (4.0, 8.0)}


def oracle(x, a, b, grid, w):
    """Exact `f(x)` and the gradients of `sum(w f(x))` by x, a, b, float64."""
    x, a, b, g = (np.asarray(v, np.float64) for v in (x, a, b, grid))
    z = b[:, None, None] * (x[None] - g[:, None, None])
    small = np.abs(z) < 1e-6
    safe = np.where(small, 1.0, z)
    value = np.sinc(z)
    slope = np.where(small, -(np.pi**2) * z / 3, (np.cos(np.pi * safe) - np.sinc(safe)) / safe)  # d sinc(z)/dz
    f = np.tensordot(a, value, 1)
    grad_x = w * np.tensordot(a * b, slope, 1)
    grad_a = np.tensordot(value, w, 2)
    grad_b = a * np.tensordot(slope * (x[None] - g[:, None, None]), w, 2)
    return f, grad_x, grad_a, grad_b


def worker():
    import keras
    from keras import ops

    from keras_adaptive_lora.methods.sinc import sinc_grid, sinc_transfer

    backend = keras.backend.backend()
    grid = sinc_grid(50, 3.0)

    def value_and_grads(x, a, b, w):
        fn = lambda x, a, b: ops.sum(ops.multiply(sinc_transfer(x, a, b, grid), w))  # noqa: E731
        if backend == "jax":
            import jax

            return jax.jit(jax.grad(fn, argnums=(0, 1, 2)))(x, a, b)
        if backend == "tensorflow":
            import tensorflow as tf

            @tf.function
            def run(x, a, b):
                with tf.GradientTape() as tape:
                    tape.watch([x, a, b])
                    y = fn(x, a, b)
                return tape.gradient(y, [x, a, b])

            return run(*(tf.constant(v) for v in (x, a, b)))
        import torch

        tensors = [torch.tensor(v, requires_grad=True) for v in (x, a, b)]
        fn(*tensors).backward()
        return [t.grad for t in tensors]

    rows = {}
    for regime, (low, high) in REGIMES.items():
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(256, 8)) @ rng.normal(size=(8, 512)) * 0.6).astype("float32")
        x.flat[:50] = np.asarray(grid, "float32")
        a = rng.normal(size=50).astype("float32")
        b = rng.uniform(low, high, size=50).astype("float32")
        w = rng.normal(size=x.shape).astype("float32")
        want = oracle(x, a, b, grid, w)
        got = [ops.convert_to_numpy(sinc_transfer(x, a, b, grid))]
        got += [ops.convert_to_numpy(g) for g in value_and_grads(x, a, b, w)]
        rows[regime] = [float(np.abs(np.asarray(g, np.float64) - e).max() / np.abs(e).max()) for g, e in zip(got, want)]
        rows[regime].append(float(np.abs(x).max()))
    print("RESULT " + json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    print("| backend | bandwidths | max abs x | f(x) | d/dx | d/da | d/db |")
    print("|---|---|---|---|---|---|---|")
    for backend, rows in worker_results(__file__, args.backends).items():
        if isinstance(rows, str):
            print(f"| {backend} | {rows} |")
            continue
        for regime, (fx, dx, da, db, xmax) in rows.items():
            print(f"| {backend} | {regime} | {xmax:.1f} | {fx:.1e} | {dx:.1e} | {da:.1e} | {db:.1e} |")
    print("(errors: max |got − exact| / max |exact|, float64 numpy oracle; targets 1e-6 for f, 1e-5 for gradients)")


if __name__ == "__main__":
    sys.exit(main())
