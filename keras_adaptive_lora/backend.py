"""Everything backend-specific, in one module: the rest of the library is
`keras.ops` only and never asks which backend runs.

The torch and tensorflow helpers import their backend lazily and raise a
clear error on any other backend. The block-wise loop machinery and the
per-bin sums used by SincLoRA (`methods/sinc/`) are here because the fastest
and memory-safe way to run them differs per backend: a Python loop writing
in place on eager torch, a sequential while loop on tensorflow graphs, an
in-place `fori_loop` on jax (see `blocked`, `bin_sums`).

`torch_data_parallel`: multi-process data-parallel training of a Keras model
on the torch backend with `torch.nn.parallel.DistributedDataParallel` and a
custom training loop. Keras's torch trainer (`model.fit`) has no
multi-process support, and `DistributedDataParallel(model)` fails on a
keras-hub model: a functional Keras model registers no torch parameters
(`model.parameters()` is empty; Keras tracks its variables itself), so DDP
raises "DistributedDataParallel is not needed when a module doesn't have any
parameter that requires a gradient". The helper wraps the model in a thin
`torch.nn.Module` that registers the Keras trainable variables' own
`torch.nn.Parameter`s (the same tensor objects, not copies), so DDP
broadcasts them from rank 0 at construction and averages their gradients
across processes during `backward()`.

`sequential_fori_loop`: `keras.ops.fori_loop` whose iterations run one after
another on every backend. Keras's tensorflow `fori_loop` is a
`tf.while_loop` with the default `parallel_iterations=10`: in a graph
(`tf.function`, which Keras's tensorflow trainer uses) up to 10 iterations
whose work does not depend on the loop carry run at once, each holding its
temporaries. Memory-bounded loops (SincLoRA's blocks of a kernel) need them
one at a time.
"""

import math

import keras
from keras import ops


def import_tensorflow(user, install):
    """`tensorflow` (for tf.data input pipelines, on any backend), imported
    lazily, with an actionable `ImportError` naming `user` (what needs it)
    and `install` (the command that provides it) when it is missing."""
    try:
        import tensorflow as tf
    except ImportError:
        raise ImportError(f"{user} needs TensorFlow: {install}") from None
    return tf


def _require_torch(what):
    if keras.backend.backend() != "torch":
        raise ValueError(
            f"`{what}` is for the torch backend (KERAS_BACKEND=torch); this is "
            f"{keras.backend.backend()!r}. On jax use keras.distribution "
            "(see `keras_adaptive_lora.layout_map_for`), on tensorflow "
            "`tf.distribute.MirroredStrategy`."
        )
    import torch  # the torch backend guarantees it

    return torch


def sequential_fori_loop(lower, upper, body_fun, init_val):
    """`keras.ops.fori_loop`, one iteration at a time.

    On tensorflow a `tf.while_loop` with `parallel_iterations=1`; elsewhere
    `keras.ops.fori_loop` itself (jax's `fori_loop` is sequential; torch's is a
    Python loop).

    Args:
        lower: first loop index (int or scalar integer tensor).
        upper: loop end, exclusive.
        body_fun: `body_fun(i, val) -> val`, same structure as `init_val`.
        init_val: the initial loop carry (a tensor or nested structure).

    Returns:
        The final loop carry.

    Example:
    ```python
    total = sequential_fori_loop(0, 4, lambda i, t: t + keras.ops.cast(i, "float32"), 0.0)
    ```
    """
    if keras.backend.backend() != "tensorflow":
        return keras.ops.fori_loop(lower, upper, body_fun, init_val)
    import tensorflow as tf  # the tensorflow backend guarantees it

    _, result = tf.while_loop(
        lambda i, _: i < upper,
        lambda i, val: (i + 1, body_fun(i, val)),
        (lower, init_val),
        parallel_iterations=1,
    )
    return result


def torch_data_parallel(model, **ddp_kwargs):
    """Wrap a Keras model for `torch.nn.parallel.DistributedDataParallel`.

    Call it after `apply_adapters` (the trainable variables are collected
    once, here) and after `torch.distributed.init_process_group(...)`, on
    every process. The result is a DDP module: call it like the model
    (`ddp(x, training=True)`), zero gradients with `ddp.zero_grad()`, and
    after `loss.backward()` the gradients in
    `[v.value.grad for v in model.trainable_variables]` are averaged over
    the processes, ready for `model.optimizer.apply(grads,
    model.trainable_variables)`. Non-trainable state (FlexLoRA masks, SR-LoRA
    samplers) is not synchronized: it stays identical on every process
    because it starts identical (same seeds) and is only changed from
    identical values (a `FlexLoRAScheduler` driven by hand on each process).

    Args:
        model: a Keras model on the torch backend, with adapters applied.
        **ddp_kwargs: passed to `DistributedDataParallel` (e.g.
            `bucket_cap_mb`). Defaults to none.

    Returns:
        A `torch.nn.parallel.DistributedDataParallel` module.

    Example:
    ```python
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, ...)
    ddp = torch_data_parallel(model)
    ddp.zero_grad()
    loss = loss_fn(y, ddp(x, training=True)) + sum(model.losses)
    loss.backward()
    with torch.no_grad():
        model.optimizer.apply([v.value.grad for v in model.trainable_variables],
                              model.trainable_variables)
    ```
    """
    torch = _require_torch("torch_data_parallel")
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        raise ValueError(
            "`torch_data_parallel` needs a torch process group: call "
            "`torch.distributed.init_process_group(backend, rank=..., "
            "world_size=...)` on every process first."
        )
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(
            f"Model {model.name!r} has no trainable variables; apply adapters "
            "(`apply_adapters(model, method)`) before wrapping it."
        )

    class KerasParameters(torch.nn.Module):
        """Registers a Keras model's trainable Parameters; calls the model."""

        def __init__(self):
            super().__init__()
            # Not a registered submodule: its (empty) parameters are not ours.
            object.__setattr__(self, "keras_model", model)
            self.keras_parameters = torch.nn.ParameterList([v.value for v in variables])

        def forward(self, *args, **kwargs):
            return self.keras_model(*args, **kwargs)

    return torch.nn.parallel.DistributedDataParallel(KerasParameters(), **ddp_kwargs)


# --------------------------------------------------------------------------
# Block-wise loops (SincLoRA's memory-safe elementwise work)
# --------------------------------------------------------------------------
#: Elementwise work on a `(d_in, d_out)` matrix runs on row blocks of about
#: this many entries (1 MiB in float32): temporaries are block-sized, not
#: kernel-sized, and stay in cache.
BLOCK_ELEMENTS = 1 << 18


def take_block(x, axis, start, length):
    """`x[..., start : start + length, ...]` along `axis` (`start` may be traced)."""
    if isinstance(start, int):
        if (start, length) == (0, x.shape[axis]):
            return x
        index = [slice(None)] * len(x.shape)
        index[axis] = slice(start, start + length)
        return x[tuple(index)]
    starts = [0] * len(x.shape)
    starts[axis] = start
    sizes = list(x.shape)
    sizes[axis] = length
    return ops.slice(x, starts, sizes)


class BlockOutput:
    """An output assembled from per-block pieces along `axis`.

    Block `[start, start + length)` covers `[start · unit, (start + length) ·
    unit)` of the axis. `init` (optional) is added: the result is `init +`
    the pieces. `like` (optional) gives the shape when it is not static (a
    layer input with an unknown batch size on tensorflow).

    In a loop (`blocked` on jax and tensorflow) the output is the loop carry
    and each block is written into it: on jax with `slice_update` (XLA
    updates the carry in place); on tensorflow, whose `slice_update` is an
    XLA-only op, with `scatter_update` of rows, so the carry is kept with
    `axis` first (`initial`, `final`).
    """

    def __init__(self, shape, axis, *, unit=1, init=None, like=None, dtype="float32"):
        self.shape, self.axis, self.unit, self.init, self.like, self.dtype = shape, axis, unit, init, like, dtype
        self.rows_first = keras.backend.backend() == "tensorflow" and axis != 0

    def initial(self):
        if self.init is not None:
            full = self.init
        elif self.like is not None:
            full = ops.zeros_like(self.like)
        else:
            full = ops.zeros(self.shape, self.dtype)
        return ops.moveaxis(full, self.axis, 0) if self.rows_first else full

    def final(self, full):
        return ops.moveaxis(full, 0, self.axis) if self.rows_first else full

    def update(self, full, start, piece):
        """`full` with the piece of the block at `start` written (added) in place."""
        if keras.backend.backend() == "tensorflow":
            if self.rows_first:
                piece = ops.moveaxis(piece, self.axis, 0)
            rows = ops.add(ops.arange(int(piece.shape[0]), dtype="int32"), ops.cast(start * self.unit, "int32"))
            if self.init is not None:
                piece = ops.add(ops.take(full, rows, axis=0), piece)
            return ops.scatter_update(full, ops.reshape(rows, (-1, 1)), piece)
        starts = [0] * len(full.shape)
        starts[self.axis] = start * self.unit
        if self.init is not None:
            piece = ops.add(ops.slice(full, starts, piece.shape), piece)
        return ops.slice_update(full, starts, piece)


def _even_step(total, step):
    """A divisor of `total` in `[step / 2, step]` if there is one (no shorter
    last block to compile separately), else `step`."""
    return next((d for d in range(step, step // 2, -1) if total % d == 0), step)


def blocked(total, step, body, outputs=(), sums=()):
    """Run `body(start, length) -> (pieces, partial_sums)` over blocks of `range(total)`.

    Blocks are `[start, start + length)`, `length = step` except for a
    shorter last one. Each piece is written into its output (`BlockOutput`), the
    partial sums are added up (zeros of the shapes in `sums` to start).

    On jax and tensorflow the full-length blocks run in one loop, one block
    at a time (`sequential_fori_loop`), that writes the outputs into the loop
    carry (`BlockOutput.update`), then the shorter last block: the graph holds
    one copy of `body` whatever the number of blocks (tensorflow keeps tens
    of kB per graph node for the life of the function, so unrolling the
    blocks would cost memory proportional to the kernel size). On torch
    (eager) a Python loop adds each piece in place into one preallocated
    output (`slice_update` or a concatenation would copy the whole output).

    Returns:
        `(outputs, sums)`, two tuples of tensors.
    """
    step = _even_step(total, max(1, min(step, total)))
    count, tail = divmod(total, step)
    if keras.backend.backend() != "torch":

        def run(start, length, carry):
            fulls, totals = carry
            pieces, partials = body(start, length)
            fulls = tuple(o.update(f, start, p) for o, f, p in zip(outputs, fulls, pieces))
            totals = tuple(ops.add(t, p) for t, p in zip(totals, partials))
            return fulls, totals

        carry = (tuple(o.initial() for o in outputs), tuple(ops.zeros(s, "float32") for s in sums))
        if count == 1:
            carry = run(0, step, carry)
        else:
            carry = sequential_fori_loop(0, count, lambda i, c: run(i * step, step, c), carry)
        if tail:
            carry = run(count * step, tail, carry)
        fulls, totals = carry
        return tuple(o.final(f) for o, f in zip(outputs, fulls)), totals
    fulls = [o.initial().clone() if o.init is not None else o.initial() for o in outputs]
    totals = [None] * len(sums)
    for start in range(0, total, step):
        pieces, partials = body(start, min(step, total - start))
        for output, full, piece in zip(outputs, fulls, pieces):
            full.narrow(output.axis, start * output.unit, int(piece.shape[output.axis])).add_(piece)
        totals = [p if t is None else ops.add(t, p) for t, p in zip(totals, partials)]
        del pieces, partials
    return tuple(fulls), tuple(totals)


def bin_sums(columns, index, bins):
    """`out[j, c] = Σ columns[c][i] over index[i] = j`, `j < bins`: 1-D float32
    `columns`, an int32 `index` in range; `(bins, len(columns))`.

    `bincount` per column on torch (keras's torch `segment_sum` repeats the
    index and masks it, ~10x slower); one `segment_sum` of the stacked
    columns elsewhere (jax's `bincount` cannot be traced; tensorflow's has a
    data-dependent size that XLA rejects).
    """
    if keras.backend.backend() == "torch":
        return ops.stack([ops.bincount(index, weights=c, minlength=bins) for c in columns], axis=1)
    return ops.segment_sum(ops.stack(columns, axis=1), index, num_segments=bins)


def take_columns(table, index):
    """`table[:, index]`: the columns `index` (int32, any shape, in range) of a
    small 2-D `table`, shape `(rows,) + index.shape`, each row contiguous.

    On torch `index_select` along the columns with the int32 index as it is
    (keras's torch `take` first converts the index to int64 and remaps
    negative entries: more passes over it; a row gather `table.T[index]`
    leaves each coefficient strided, which slows every later pass);
    elsewhere `keras.ops.take`.
    """
    if keras.backend.backend() == "torch":
        import torch  # the torch backend guarantees it

        flat = torch.index_select(table, 1, index.reshape(-1))
        return flat.reshape((table.shape[0],) + tuple(index.shape))
    return ops.take(table, index, axis=1)


def horner(coefficients, t):
    """`c[0] + t (c[1] + t (c[2] + ...))` for `coefficients` stacked on axis 0
    (`take_columns`'s output): on torch fused multiply-adds (`addcmul`, one
    pass per degree instead of two); elsewhere `keras.ops` (XLA fuses it)."""
    degree = int(coefficients.shape[0]) - 1
    out = coefficients[degree]
    if keras.backend.backend() == "torch":
        import torch

        for p in range(degree - 1, -1, -1):
            out = torch.addcmul(coefficients[p], t, out)
        return out
    for p in range(degree - 1, -1, -1):
        out = coefficients[p] + t * out
    return out


def needs_gradient(x):
    """Whether autodiff asks for a gradient of `x`: on eager torch its
    `requires_grad` (a custom gradient can skip the work for an input that
    needs none, e.g. a model's input); `True` elsewhere (jax and tensorflow
    compile the step, and their compilers drop the unused work)."""
    if keras.backend.backend() == "torch":
        return bool(getattr(x, "requires_grad", True))
    return True


def orders_after_input():
    """Whether a parameter-only computation must be tied to its layer input
    to keep it from running early: XLA's scheduler (jax) and tensorflow's
    graph executor would otherwise run every layer's merged-kernel loop at
    the start of the step, keeping all merged kernels alive at once. Eager
    torch runs in program order."""
    return keras.backend.backend() != "torch"


def jit_compile():
    """The `jit_compile` to pass to `model.compile` for the fastest step:
    `True` on tensorflow, `"auto"` (Keras's choice) elsewhere. Keras's
    `"auto"` turns XLA off for tensorflow on a machine without a GPU, and a
    tensorflow step without XLA runs about 2x slower on CPU (measured on the
    transfer job's ViT: LoRA 11-13 -> 4.3-5.0 ms/step, LR-LoRA 19-23 -> 8-8.5,
    same accuracies). jax compiles with XLA under `"auto"` already; on torch
    `True` would mean `torch.compile`, which this library does not ask for."""
    return True if keras.backend.backend() == "tensorflow" else "auto"
