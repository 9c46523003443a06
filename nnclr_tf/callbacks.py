"""The Keras callbacks that keep a pretraining run's logs continuous and its work safe.

    with StopOnSignal() as stop:                       # SIGINT / SIGTERM: stop at a step boundary
        with stop.training():
            model.fit(..., callbacks=[stop, CSVLog(run_dir.csv_log), TensorBoard(run_dir.tensorboard)])
        if stop.signum:                                # save a checkpoint, then
            raise stop.interrupted(step)               # "interrupted at step N; the same command resumes"

CSVLog and TensorBoard write at the optimizer step, so a run resumed from a checkpoint continues its
training_log.csv and its TensorBoard curves instead of starting them again at 0.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import signal
import threading

import keras
import tensorflow as tf

from nnclr_tf.runs import exists, read_text, save_checkpoint, write_text

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _step(model) -> int:
    return int(model.optimizer.iterations.numpy())


class CSVLog(keras.callbacks.Callback):
    """training_log.csv, one row per epoch: "epoch", "step" (the optimizer step after it), the logs.

    Written through tf.io.gfile (the whole file each epoch, so object stores need no append). A
    resumed run continues the file: rows past the step it resumes from, work redone after a kill,
    are dropped. A column that appears later (e.g. knn_top1) is added; earlier rows read "nan".
    """

    def __init__(self, path: str):
        super().__init__()
        self.path = path
        self.columns: list[str] = []
        self.rows: list[dict] = []

    def on_train_begin(self, logs=None):
        start = _step(self.model)
        self.columns, self.rows = ["epoch", "step"], []
        if exists(self.path):
            reader = csv.DictReader(io.StringIO(read_text(self.path)))
            self.columns += [c for c in reader.fieldnames or () if c not in self.columns]
            # Rows from before the step column have no step: kept.
            self.rows = [row for row in reader if not row.get("step") or int(row["step"]) <= start]

    def on_epoch_end(self, epoch, logs=None):
        row = {"epoch": epoch, "step": _step(self.model)}
        for key, value in (logs or {}).items():
            try:
                row[key] = float(value)
            except (TypeError, ValueError):
                row[key] = str(value)
        self.columns += sorted(key for key in row if key not in self.columns)
        self.rows.append(row)
        text = io.StringIO()
        writer = csv.DictWriter(text, self.columns, restval="nan", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        write_text(self.path, text.getvalue())


class TensorBoard(keras.callbacks.TensorBoard):
    """keras.callbacks.TensorBoard with batch and epoch summaries at the optimizer step.

    Keras counts batches from 0 in every `fit` call and writes epoch summaries at the epoch index,
    so a resumed run (or the second `fit` of one run) drew over its own curves.
    Keras also counts one batch per call, which is one execution of steps_per_execution steps:
    batch summaries are stamped at the step ending their execution, and written (update_freq=N)
    for the executions that reach or pass a multiple of N.
    """

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._global_train_batch = self._epoch_start = _step(self.model)
        self._first_step = None

    def on_epoch_begin(self, epoch, logs=None):
        super().on_epoch_begin(epoch, logs)
        self._epoch_start = self._global_train_batch

    def on_train_batch_begin(self, batch, logs=None):
        steps = (self.params or {}).get("steps") or math.inf
        per_execution = getattr(self.model, "steps_per_execution", 1) or 1
        self._first_step = self._epoch_start + batch + 1
        # on_train_batch_begin adds 1
        self._global_train_batch = self._epoch_start + min(batch + per_execution, steps) - 1
        super().on_train_batch_begin(batch, logs)

    def _push_writer(self, writer, step):
        first = getattr(self, "_first_step", None)
        if self.update_freq == "epoch" or writer is not self._train_writer or first is None:
            return super()._push_writer(writer, step)
        every = self.update_freq
        context = (writer.as_default(step),
                   self.summary.record_if(lambda: step // every > (first - 1) // every))
        self._prev_summary_state.append(context)
        for part in context:
            part.__enter__()
        return None

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(_step(self.model), logs)


class CheckpointCallback(keras.callbacks.Callback):
    """Saves a checkpoint every `every_steps` steps; stops, without saving, when the loss is not finite.

    Keras calls `on_train_batch_end` once per execution of `steps_per_execution` steps. The rule:
    a checkpoint is saved at the end of the first execution that reaches or passes each multiple
    of every_steps, so exactly at the multiples when steps_per_execution divides every_steps (or
    is 1), else at most steps_per_execution - 1 steps after them. The step is counted here on the
    host (the optimizer step is read once per `fit`). The loss is read back (a read waits for the
    device, so the host queues no step past it) by the same rule every `loss_check_steps` steps,
    and before each checkpoint. It is the epoch's running mean, so a NaN at any earlier step
    shows in it: the divergence is reported at the step of the read, no checkpoint is saved from
    it, and the last good one is kept.
    """

    def __init__(self, manager: tf.train.CheckpointManager, every_steps: int,
                 loss_check_steps: int = 1):
        super().__init__()
        self.manager = manager
        self.every_steps = every_steps
        self.loss_check_steps = loss_check_steps
        self.diverged_at = None
        self.step = 0  # the optimizer step after the last execution, counted on the host
        self._epoch_start = 0

    def on_train_begin(self, logs=None):
        self.step = self._epoch_start = _step(self.model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = self.step

    def on_train_batch_end(self, batch, logs=None):
        # `batch`: the index of the execution's last step in the epoch; Keras gives
        # begin + steps_per_execution - 1 also for a shorter last execution, hence min().
        steps = self.params.get("steps") if self.params else None
        previous = self.step
        self.step = self._epoch_start + (min(batch + 1, steps) if steps else batch + 1)
        save = self.step // self.every_steps > previous // self.every_steps
        check = self.step // self.loss_check_steps > previous // self.loss_check_steps
        loss = (logs or {}).get("loss") if save or check else None
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = self.step
            self.model.stop_training = True
        elif save:
            save_checkpoint(self.manager, self.model)

    def on_epoch_end(self, epoch, logs=None):
        loss = (logs or {}).get("loss")
        if self.diverged_at is None and loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = self.step
            self.model.stop_training = True


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run. `step`: the step of the checkpoint saved at the stop (None
    when it stopped elsewhere). `exit_code`: the shell's 128 + signal, 130 (SIGINT) or 143 (SIGTERM)."""

    def __init__(self, signum: int, step: int | None = None):
        self.signum, self.step, self.exit_code = signum, step, 128 + signum
        super().__init__(f"interrupted at step {step}; the same command resumes" if step is not None
                         else "interrupted; the same command resumes from the last checkpoint")


class StopOnSignal(keras.callbacks.Callback):
    """While entered: SIGINT (Ctrl-C) and SIGTERM (schedulers, preemptible VMs) inside `training()`
    stop `fit` after the step that is running and set `signum`, for the caller to save a checkpoint
    and raise `interrupted(step)`; anywhere else, or a second time, they raise TrainingInterrupted
    at once. Handlers are installed only from the main thread (Python's rule) and with `install`.
    """

    def __init__(self, install: bool = True):
        super().__init__()
        self.install = install
        self.signum = None
        self._deferring = False
        self._previous = {}

    def __enter__(self):
        if self.install and threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in _SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @contextlib.contextmanager
    def training(self):
        self._deferring = True
        try:
            yield self
        finally:
            self._deferring = False

    def interrupted(self, step: int) -> TrainingInterrupted:
        return TrainingInterrupted(self.signum, step)

    def _handle(self, signum, frame):
        del frame
        if not self._deferring or self.signum is not None:
            raise TrainingInterrupted(signum)
        self.signum = signum
        if self.model is not None:
            self.model.stop_training = True  # fit checks it after the step that is running

    def on_train_batch_end(self, batch, logs=None):
        if self.signum is not None:
            self.model.stop_training = True  # each fit call starts with stop_training = False
