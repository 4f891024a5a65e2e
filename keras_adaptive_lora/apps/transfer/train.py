"""Adapt the backbone with one method, train it and evaluate it.

The job's own methods (`linear`, `full`, `scratch`) are handled here; an
adapter method is built from the method registry (`get_method(name)
.from_options(...)`), applied with `apply_adapters`, and given the callbacks
it asks for (`spec.callbacks(total_steps)`). What the row records about the
adapters follows the spec's declared traits: `per_layer_ranks` (the capacity
per layer, and the starting rank when the method takes one) and
`learned_rank` (the stable ranks of the learned updates).
"""

import time

import keras
import keras_hub
import numpy as np

from keras_adaptive_lora import backend
from keras_adaptive_lora.apps.transfer.backbone import cosine_schedule, load_backbone
from keras_adaptive_lora.apps.transfer.data import import_tf
from keras_adaptive_lora.apps.transfer.options import (
    HEAD,
    PROBE_SIZE,
    is_adapter_method,
    title,
)
from keras_adaptive_lora.core.method import AdapterMethod, get_method
from keras_adaptive_lora.core.tree import find_adapters
from keras_adaptive_lora.inspection import update_stable_ranks
from keras_adaptive_lora.surgery import apply_adapters


def method_spec(method, *, rank, seed, alpha=None, size=None):
    """The adapter method spec of a registered adapter method name (None for
    the job's own `linear`, `full` and `scratch`).

    Built from the generic options with `from_options(strict=False)`: a
    method takes the options it has (`rank`, `seed`, `alpha`, and the size
    options of a matched budget in `size`, e.g. `{"budget": 6144}`) and
    drops the others; None (`alpha=None`) leaves the method's own default.
    """
    if not is_adapter_method(method):
        return None
    options = {"rank": rank, "seed": seed, "alpha": alpha, **(size or {})}
    return get_method(method).from_options(strict=False, **options)


class StepTimer(keras.callbacks.Callback):
    """Steady-state time per training step: from the end of the first step
    (which traces and compiles) to the end of training, over the other
    steps. With a single step, that step's time, compile included."""

    def on_train_begin(self, logs=None):
        self.begin, self.first, self.end, self.steps = time.perf_counter(), None, None, 0

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        if self.first is None:
            self.first = time.perf_counter()

    def on_train_end(self, logs=None):
        self.end = time.perf_counter()

    def ms_per_step(self):
        """`(milliseconds, includes_compile)`."""
        if self.steps > 1:
            return 1000.0 * (self.end - self.first) / (self.steps - 1), False
        return 1000.0 * (self.end - self.begin) / max(self.steps, 1), True


def count_params(variables):
    """The number of scalars in `variables`."""
    return int(sum(int(np.prod(v.shape)) for v in variables))


def callback_schedule(callbacks):
    """The settings of the method's callbacks, for the row's `schedule`: the
    merged `get_config()` of those that have one, without `verbose`; None
    when there is none."""
    schedule = {}
    for callback in callbacks:
        get_config = getattr(callback, "get_config", None)
        if callable(get_config):
            config = get_config()
            if isinstance(config, dict):
                schedule.update({k: v for k, v in config.items() if k != "verbose"})
    return schedule or None


def seeded_epochs(train, batch_size, epochs, seed):
    """`epochs` passes over `train` in one batched dataset, each pass
    shuffled with its own fixed seed (from `seed` and the pass), so the
    order depends on `seed` alone: not on how often the dataset is iterated
    (Keras takes a first batch to build a freshly compiled model, which
    would move a reshuffling dataset on to its next order)."""
    tf = import_tf()
    size = int(train.cardinality())
    buffer = size if size > 0 else 1024
    passes = [
        train.shuffle(buffer, seed=seed * 1_000_003 + epoch, reshuffle_each_iteration=False)
        .batch(batch_size)
        for epoch in range(epochs)
    ]
    stream = passes[0]
    for one in passes[1:]:
        stream = stream.concatenate(one)
    return stream.prefetch(tf.data.AUTOTUNE)


def reuse_compiled(model, compiled):
    """`compiled` (the same method, compiled and trained on another seed)
    made to start where the freshly built `model` starts, or None.

    `model`'s weights (trainable and not: head, adapters, their masks and
    sampler states) are copied into `compiled` and its optimizer state is
    zeroed (the step count included), so `fit` runs as on a fresh model
    without tracing and compiling the training step again. Done only when
    the two models have the same variables and the same adapter configs (a
    method that keeps a seed outside its variables, in its config, is built
    and compiled afresh).
    """
    if compiled is None or len(model.weights) != len(compiled.weights):
        return None
    if any(tuple(a.shape) != tuple(b.shape) for a, b in zip(model.weights, compiled.weights)):
        return None
    configs = [[layer.get_config() for layer in find_adapters(m)] for m in (model, compiled)]
    if configs[0] != configs[1]:
        return None
    compiled.set_weights(model.get_weights())
    for variable in compiled.optimizer.variables:
        variable.assign(keras.ops.zeros(variable.shape, variable.dtype))
    return compiled


def adapt(method, *, preset, num_classes, train, evaluation, steps_per_epoch, seed, options,
          size=None, targets=None, callbacks=(), compiled=None, log=print):
    """Adapt the preset's backbone with one method on one seed; evaluate it.

    Args:
        method: a name from `options.all_methods()`.
        preset: the backbone's keras-hub preset (name or folder).
        num_classes: classes of the task.
        train: the unbatched training dataset (normalized). Each method
            batches and shuffles it afresh, so that every method sees the
            same sequence of shuffled batches for a seed.
        evaluation: an `Evaluation` (validation and test examples).
        steps_per_epoch: training steps per epoch.
        seed: the seed of the head and adapter inits and of the shuffling.
        options: dict with `epochs`, `batch_size`, `rank`, `alpha`,
            `learning_rate`, `weight_decay`, `verbose`.
        size: the method's size options (matched budgets), or None.
        targets: the layers to adapt, or None (the method's defaults).
        callbacks: extra Keras callbacks (e.g. progress).
        compiled: this method's model from the previous seed, to train
            again from this seed's initial weights when it can
            (`reuse_compiled`). Defaults to None.
        log: function receiving progress lines. Defaults to `print`.

    Returns:
        `(row, model, probe_logits)`: the per-seed row (see
        `TransferResult.runs`), the trained model, and its logits for the
        first `PROBE_SIZE` test examples (`evaluation.probe`).
    """
    epochs, verbose = options["epochs"], options["verbose"]
    keras.utils.set_random_seed(seed)  # the same head init for every method
    batches = seeded_epochs(train, options["batch_size"], epochs, seed)
    backbone = load_backbone(preset)
    if method == "scratch":
        backbone = type(backbone).from_config(backbone.get_config())
    model = keras_hub.models.ViTImageClassifier(
        backbone=backbone, num_classes=num_classes, activation=None
    )
    total_steps = epochs * steps_per_epoch
    method_callbacks, row = [], {"method": method, "title": title(method), "seed": seed, "ranks": {}}
    # No per-spec seed: the adapters draw their inits (and SR-LoRA its
    # sampler state) from Keras's global seed, set to `seed` above, so the
    # spec, and the config of every adapter, is the same on every seed and
    # the model compiled for one seed can train the next (`reuse_compiled`).
    spec = method_spec(method, rank=options["rank"], seed=None, alpha=options["alpha"], size=size)
    if method == "linear":
        backbone.trainable = False
    elif spec is not None:
        apply_adapters(model, spec, targets=targets, train_also=[HEAD])
        adapters = find_adapters(model)
        row["size"] = dict(size or {})
        row["targets"] = sorted({a.path.rsplit("/", 1)[-1] for a in adapters})
        row["adapter_params"] = sum(count_params(a.trainable_weights) for a in adapters)
        row["initial_ranks"] = {a.path: int(a.rank()) for a in adapters}
        method_callbacks = list(spec.callbacks(total_steps, verbose=2 if verbose >= 2 else 0))
        if not method_callbacks and type(spec).callbacks is not AdapterMethod.callbacks:
            log(f"  note: {total_steps} training step(s) leave no room for {row['title']}'s callbacks")
        schedule = callback_schedule(method_callbacks)
        if schedule is not None:
            row["schedule"] = schedule
    reused = reuse_compiled(model, compiled)
    if reused is None:
        model.compile(
            optimizer=keras.optimizers.AdamW(
                cosine_schedule(options["learning_rate"], total_steps),
                weight_decay=options["weight_decay"],
            ),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
            jit_compile=backend.jit_compile(),
        )
    else:
        del model
        model = reused
    row["reused_compiled_model"] = reused is not None
    row["trainable_params"] = count_params(model.trainable_weights)
    row["total_params"] = count_params(model.weights)
    timer = StepTimer()
    start = time.perf_counter()
    history = model.fit(
        batches,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,  # one stream of epochs (see `seeded_epochs`)
        callbacks=[timer, *method_callbacks, *callbacks],
        verbose=2 if verbose >= 2 else 0,
        shuffle=False,  # `batches` is shuffled per epoch already
    )
    row["train_seconds"] = time.perf_counter() - start
    row["steps"] = total_steps
    row["ms_per_step"], row["ms_per_step_includes_compile"] = timer.ms_per_step()
    row["train_accuracy"] = float(history.history["accuracy"][-1])
    # One `predict` over validation + test (one compiled function per model).
    logits = np.asarray(keras.ops.convert_to_numpy(model.predict(evaluation.dataset, verbose=0)))
    correct = np.argmax(logits, axis=-1) == evaluation.labels
    row["val_accuracy"] = float(correct[: evaluation.num_val].mean())
    row["test_accuracy"] = float(correct[evaluation.num_val :].mean())
    probe_logits = logits[evaluation.num_val : evaluation.num_val + PROBE_SIZE]
    adapters = find_adapters(model)
    row["ranks"] = {a.path: int(a.rank()) for a in adapters}
    if spec is not None and spec.learned_rank:  # the rank it learned (it is not `rank`)
        row["update_stable_ranks"] = update_stable_ranks(model)
    if spec is not None and spec.per_layer_ranks:
        row["capacity"] = {a.path: int(a.capacity()) for a in adapters}
    if verbose >= 2:
        log(
            f"      {method}, seed {seed}: test accuracy {row['test_accuracy']:.3f}, validation "
            f"{row['val_accuracy']:.3f}, train {row['train_accuracy']:.3f} in "
            f"{row['train_seconds']:.1f}s ({row['ms_per_step']:.1f} ms/step)"
        )
    return row, model, probe_logits
