"""FlexLoRA's schedule: the budget of each reallocation step (paper eq. 4),
and the Keras callback that moves rank between layers inside `model.fit`
(paper §3.3, §4.2): no call to make in a training loop.
"""

import warnings

import keras
import numpy as np
from keras import ops

from keras_adaptive_lora._validation import check_int
from keras_adaptive_lora.core.optimizer_slots import reset_optimizer_slots
from keras_adaptive_lora.core.tree import check_finite, find_adapters
from keras_adaptive_lora.methods.flexlora.layer import FlexLoRAAdapter


def budget_schedule(step, *, b0, total_steps, warmup_steps, final_steps, interval):
    """The number of components to move at `step` (paper eq. 4), 0 if none.

    Reallocation happens at steps `t` with `t > warmup_steps`,
    `(t − warmup_steps) % interval == 0` and `t < total_steps − final_steps`;
    there `b(t) = round(b0 · (1 − p)³)` with
    `p = clip((t − warmup_steps) / (total_steps − final_steps − warmup_steps), 0, 1)`.
    `round` is Python's (half to even). Steps count completed optimizer
    updates (`optimizer.iterations` after the update).

    Args:
        step: the step `t` (int).
        b0: the initial budget.
        total_steps: `T`.
        warmup_steps: `t_warmup`, steps before the first reallocation.
        final_steps: `t_final`, steps at the end with frozen ranks.
        interval: `Δt`, steps between reallocations.

    Returns:
        A Python int in `[0, b0]`.
    """
    t = int(step)
    span = total_steps - final_steps - warmup_steps
    if span <= 0:
        return 0
    if not (t > warmup_steps and t < total_steps - final_steps):
        return 0
    if (t - warmup_steps) % interval:
        return 0
    p = min(max((t - warmup_steps) / span, 0.0), 1.0)
    return int(round(b0 * (1.0 - p) ** 3))


def flexlora_schedule(total_steps):
    """Scheduler settings for a run of `total_steps`, scaled from the paper's
    VTAB setting (warmup and final phases ~15% each, a reallocation every ~3%
    of the steps), or None when the run is too short (< 2 steps).

    Returns:
        `{"warmup_steps", "final_steps", "interval"}` or None.
    """
    if total_steps < 2:
        return None
    warmup = final = total_steps * 15 // 100
    interval = max(1, total_steps * 3 // 100)
    if warmup + interval >= total_steps - final:
        warmup, final, interval = 0, 0, 1
    return {"warmup_steps": warmup, "final_steps": final, "interval": interval}


def find_flexlora_adapters(model):
    """All `FlexLoRAAdapter`s of `model`, in walk order."""

    return [a for a in find_adapters(model) if isinstance(a, FlexLoRAAdapter)]


def rank_pattern(model):
    """`{layer path: active rank}` of every FlexLoRA adapter in `model`."""
    return {a.path: a.rank() for a in find_flexlora_adapters(model)}




class FlexLoRAScheduler(keras.callbacks.Callback):
    """Moves FlexLoRA rank between layers during `fit` (paper §3.3, eq. 4).

    At a reallocation step `t` (`budget_schedule`) it computes each adapter's
    spectral entropy importance `I` over its active components; with `L`
    adapters, `b = min(b(t), L // 2)` (capped at half the layers). The `b`
    least important layers with `r_active > 1` (prune) are paired in order
    with the `b` most important layers not among them with `r_active <
    max_rank` (expand); ties go to the earlier layer. A pair moves only if
    the expanding layer is strictly more important (so never between equals,
    e.g. all-zero `λ` after a short warmup); the first pair that fails ends
    the step. A move switches off the pruned layer's smallest-`|λ|` component
    and switches on a free slot with zero-impact init (`λ = 0`, fresh
    `N(0, 0.02²)` vectors). Prunes equal expands: `Σ r_active` is constant.

    Its clock is `model.optimizer.iterations` (completed updates), read after
    each batch. The rank state is in the adapters' variables (mask, expansion
    counter, last processed step), so a weights checkpoint
    (`BackupAndRestore`, `ModelCheckpoint(save_weights_only=True)`) followed
    by `fit` on a rebuilt model continues the same schedule exactly; a step
    that was due but not processed before the checkpoint is processed at the
    start of the next `fit`. After step `total_steps - final_steps` the ranks
    are frozen. The optimizer state of pruned and expanded components is
    zeroed (see `reset_optimizer_slots`); every other component keeps it.
    Nothing is rebuilt, so the compiled train step is not retraced.

    Divergence: when `fit` starts, at every reallocation and at every epoch
    end it checks the adapters' variables and stops the fit with a
    `ValueError` naming the first one holding NaN or inf (add
    `keras.callbacks.TerminateOnNaN()` to stop at the first non-finite loss).
    It needs a compiled model (`ValueError` otherwise).

    Logs: adds `flexlora/total_rank`, `flexlora/min_rank`, `flexlora/max_rank`
    and `flexlora/moves` (components moved in this batch, resp. this epoch
    in the epoch logs) to the batch and epoch `logs`, so `History`,
    `CSVLogger` and `TensorBoard` record them (place `CSVLogger`/`TensorBoard`
    after this callback in the list). Epoch logs also get
    `flexlora/orth_penalty`, the weighted orthogonality penalty summed over
    the adapters at the epoch's end: a part of `loss` (most of it at init,
    with random `A`, `B`). A fit that ends before the first reallocation
    warns at its start (no rank would move).

    Args:
        total_steps: `T`, total optimizer steps of the run, or None: the
            fit's own length, `epochs` x steps per epoch (the fit must know
            its steps per epoch: arrays, a dataset of known cardinality, or
            `steps_per_epoch`).
        b0: the initial budget (moves at the first reallocation). Defaults to 4.
        warmup_steps: steps before the first reallocation.
        final_steps: steps at the end with frozen ranks.
        interval: steps between reallocations (`Δt`).
        verbose: 0 silent, 1 a rank summary per epoch, 2 also one line per
            reallocation. Defaults to 1.

    Example:
    ```python
    scheduler = FlexLoRAScheduler(
        total_steps=1000, b0=4, warmup_steps=100, final_steps=200, interval=10
    )
    model.fit(x, y, epochs=10, callbacks=[scheduler])
    scheduler.rank_pattern        # {layer path: final rank}
    scheduler.rank_history()      # steps x layers, for a heatmap
    ```
    """

    def __init__(self, total_steps=None, *, b0=4, warmup_steps, final_steps, interval, verbose=1):
        super().__init__()
        self.total_steps = None if total_steps is None else check_int("total_steps", total_steps, 1)
        self.b0 = check_int("b0", b0, 1)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, 0)
        self.final_steps = check_int("final_steps", final_steps, 0)
        self.interval = check_int("interval", interval, 1)
        if verbose not in (0, 1, 2) or isinstance(verbose, bool):
            raise ValueError(f"`verbose` must be 0, 1 or 2, got {verbose!r}.")
        self.verbose = int(verbose)
        if self.total_steps is not None:
            self._check_schedule()
        self._adapters = []
        self._history_steps = []
        self._history_ranks = []
        self._ready = False

    def _check_schedule(self):
        if self.warmup_steps + self.final_steps >= self.total_steps:
            raise ValueError(
                f"warmup_steps + final_steps = {self.warmup_steps} + "
                f"{self.final_steps} = {self.warmup_steps + self.final_steps} must be "
                f"smaller than total_steps = {self.total_steps}; otherwise no step "
                "is left for rank reallocation."
            )
        first = self.warmup_steps + self.interval
        if first >= self.total_steps - self.final_steps:
            raise ValueError(
                f"interval = {self.interval} is too large: the first reallocation "
                f"would be at step warmup_steps + interval = {first}, but ranks are "
                f"frozen from step total_steps - final_steps = "
                f"{self.total_steps - self.final_steps}. Use a smaller interval."
            )

    def get_config(self):
        return {
            "total_steps": self.total_steps,
            "b0": self.b0,
            "warmup_steps": self.warmup_steps,
            "final_steps": self.final_steps,
            "interval": self.interval,
            "verbose": self.verbose,
        }

    # The schedule -------------------------------------------------------------------
    def budget(self, step):
        """`b(step)`: the number of moves at `step` (0 when none is due)."""
        return budget_schedule(
            step,
            b0=self.b0,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            final_steps=self.final_steps,
            interval=self.interval,
        )

    def _due_steps(self, after, upto):
        """Reallocation steps `t` with `after < t <= upto` and `b(t) > 0`."""
        k = max(1, (after - self.warmup_steps) // self.interval + 1)
        t = self.warmup_steps + k * self.interval
        while t <= upto and self.budget(t) > 0:
            yield t
            t += self.interval

    # Callback hooks ------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if getattr(self.model, "optimizer", None) is None:
            raise ValueError(
                f"FlexLoRAScheduler needs a compiled model: its clock is "
                f"`model.optimizer.iterations`, and model {self.model.name!r} has no "
                "optimizer. Call `model.compile(optimizer=..., loss=...)` first."
            )
        adapters = find_flexlora_adapters(self.model)
        if not adapters:
            raise ValueError(
                f"FlexLoRAScheduler found no FlexLoRA adapter in model "
                f"{self.model.name!r}. Apply them first: "
                "`apply_adapters(model, FlexLoRA(rank=...))`."
            )
        if len(adapters) < 2:
            raise ValueError(
                "FlexLoRAScheduler moves rank between layers, but model "
                f"{self.model.name!r} has a single FlexLoRA adapter "
                f"('{adapters[0].path}'). Target at least two layers."
            )
        self._adapters = adapters
        self._ready = False
        self._check_fit_length()

    def _check_fit_length(self):
        """Take `total_steps` from the fit when it is None; warn when the fit
        ends before the first reallocation."""
        epochs, steps = (self.params or {}).get("epochs"), (self.params or {}).get("steps")
        fit_end = epochs * steps if epochs and steps else None
        if self.total_steps is None:
            if fit_end is None:
                raise ValueError(
                    "FlexLoRAScheduler(total_steps=None) needs a fit that knows its steps per "
                    "epoch; pass `steps_per_epoch` to fit, or `total_steps`."
                )
            self.total_steps = fit_end
            self._check_schedule()
        first = next(iter(self._due_steps(0, self.total_steps)), None)
        if fit_end is not None and (first is None or fit_end < first):
            warnings.warn(
                f"FlexLoRAScheduler: this fit ends at step {fit_end} ({epochs} epochs x {steps}), "
                f"before the first reallocation (step {first} of total_steps={self.total_steps}): "
                "no rank will move. Pass total_steps=None to use the fit's own length.",
                stacklevel=2,
            )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_moves = 0
        if not self._ready:
            self._start()

    def on_train_batch_end(self, batch, logs=None):
        if not self._ready:  # fit without on_epoch_begin (should not happen)
            self._start()
        if batch <= self._last_batch:
            self._batches += batch + 1
        else:
            self._batches += batch - self._last_batch
        self._last_batch = batch
        moves = 0
        # `iterations` grows by at most one per batch: read it (and sync the
        # JAX state) only when a reallocation may be due.
        if self._next_due <= self._clock + self._batches:
            self._sync()
            now = self._iterations()
            self._clock, self._batches = now, 0
            moves = self._advance(now)
        self._epoch_moves += moves
        if logs is not None:
            logs.update(self._rank_logs(moves))

    def on_epoch_end(self, epoch, logs=None):
        self._sync()
        check_finite(self._adapters, f"at the end of epoch {epoch + 1}")
        if logs is not None:
            logs.update(self._rank_logs(self._epoch_moves))
            logs["flexlora/orth_penalty"] = sum(a.weighted_orth_penalty() for a in self._adapters)
        if self.verbose:
            r = self._ranks
            print(
                f"FlexLoRA: total rank {int(r.sum())}, min {int(r.min())}, max "
                f"{int(r.max())}, {self._epoch_moves} moves this epoch"
            )

    # Internals ------------------------------------------------------------------------
    def _sync(self):
        sync = getattr(self.model, "jax_state_sync", None)
        if callable(sync):  # JAX keeps the state outside the variables during fit
            sync()

    def _iterations(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def _start(self):
        self._sync()
        check_finite(self._adapters, "when this fit started")
        self._ranks = np.array([a.rank() for a in self._adapters])
        processed = min(int(ops.convert_to_numpy(a.flex_step)) for a in self._adapters)
        self._processed = processed
        now = self._iterations()
        self._clock, self._batches, self._last_batch = now, 0, -1
        self._record(now)
        self._ready = True
        self._next_due = self._next_due_after(processed)
        if self._next_due <= now:  # due before the checkpoint we resumed from
            self._advance(now)

    def _next_due_after(self, step):
        return next(iter(self._due_steps(step, self.total_steps)), float("inf"))

    def _advance(self, now):
        """Process every due reallocation step up to `now`; return the moves."""
        moves = 0
        due = list(self._due_steps(self._processed, now))
        for t in due:
            moves += self._reallocate(t, self.budget(t))
        if due:
            for adapter in self._adapters:
                adapter.flex_step.assign(now)
            self._processed = now
        self._next_due = self._next_due_after(max(self._processed, now))
        return moves

    def _reallocate(self, step, budget):
        adapters = self._adapters
        check_finite(adapters, f"at step {step}")
        importance = np.array([a.importance() for a in adapters])
        ranks = np.array([a.rank() for a in adapters])
        capacity = np.array([a.max_rank for a in adapters])
        b = min(budget, len(adapters) // 2)
        order = sorted(range(len(adapters)), key=lambda i: (importance[i], i))
        prune = [i for i in order if ranks[i] > 1][:b]
        expand = [i for i in reversed(order) if ranks[i] < capacity[i] and i not in prune]
        expand = sorted(expand, key=lambda i: (-importance[i], i))[:b]
        components = []
        moved = []
        for p, e in zip(prune, expand):
            if not importance[e] > importance[p]:
                break
            i_p = adapters[p].prune_component()
            i_e = adapters[e].expand_component()
            components += self._components(adapters[p], i_p) + self._components(adapters[e], i_e)
            ranks[p] -= 1
            ranks[e] += 1
            moved.append((p, e))
        if components:
            reset_optimizer_slots(self.model.optimizer, components)
        self._ranks = ranks
        self._record(step)
        if self.verbose > 1 and moved:
            pairs = ", ".join(f"{adapters[p].path} -> {adapters[e].path}" for p, e in moved)
            print(f"FlexLoRA step {step}: moved {len(moved)} (budget {budget}): {pairs}")
        return len(moved)

    @staticmethod
    def _components(adapter, index):
        return [
            (adapter.flex_a, 1, index),
            (adapter.flex_lambda, 0, index),
            (adapter.flex_b, 0, index),
        ]

    def _record(self, step):
        self._history_steps.append(int(step))
        self._history_ranks.append(self._ranks.copy())

    def _rank_logs(self, moves):
        r = self._ranks
        return {
            "flexlora/total_rank": int(r.sum()),
            "flexlora/min_rank": int(r.min()),
            "flexlora/max_rank": int(r.max()),
            "flexlora/moves": int(moves),
        }

    # Results ----------------------------------------------------------------------------
    @property
    def layer_names(self):
        """Paths of the adapted layers, in the order of the history columns."""
        return [a.path for a in self._adapters]

    def rank_history(self):
        """The active rank of every layer over time, for a heatmap (paper Fig. 2).

        One row at the start of each `fit` and one after every reallocation
        step this callback processed.

        Returns:
            A dict with `steps` (int array `(n,)`), `ranks` (int array
            `(n, layers)`) and `layers` (the layer paths).
        """
        width = len(self._adapters)
        ranks = np.array(self._history_ranks, dtype="int64").reshape(-1, width)
        return {
            "steps": np.array(self._history_steps, dtype="int64"),
            "ranks": ranks,
            "layers": self.layer_names,
        }

    @property
    def rank_pattern(self):
        """`{layer path: active rank}`, read from the model's adapters."""
        if self.model is None:
            raise ValueError(
                "This FlexLoRAScheduler has no model yet; pass it to `fit` first "
                "(or use `keras_adaptive_lora.methods.flexlora.rank_pattern(model)`)."
            )
        self._sync()
        return rank_pattern(self.model)

