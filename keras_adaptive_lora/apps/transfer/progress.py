"""The transfer job's progress output: one line per stage (per method,
pre-training), kept up to date in place on a terminal.

`Status.update(text)` rewrites the current line (only when the job logs
with `print` to a terminal; elsewhere, e.g. a log file or a test's `log`,
nothing is written), `Status.done(text)` replaces it with the final line,
which goes to `log`. `EpochStatus` is the Keras callback that updates it
once per epoch with the run's progress and an estimate of the time left.
"""

import shutil
import sys
import time

import keras


class Status:
    """A single status line.

    Args:
        log: where finished lines go (`print` by default).
        live: whether to draw the in-place line on `sys.stdout`. Defaults to
            None: when `log` is `print` and stdout is a terminal.
    """

    def __init__(self, log=print, live=None):
        self.log = log
        if live is None:
            live = log is print and hasattr(sys.stdout, "isatty") and sys.stdout.isatty()
        self.live = bool(live)
        self._shown = 0

    def update(self, text):
        if not self.live:
            return
        width = max(20, shutil.get_terminal_size((100, 20)).columns - 1)
        text = text[:width]
        sys.stdout.write("\r" + text.ljust(self._shown))
        sys.stdout.flush()
        self._shown = len(text)

    def clear(self):
        if self.live and self._shown:
            sys.stdout.write("\r" + " " * self._shown + "\r")
            sys.stdout.flush()
        self._shown = 0

    def done(self, text):
        self.clear()
        self.log(text)


def clock(seconds):
    """`"42s"`, `"3m05s"`."""
    seconds = int(round(seconds))
    return f"{seconds}s" if seconds < 60 else f"{seconds // 60}m{seconds % 60:02d}s"


class EpochStatus(keras.callbacks.Callback):
    """Updates `status` after each epoch: `prefix`, the work done of the
    whole stage (`done_before + epochs so far` of `total` epochs) and the
    estimated time left.

    Args:
        status: a `Status`.
        prefix: the start of the line, e.g. `"[3/7] lora: seed 2/3"`.
        total: epochs of the whole stage (all seeds).
        done_before: epochs of the stage already run before this `fit`.
        started: `time.perf_counter()` at the start of the stage.
    """

    def __init__(self, status, prefix, *, total, done_before=0, started=None):
        super().__init__()
        self.status, self.prefix = status, prefix
        self.total, self.done_before = int(total), int(done_before)
        self.started = time.perf_counter() if started is None else started

    def on_epoch_end(self, epoch, logs=None):
        done = self.done_before + epoch + 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (self.total - done)
        self.status.update(
            f"{self.prefix}, epoch {done}/{self.total}, {clock(elapsed)} so far, ~{clock(left)} left"
        )
