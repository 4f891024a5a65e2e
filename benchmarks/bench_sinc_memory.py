"""Peak memory and step time of SincLoRA vs plain LoRA vs a naive broadcast
implementation of the sinc transfer, on large kernels.

Model: `x (batch, seq, 1024) -> Dense(4096) -> Dense(1024)`, both projections
adapted at the same rank (a transformer MLP's up and down kernels, 4M entries
each); `--pairs N` stacks N such pairs (2N adapted layers). One training step = forward, loss, gradients of every adapter
parameter (`keras.ops` model code through `model.stateless_call`, the frozen
weights closed over; the gradient call is the backend's own:
`jax.jit(jax.value_and_grad)`, a `tf.function` with a `GradientTape`, torch
autograd). Variants:

- `lora`: `LoRAAdapter`, factored forward `x W + s (x A) B`.
- `sinc`: `SincLoRAAdapter`, the library's memory-safe merged-weight forward.
- `naive`: the same math written the obvious way, `f(P) = sum(a[:, None, None] *
  sinc(b[:, None, None] * (P[None] - g[:, None, None])), axis=0)`, differentiated
  by plain autodiff: it forms `(grid_size, d_in, d_out)` tensors.

Each (backend, variant) runs in a fresh subprocess: build, one warm-up step
(which also compiles on jax/tensorflow), then `--steps` timed steps. What
is measured (MB = MiB):

- `step MB`: the process's peak resident memory (Linux `VmHWM`, reset through
  `/proc/self/clear_refs` after the warm-up step) during the timed steps, minus
  the resident memory just before them: the extra memory a training step needs
  on top of what stays resident between steps. glibc is told to serve every
  allocation above 64 KiB with mmap (`MALLOC_MMAP_THRESHOLD_`) and to trim at
  once (`MALLOC_TRIM_THRESHOLD_=0`), so freed tensors leave the resident set
  at once and the high-water mark tracks live tensor memory, not allocator
  caching. Noisy for a small step (pages kept from the warm-up count as
  "before").
- `total MB` (the "peak memory" of the targets): peak resident memory during
  the timed steps minus the resident memory after the imports, before the
  model was built. Per backend that peak holds:
  - torch (eager): the weights, adapter variables and input, plus the live
    tensors at the worst moment of the step (activations and what autograd
    saved, then the backward pass's temporaries); no compiled program.
  - jax: the weights and input, the compiled step (its code and constants:
    the frozen kernels closed over by the jitted function are compile-time
    constants inside it), the heap the compilation left behind (glibc cannot
    return fragmented free memory), and the step's working memory: XLA
    preallocates the buffers of its buffer assignment (`XLA temp MB`) for the
    run, plus the outputs.
  - tensorflow: the weights and input, the traced graph and the executor's
    live tensors at the worst moment (as torch, but ops may run concurrently).
- `trimmed MB`: `total MB` measured again over one more step, after
  `malloc_trim(0)` has handed every free heap page back to the OS: without
  what the allocator keeps of freed memory. On jax that is mostly what the
  compilation freed (XLA CPU leaves ~40-50 MB for the SincLoRA step, ~15 MB
  for LoRA's, whatever the number of layers): the step's own memory, the
  compiled program and the weights remain.
- on jax also `XLA temp MB`: the compiled step's temporary buffers from XLA's
  own buffer assignment (`compiled.memory_analysis()`), independent of malloc
  and of the compilation's leftovers: the most exact view of the step itself.
- `step s`: median wall time of the timed steps.

The targets (issue 6): `total MB` (and `trimmed MB`, and on jax `XLA temp
MB`) of `sinc` <= 1.3x `lora`'s. Each ratio is also printed as a `RESULT {json}` line for
`benchmarks/run_all.py`: memory sinc/lora (target "<= 1.3"), naive/sinc
(informative), step time sinc/lora and naive/sinc (informative).

Usage: `python benchmarks/bench_sinc_memory.py [--backends jax torch]
[--variants lora sinc naive] [--batch 4 --seq 128 --rank 8 --grid-size 50
--steps 2] [--plain-malloc]`. `--plain-malloc` drops the allocator settings
above: use it for step times (serving every allocation with a fresh mmap
costs a page fault per 4 KiB, which slows torch eager, one allocation per op,
many-fold), not for the memory columns (its ratios are printed, its memory
ratios are not reported as RESULT lines). CPU-only runs of `lora` and `sinc`
take a minute or two per backend; `naive` takes far longer (tens of minutes
and ~10 GB on jax) at the default sizes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from _runner import report_ratio

VARIANTS = ("lora", "sinc", "naive")


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # MiB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _malloc_trim():
    """glibc's `malloc_trim(0)`: return all free heap pages to the OS. False if unavailable."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def worker(args):
    import keras
    import numpy as np
    from keras import ops

    from keras_adaptive_lora import LoRAAdapter, SincLoRAAdapter

    rss_start = _status("VmRSS")  # after the imports, before the model

    backend = keras.backend.backend()

    class NaiveSincAdapter(SincLoRAAdapter):
        """The broadcast formulation, with plain autodiff (for comparison only)."""

        def call(self, inputs, training=None, **kwargs):
            grid = ops.convert_to_tensor(np.asarray(self.grid, "float32"))[:, None, None]
            product = ops.matmul(self.lora_a, self.lora_b)[None]
            z = ops.softplus(self.bandwidth_logits)[:, None, None] * (product - grid)
            t = np.pi * z
            zero = ops.equal(t, 0.0)
            safe = ops.where(zero, 1.0, t)
            sinc = ops.where(zero, 1.0, ops.sin(safe) / safe)
            f = ops.sum(self.amplitudes[:, None, None] * sinc, axis=0)
            kernel = ops.add(ops.cast(self.wrapped.kernel, "float32"), self.view.from_matrix(self.scale * f))
            y = self.view.project(inputs, kernel)
            return ops.add(y, self.wrapped.bias)

    adapter_cls = {"lora": LoRAAdapter, "sinc": SincLoRAAdapter, "naive": NaiveSincAdapter}[args.variant]
    extra = {} if args.variant == "lora" else {"grid_size": args.grid_size}
    rng = np.random.default_rng(0)
    inputs = keras.Input((args.seq, args.hidden))
    layers = []
    for i in range(args.pairs):
        up = keras.layers.Dense(args.intermediate, name=f"up_{i}")
        down = keras.layers.Dense(args.hidden, name=f"down_{i}")
        up.build((None, args.seq, args.hidden))
        down.build((None, args.seq, args.intermediate))
        layers += [up, down]
    adapters = [adapter_cls(layer, rank=args.rank, **extra) for layer in layers]
    hidden = inputs
    for adapter in adapters:
        hidden = adapter(hidden)
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

    xla_temp = None
    if backend == "jax":
        import jax

        x = jax.numpy.asarray(x_np)
        compiled = jax.jit(jax.value_and_grad(loss_fn)).lower(trainable, x).compile()
        xla_temp = compiled.memory_analysis().temp_size_in_bytes / 2**20

        def step():
            loss, grads = compiled(trainable, x)
            jax.block_until_ready(grads)
            return loss

    elif backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x_np)

        @tf.function
        def tf_step(x):
            with tf.GradientTape() as tape:
                tape.watch(trainable)
                loss = loss_fn(trainable, x)
            return loss, tape.gradient(loss, trainable)

        def step():
            loss, grads = tf_step(x)
            [g.numpy() for g in grads]
            return loss

    else:
        import torch

        x = torch.tensor(x_np)
        params = [v.value for v in model.trainable_variables]

        def step():
            loss = loss_fn(params, x)
            grads = torch.autograd.grad(loss, params)
            del grads
            return loss

    step()  # warm-up (and compilation)
    rss_before = _status("VmRSS")
    _reset_peak()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status("VmHWM")
    # One more step after handing the heap's free pages back to the OS: glibc
    # keeps free memory below the top of the heap resident (on jax mostly
    # what the compilation freed, tens of MB).
    trimmed = None
    if _malloc_trim():
        _reset_peak()
        step()
        trimmed = _status("VmHWM") - rss_start
    print(
        json.dumps(
            {
                "backend": backend,
                "variant": args.variant,
                "step_mb": peak - rss_before,
                "total_mb": peak - rss_start,
                "trimmed_mb": trimmed,
                "xla_temp_mb": xla_temp,
                "step_s": float(np.median(times)),
            }
        )
    )


def run_all(args):
    rows = []
    env_base = dict(os.environ)
    if not args.plain_malloc:
        env_base.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    common = [
        f"--{k.replace('_', '-')}={getattr(args, k)}"
        for k in ("batch", "seq", "hidden", "intermediate", "pairs", "rank", "grid_size", "steps")
    ]
    for backend in args.backends:
        for variant in args.variants:
            env = dict(env_base, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
            cmd = [sys.executable, __file__, "--worker", f"--variant={variant}", *common]
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            if out.returncode or not line:
                print(f"{backend}/{variant} failed (rc {out.returncode}):\n{out.stderr[-2000:]}")
                continue
            rows.append(json.loads(line[-1]))
            print(f"  done {backend}/{variant}: {rows[-1]}", file=sys.stderr)
    print(
        f"\n{args.pairs} x (kernels {args.hidden}x{args.intermediate} and {args.intermediate}x{args.hidden}), "
        f"batch {args.batch} x seq {args.seq}, rank {args.rank}, grid_size {args.grid_size}, "
        f"median of {args.steps} steps"
    )
    header = (
        f"{'backend':<11}{'variant':<8}{'step MB':>10}{'total MB':>10}{'trimmed MB':>12}"
        f"{'XLA temp MB':>13}{'step s':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        xla = "" if r["xla_temp_mb"] is None else f"{r['xla_temp_mb']:.1f}"
        trimmed = "" if r["trimmed_mb"] is None else f"{r['trimmed_mb']:.1f}"
        print(
            f"{r['backend']:<11}{r['variant']:<8}{r['step_mb']:>10.1f}{r['total_mb']:>10.1f}"
            f"{trimmed:>12}{xla:>13}{r['step_s']:>9.2f}"
        )
    print("\nratios (sinc / lora, naive / sinc):")
    for backend in args.backends:
        by = {r["variant"]: r for r in rows if r["backend"] == backend}
        if "sinc" not in by:
            continue
        parts = []
        labels = (
            ("step_mb", "step mem"),
            ("total_mb", "total mem"),
            ("trimmed_mb", "trimmed"),
            ("xla_temp_mb", "XLA temp"),
            ("step_s", "time"),
        )
        for key, label in labels:
            if by["sinc"][key] is None:
                continue
            text = label
            if "lora" in by:
                text += f" {by['sinc'][key] / by['lora'][key]:.2f}x"
            if "naive" in by:
                text += f" / {by['naive'][key] / by['sinc'][key]:.1f}x"
            parts.append(text)
        print(f"  {backend:<11}" + ",  ".join(parts))
        report_ratios(backend, by, args.plain_malloc)


def report_ratios(backend, by, plain_malloc):
    """`RESULT` lines for `run_all.py`: memory (not with `--plain-malloc`,
    where it is allocator-dependent) and step time."""
    mode = " (--plain-malloc)" if plain_malloc else " (glibc mmap mode)"
    name = "bench_sinc_memory"
    if not plain_malloc:
        labels = (
            ("total_mb", "peak memory (total)"),
            ("trimmed_mb", "peak memory (total, heap trimmed)"),
            ("xla_temp_mb", "XLA temp memory"),
        )
        for key, label in labels:
            if by["sinc"][key] is None:
                continue
            if "lora" in by:
                report_ratio(name, backend, f"{label} sinc/lora", by["sinc"][key] / by["lora"][key], "<= 1.3")
            if "naive" in by:
                report_ratio(name, backend, f"{label} naive/sinc", by["naive"][key] / by["sinc"][key], "")
    if "lora" in by:
        report_ratio(name, backend, "step time sinc/lora" + mode, by["sinc"]["step_s"] / by["lora"]["step_s"], "")
    if "naive" in by:
        report_ratio(name, backend, "step time naive/sinc" + mode, by["naive"]["step_s"] / by["sinc"]["step_s"], "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", nargs="+", default=["jax", "torch"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=4096)
    parser.add_argument(
        "--pairs",
        type=int,
        default=1,
        help="stacked up/down pairs (2 adapted layers each); more pairs show the "
        "per-layer cost without the fixed one (jax's compilation leftovers)",
    )
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--grid-size", type=int, default=50)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--plain-malloc",
        action="store_true",
        help="keep glibc's default allocator settings: step times without the "
        "mmap-every-allocation cost (which slows torch eager, many allocations, "
        "several-fold); the memory columns are then allocator-dependent",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        run_all(args)


if __name__ == "__main__":
    main()
