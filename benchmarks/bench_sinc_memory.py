"""SincLoRA vs plain LoRA on large kernels: training-step time (interleaved, one
thread) and peak memory (one process per variant).

Model: `x (batch, seq, 1024) -> Dense(4096) -> Dense(1024)`, both projections
adapted at the same rank (a transformer MLP's up and down kernels, 4M entries
each); `--pairs N` stacks N such pairs. One training step = forward, loss,
gradients of every adapter parameter (`keras.ops` model code through
`model.stateless_call`, the frozen weights closed over; the gradient call is
the backend's own: `jax.jit(jax.value_and_grad)`; on tensorflow a
`tf.function` with a `GradientTape`, XLA-compiled as `model.fit` compiles it
by default (`--tf-graph`: plain graph); torch autograd). Adapter variables
get nonzero values (`0.1 · normal`, so `f`, `A`, `B` all matter). Variants:

- `lora`: `LoRAAdapter`, factored forward `x W + s (x A) B`.
- `sinc`: `SincLoRAAdapter` (the package on `sys.path`: run the script with
  `PYTHONPATH=<other checkout>` to measure another version side by side).
- `naive` (memory mode only): the broadcast formulation `sum(a[:, None, None] *
  sinc(b[:, None, None] * (P[None] - g[:, None, None])), axis=0)` with plain
  autodiff: `(grid_size, d_in, d_out)` tensors.

`--mode time` (one process per backend, one thread: `torch.set_num_threads(1)`,
XLA's CPU runtime without its Eigen thread pool, tensorflow with one intra- and
one inter-op thread, and the process pinned to one CPU (`--cpu`, default the
last one it may use): without the pin jax's XLA runtime still runs independent
operations on other threads, so its CPU time counted more than one core's
work, e.g. LoRA 176 ms CPU for 90 ms wall; `--threads all`: every backend's
default threads on every CPU instead, as a user's run has them): every
variant is built and warmed up (compiled) first, then `--rounds` rounds each run one step of every variant in turn, so that the
load of other processes on the machine hits all variants alike. Reported: the
median CPU time (`time.process_time`) and wall time per step, and the ratio
of medians `sinc / lora`, with `os.getloadavg()` before and after.

`--mode memory` (one process per variant): `total MB` is the peak resident
memory during `--steps` steps (Linux `VmHWM`, reset after a warm-up step)
minus the resident memory after the imports; glibc serves allocations above
64 KiB with mmap and trims at once (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`), so the high-water mark tracks live tensors.
`trimmed MB`: the same over one more step after `malloc_trim(0)` has returned
the heap's free pages (on jax mostly what compiling left behind). On jax also
`XLA temp MB` (the compiled step's buffer assignment).

Targets (issue 15): time `sinc / lora <= 2.0` and memory `<= 1.3` on every
backend; each ratio is printed as a `RESULT {json}` line for `run_all.py`.

Usage: `python benchmarks/bench_sinc_memory.py [--backends torch tensorflow jax]
[--mode both|time|memory] [--rounds 7] [--steps 2] [--batch 4 --seq 128 --rank 8
--grid-size 50]`. CPU, default sizes: about a minute per backend and mode.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _runner import report_ratio

ONE_THREAD = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
}


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    raise RuntimeError(f"{key} not in /proc/self/status")


def build_step(variant, args):
    """A function running one training step of `variant`, and XLA's temp MB (jax)."""
    import keras
    import numpy as np
    from keras import ops

    from keras_adaptive_lora import LoRAAdapter, SincLoRAAdapter

    class NaiveSincAdapter(SincLoRAAdapter):
        """The broadcast formulation, with plain autodiff (for comparison only)."""

        def call(self, inputs, training=None, **kwargs):
            grid = ops.convert_to_tensor(np.asarray(self.grid, "float32"))[:, None, None]
            t = np.pi * ops.softplus(self.bandwidth_logits)[:, None, None] * (ops.matmul(self.lora_a, self.lora_b)[None] - grid)
            safe = ops.where(ops.equal(t, 0.0), 1.0, t)
            f = ops.sum(self.amplitudes[:, None, None] * ops.where(ops.equal(t, 0.0), 1.0, ops.sin(safe) / safe), axis=0)
            kernel = ops.add(ops.cast(self.wrapped.kernel, "float32"), self.view.from_matrix(self.scale * f))
            return ops.add(self.view.project(inputs, kernel), self.wrapped.bias)

    backend = keras.backend.backend()
    adapter_cls = {"lora": LoRAAdapter, "sinc": SincLoRAAdapter, "naive": NaiveSincAdapter}[variant]
    extra = {} if variant == "lora" else {"grid_size": args.grid_size}
    rng = np.random.default_rng(0)
    inputs = keras.Input((args.seq, args.hidden))
    hidden, adapters = inputs, []
    for i in range(args.pairs):
        for width, name in ((args.intermediate, "up"), (args.hidden, "down")):
            layer = keras.layers.Dense(width, name=f"{name}_{i}")
            layer.build((None, args.seq, hidden.shape[-1]))
            adapters.append(adapter_cls(layer, rank=args.rank, **extra))
            hidden = adapters[-1](hidden)
    model = keras.Model(inputs, hidden)
    for adapter in adapters:  # nonzero, representative values
        for v in adapter.trainable_weights:
            v.assign((0.1 * rng.normal(size=v.shape)).astype("float32"))
    x_np = rng.normal(size=(args.batch, args.seq, args.hidden)).astype("float32")
    trainable = [v.value for v in model.trainable_variables]
    frozen = [v.value for v in model.non_trainable_variables]

    def loss_fn(params, x):
        y, _ = model.stateless_call(list(params), frozen, x)
        return ops.mean(ops.square(y))

    if backend == "jax":
        import jax

        x = jax.numpy.asarray(x_np)
        compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(trainable, x).compile()
        return (lambda: jax.block_until_ready(compiled(trainable, x))), compiled.memory_analysis().temp_size_in_bytes / 2**20
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x_np)

        @tf.function(jit_compile=not args.tf_graph)
        def tf_step(x):
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                loss = loss_fn(trainable, x)
            return loss, tape.gradient(loss, trainable)

        return (lambda: [g.numpy() for g in tf_step(x)[1]]), None
    import torch

    x = torch.tensor(x_np)
    return (lambda: torch.autograd.grad(loss_fn(trainable, x), trainable)), None


def single_thread():
    import keras

    if keras.backend.backend() == "torch":
        import torch

        torch.set_num_threads(1)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def time_worker(args):
    """Interleaved rounds of one step per variant, in this process."""
    import numpy as np

    if args.threads == "one":
        single_thread()
    steps = {v: build_step(v, args)[0] for v in args.variants}
    for step in steps.values():
        step()  # warm-up and compilation
        step()
    load = [os.getloadavg()]
    cpu, wall = {v: [] for v in steps}, {v: [] for v in steps}
    for _ in range(args.rounds):
        for variant, step in steps.items():
            c0, w0 = time.process_time(), time.perf_counter()
            step()
            cpu[variant].append(time.process_time() - c0)
            wall[variant].append(time.perf_counter() - w0)
    load.append(os.getloadavg())
    out = {v: {"cpu_ms": 1000 * float(np.median(cpu[v])), "wall_ms": 1000 * float(np.median(wall[v]))} for v in steps}
    print(json.dumps({"times": out, "load": load}))


def memory_worker(args):
    import ctypes

    import keras

    from keras_adaptive_lora import LoRAAdapter, SincLoRAAdapter  # noqa: F401  (imports are not the step)

    keras.ops.convert_to_numpy(keras.ops.matmul(keras.ops.ones((2, 2)), keras.ops.ones((2, 2))))  # load the backend
    rss_start = _status("VmRSS")
    step, xla_temp = build_step(args.variant, args)
    step()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM
    for _ in range(args.steps):
        step()
    total = _status("VmHWM") - rss_start
    trimmed = None
    try:  # one more step after handing the heap's free pages back to the OS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        step()
        trimmed = _status("VmHWM") - rss_start
    except (OSError, AttributeError):
        pass
    print(json.dumps({"total_mb": total, "trimmed_mb": trimmed, "xla_temp_mb": xla_temp}))


def run_worker(backend, flags, env_extra):
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3", **env_extra)
    out = subprocess.run([sys.executable, __file__, *flags], env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode or not lines:
        print(f"  {backend} {flags[-1]} failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
        return None
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["torch", "tensorflow", "jax"])
    parser.add_argument("--mode", choices=("both", "time", "memory"), default="both")
    for flag, default in (("batch", 4), ("seq", 128), ("hidden", 1024), ("intermediate", 4096), ("pairs", 1), ("rank", 8), ("grid-size", 50), ("steps", 2), ("rounds", 7)):
        parser.add_argument(f"--{flag}", type=int, default=default)
    parser.add_argument("--variants", nargs="+", choices=("lora", "sinc", "naive"), default=["lora", "sinc"])
    parser.add_argument("--tf-graph", action="store_true", help="tensorflow without XLA (plain tf.function)")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the CPU time mode runs on")
    parser.add_argument("--threads", choices=("one", "all"), default="one", help="time mode: one thread on --cpu, or the backends' defaults")
    parser.add_argument("--worker", choices=("time", "memory"), help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "time" and args.threads == "one":
        os.sched_setaffinity(0, {args.cpu})  # before any backend starts its threads
    if args.worker:
        return time_worker(args) if args.worker == "time" else memory_worker(args)
    sizes = ("batch", "seq", "hidden", "intermediate", "pairs", "rank", "grid_size", "steps", "rounds")
    common = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in sizes + ("cpu", "threads")] + ["--tf-graph"] * args.tf_graph
    threads = f"one thread on CPU {args.cpu}" if args.threads == "one" else f"default threads on {os.cpu_count()} CPUs"
    print(
        f"{args.pairs} x (kernels {args.hidden}x{args.intermediate}, {args.intermediate}x{args.hidden}), batch "
        f"{args.batch} x seq {args.seq}, rank {args.rank}, grid {args.grid_size}, {threads}; load {os.getloadavg()}"
    )
    for backend in args.backends:
        if args.mode in ("both", "time"):
            timed_variants = [v for v in args.variants if v != "naive"]
            r = run_worker(backend, common + ["--variants", *timed_variants, "--worker=time"], ONE_THREAD if args.threads == "one" else {})
            if r:
                t = r["times"]
                cells = "  ".join(f"{v} {t[v]['cpu_ms']:.0f} ms cpu / {t[v]['wall_ms']:.0f} wall" for v in t)
                print(f"{backend:<11} time ({args.rounds} interleaved rounds, medians): {cells}; load {r['load'][0]} -> {r['load'][1]}")
                if "lora" in t and "sinc" in t:
                    ratio = t["sinc"]["cpu_ms"] / t["lora"]["cpu_ms"]
                    print(f"{backend:<11} sinc/lora step time {ratio:.2f} (wall {t['sinc']['wall_ms'] / t['lora']['wall_ms']:.2f})")
                    if args.threads == "one":
                        report_ratio("bench_sinc_memory", backend, "step time sinc/lora (CPU, 1 thread)", ratio, "<= 2.0")
                    else:
                        wall = t["sinc"]["wall_ms"] / t["lora"]["wall_ms"]
                        report_ratio("bench_sinc_memory", backend, "step wall time sinc/lora (CPU, all threads)", wall, "")
        if args.mode in ("both", "memory"):
            env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            mem = {v: run_worker(backend, common + [f"--variant={v}", "--worker=memory"], env) for v in args.variants}
            print(f"{backend:<11} memory MB (total / trimmed / XLA temp): " + "  ".join(
                f"{v} " + " / ".join("-" if m.get(k) is None else f"{m[k]:.0f}" for k in ("total_mb", "trimmed_mb", "xla_temp_mb"))
                for v, m in mem.items() if m))
            if mem.get("lora") and mem.get("sinc"):
                labels = (("total_mb", "peak memory (total)"), ("trimmed_mb", "peak memory (total, heap trimmed)"), ("xla_temp_mb", "XLA temp memory"))
                for key, label in labels:
                    if mem["sinc"][key] is not None:
                        ratio = mem["sinc"][key] / mem["lora"][key]
                        print(f"{backend:<11} sinc/lora {label} {ratio:.2f}")
                        report_ratio("bench_sinc_memory", backend, f"{label} sinc/lora", ratio, "<= 1.3")


if __name__ == "__main__":
    main()
