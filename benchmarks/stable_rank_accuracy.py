"""`stable_rank` against numpy's full SVD on the hard spectra of issue 18.

Per backend (one subprocess each): Gaussian matrices of many shapes (tall and
wide), 2-64 tied or nearly tied top singular values above a bulk, rank one
plus noise, and scaled copies. Printed per case: shape, kind, the relative
error `|stable_rank − ||W||_F² / σ_1²| / (||W||_F² / σ_1²)` against
`numpy.linalg.svd` in float64, the Lanczos steps taken, and whether the
stopping rule certified the tolerance. The specification allows 0.5%.

Usage: `python benchmarks/stable_rank_accuracy.py [--backends torch tensorflow jax]`
(under a minute per backend on CPU).
"""

import argparse
import json
import sys

import numpy as np
from _runner import worker_results


def with_spectrum(rows, cols, sigmas, seed):
    rng = np.random.default_rng(seed)
    u = np.linalg.qr(rng.normal(size=(rows, len(sigmas))))[0]
    v = np.linalg.qr(rng.normal(size=(cols, len(sigmas))))[0]
    return (u * sigmas) @ v.T


def cases():
    for shape, seed in [((8, 8), 0), ((8, 33), 1), ((33, 8), 2), ((64, 48), 0), ((48, 64), 0), ((64, 256), 4),
                        ((256, 64), 2), ((200, 200), 0), ((600, 150), 3), ((512, 2048), 0), ((2048, 512), 0)]:
        yield shape, "gaussian", np.random.default_rng(seed).normal(size=shape)
    for count in (2, 8, 64):
        for width in (0.0, 1e-4, 3e-3):
            rng = np.random.default_rng(count)
            top = 1.0 - np.sort(rng.uniform(0.0, width, size=count)) if width else np.ones(count)
            bulk = np.sort(rng.uniform(0.2, 0.97, size=200 - count))[::-1]
            kind = f"{count} top values {'tied' if not width else f'within {width:g}'}"
            yield (300, 200), kind, with_spectrum(300, 200, np.concatenate([top, bulk]), count)
    for snr in (0.5, 1.0, 3.0, 10.0):
        for shape in ((160, 480), (480, 160)):
            rng = np.random.default_rng(7)
            spike = np.outer(rng.normal(size=shape[0]), rng.normal(size=shape[1]))
            yield shape, f"rank one + noise, snr {snr:g}", snr * spike / np.sqrt(min(shape)) + rng.normal(size=shape)
    base = np.random.default_rng(0).normal(size=(300, 150))
    for scale in (1e-30, 1e-8, 1e8, 1e30):
        yield (300, 150), f"gaussian x {scale:g}", base * scale


def worker():
    from keras_adaptive_lora import spectral

    rows = []
    for shape, kind, matrix in cases():
        matrix = matrix.astype("float32")
        value, steps, certified = spectral._stable_rank(matrix)
        s = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
        exact = float(np.sum(s**2) / s[0] ** 2)
        rows.append([list(shape), kind, abs(value - exact) / exact, steps, bool(certified)])
    print("RESULT " + json.dumps(rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker()
    results = {}
    for backend, rows in worker_results(__file__, args.backends).items():
        if isinstance(rows, str):
            print(f"{backend}: {rows}")
        else:
            results[backend] = rows
    if not results:
        return 1
    names = list(results)
    print("| shape | spectrum | " + " | ".join(f"{b} error (steps)" for b in names) + " |")
    print("|---|---|" + "---|" * len(names))
    worst = 0.0
    for i, (shape, kind, *_) in enumerate(next(iter(results.values()))):
        cells = []
        for b in names:
            _, _, error, steps, certified = results[b][i]
            worst = max(worst, error)
            cells.append(f"{error:.1e} ({steps}{'' if certified else ', not certified'})")
        print(f"| {shape[0]}x{shape[1]} | {kind} | " + " | ".join(cells) + " |")
    print(f"largest relative error: {worst:.1e} (allowed 5e-3)")
    return 0 if worst <= 5e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
