"""Shared driver of the benchmarks: one subprocess per backend, one JSON line back.

Each benchmark defines `CHILD` (code run as `python -c CHILD CONFIG_JSON` with
`KERAS_BACKEND` set, printing one JSON object as its last `{...}` line) and a
function formatting that object as text.
"""

import argparse
import json
import os
import subprocess
import sys

CONFIG_KEYS = ("hidden", "layers", "seq", "batch", "rank", "rounds", "steps")


def gemma_parser(description):
    """Arguments of the mid-size Gemma config shared by the step-time benchmarks."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=4)
    return parser


def run_per_backend(child, description, format_result):
    """Parse the Gemma arguments, run `child` once per backend, print results.

    Returns the exit status: 1 if any backend failed, else 0.
    """
    args = gemma_parser(description).parse_args()
    cfg = {k: getattr(args, k) for k in CONFIG_KEYS}
    print(f"config: {cfg}")
    status = 0
    for backend in args.backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        proc = subprocess.run(
            [sys.executable, "-c", child, json.dumps(cfg)], env=env, capture_output=True, text=True
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode or not lines:
            print(f"{backend}: FAILED\n{proc.stderr[-2000:]}")
            status = 1
            continue
        print(format_result(json.loads(lines[-1])))
    return status


def report_ratio(benchmark, backend, metric, ratio, target):
    """Print one machine-readable result line for `benchmarks/run_all.py`.

    Args:
        benchmark: script name, e.g. "bench_lora_vs_builtin".
        backend: the Keras backend measured (or "numpy" for backend-free numbers).
        metric: what the ratio compares, e.g. "step time ours/built-in (whole model)".
        ratio: the measured ratio (float).
        target: the issue's target as text, e.g. "<= 1.0", or "" when informative only.
    """
    print("RESULT " + json.dumps({
        "benchmark": benchmark, "backend": backend, "metric": metric,
        "ratio": float(ratio), "target": target,
    }), flush=True)


def worker_results(script, backends):
    """Run `python SCRIPT --worker` once per backend (the checkout's package
    first on the path); `{backend: the JSON after its "RESULT " line, or the
    last line of its error output as a string}`."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(script)))
    results = {}
    for backend in backends:
        env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, os.path.abspath(script), "--worker"], env=env,
                              capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            results[backend] = f"failed: {proc.stderr.strip().splitlines()[-1:]}"
        else:
            results[backend] = json.loads(lines[0][len("RESULT "):])
    return results
