"""Backend-specific helpers, isolated: each imports its backend lazily and
raises a clear error on any other backend.

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

import keras


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
