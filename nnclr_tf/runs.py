"""The model directory of a run: its config, checkpoints, logs, export and report, and never losing them.

Layout of `run.model_dir` (any path tf.io.gfile takes: relative, absolute, gs://, ram://):
    config.json            the config and input shape of the run (a different architecture is refused)
    config_history.jsonl   every config the run was trained with, one line each, with its step range
    checkpoints/           tf.train checkpoints of model (with its support set) and optimizer
    logs/                  TensorBoard events;  training_log.csv: per-epoch metrics and step
    saved_model/           the exported encoder (serving signature);  nnclr.keras: the full model
    report.json, report.md, training_curves.png, neighbours.png

Every read and write goes through tf.io.gfile (`write_json`, `write_text`, `read_json`, ...), so a
model dir on a remote filesystem behaves as a local one.
"""

from __future__ import annotations

import json
import logging
import os
import re
import uuid

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf.config import Config, ConfigError, from_dict

log = logging.getLogger("nnclr_tf")

# Fields that change the shape of the saved variables: a model dir refuses a run that changes them.
ARCHITECTURE_FIELDS = ("backbone", "width_multiplier", "cifar_stem", "projection_hidden_dims",
                       "projection_dim", "prediction_hidden_dims", "queue_size", "online_probe")
# Fields a resumed run may change silently: where data and outputs live, how steps are executed and
# what is written beside the checkpoints (and every eval.* field). Any other field changes what is
# learned, so resuming with another value needs run.allow_config_change (--allow_config_change).
FREE_FIELDS = ("data.data_dir", "data.download", "data.eval_train_split", "data.eval_split",
               "run.model_dir", "run.strategy", "run.cpu_replicas", "run.jit_compile",
               "run.deterministic", "run.checkpoint_every_steps", "run.steps_per_execution",
               "run.keep_checkpoints", "run.log_every_steps", "run.export", "run.report",
               "run.allow_config_change")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint was kept."""


class RunDirError(RuntimeError):
    """A file of the model dir could not be written (read-only, full, no permission)."""


def exists(path: str) -> bool:
    return tf.io.gfile.exists(path)


def _outermost_missing(path: str) -> str | None:
    """The outermost folder of the local `path` that does not exist yet (None if `path` exists, or
    is remote: object stores have no folders to leave behind)."""
    if "://" in path:
        return None
    path, missing = os.path.abspath(path), None
    while not os.path.exists(path):
        missing, parent = path, os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return missing


def makedirs(path: str) -> None:
    """Creates `path` and its parents, if missing (a no-op on object stores)."""
    tf.io.gfile.makedirs(path)


def read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as handle:
        return handle.read()


def read_json(path: str):
    return json.loads(read_text(path))


def write_text(path: str, text: str) -> None:
    """Writes `text` atomically (a crash never leaves a half-written file); creates the folder.

    Raises RunDirError with one sentence when the filesystem refuses the write.
    """
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        parent = os.path.dirname(path)
        if parent:
            makedirs(parent)
        with tf.io.gfile.GFile(tmp, "w") as handle:
            handle.write(text)
        tf.io.gfile.rename(tmp, path, overwrite=True)
    except (tf.errors.OpError, OSError) as error:
        if tf.io.gfile.exists(tmp):
            tf.io.gfile.remove(tmp)
        raise RunDirError(f"Could not write {path!r} ({_reason(error)}); free some space or make "
                          "the folder writable, or choose another --model_dir.") from error


def write_json(path: str, values) -> None:
    """Writes `values` as indented JSON through write_text (NumPy scalars and tensors included)."""
    write_text(path, json.dumps(values, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "numpy"):  # a tf.Tensor
        return np.asarray(value).tolist()
    return str(value)


def _reason(error: Exception) -> str:
    """The OS's words for a failed file operation: "Read-only file system", "Permission denied"."""
    text = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
    return str(text).strip().splitlines()[0].rpartition("; ")[2] or type(error).__name__


class RunDir:
    def __init__(self, model_dir: str):
        self.path = model_dir
        self.config_file = os.path.join(model_dir, "config.json")
        self.history_file = os.path.join(model_dir, "config_history.jsonl")
        self.checkpoints = os.path.join(model_dir, "checkpoints")
        self.tensorboard = os.path.join(model_dir, "logs")
        self.csv_log = os.path.join(model_dir, "training_log.csv")
        self.saved_model = os.path.join(model_dir, "saved_model")
        self.keras_file = os.path.join(model_dir, "nnclr.keras")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check_writable(self) -> None:
        """Raises ConfigError unless a file can be created in the model dir (call before any work)."""
        probe = self.file(f".write-probe-{uuid.uuid4().hex[:8]}")
        created = _outermost_missing(self.path)
        try:
            makedirs(self.path)
            with tf.io.gfile.GFile(probe, "w") as handle:
                handle.write("nnclr")
            tf.io.gfile.remove(probe)
        except (tf.errors.OpError, OSError) as error:
            raise ConfigError(
                f"Model dir {self.path!r} is not writable ({_reason(error)}); make it writable or "
                "free some space, or choose another --model_dir.") from error
        finally:
            # The folders the probe made go again: a run refused later (unknown dataset, ...)
            # leaves no empty model dir behind. Every later write makes its folder itself.
            if created is not None and tf.io.gfile.isdir(created):
                tf.io.gfile.rmtree(created)

    def check_claim(self, config: Config, input_shape, num_classes: int) -> Config | None:
        """Raises ConfigError if the model dir is a file or holds checkpoints of another architecture.

        Returns the config its checkpoints were trained with (None for a new run).
        """
        if exists(self.path) and not tf.io.gfile.isdir(self.path):
            raise ConfigError(f"run.model_dir {self.path!r} is a file, not a directory; choose another path.")
        if not (exists(self.config_file) and self.latest_checkpoint(warn=False)):
            return None
        old_config, old_shape, old_classes = self.read_claim()
        changed = [f"model.{name}" for name in ARCHITECTURE_FIELDS
                   if getattr(old_config.model, name) != getattr(config.model, name)]
        if tuple(old_shape) != tuple(input_shape):
            changed.append(f"input shape {tuple(old_shape)} -> {tuple(input_shape)}")
        if old_classes != num_classes and config.model.online_probe:
            changed.append(f"number of classes {old_classes} -> {num_classes}")
        if changed:
            raise ConfigError(
                f"Model dir {self.path!r} holds a checkpoint of a different architecture "
                f"({', '.join(changed)}); use a new --model_dir or the original settings.")
        return old_config

    def record_claim(self, config: Config, input_shape, num_classes: int, step: int = 0) -> None:
        """Writes config.json (the config the next step is trained with) and opens its line in
        config_history.jsonl at `step`."""
        if not exists(self.history_file) and exists(self.config_file) and step > 0:
            self.record_history(self.read_claim()[0], 0, step)  # a run from before the history
        self.record_history(config, step, step)
        write_json(self.config_file, {"config": config.to_dict(), "input_shape": list(input_shape),
                                      "num_classes": num_classes})

    def config_history(self) -> list[dict]:
        """[{"from_step", "to_step", "config", "changed"}, ...], oldest first ([] for none)."""
        if not exists(self.history_file):
            return []
        return [json.loads(line) for line in read_text(self.history_file).splitlines() if line.strip()]

    def record_history(self, config: Config, from_step: int, to_step: int) -> None:
        """Extends the last line of config_history.jsonl to `to_step` when it holds the same trained
        settings as `config`; otherwise adds a line [from_step, to_step] naming what changed."""
        entries = self.config_history()
        previous = from_dict(entries[-1]["config"]) if entries else None
        if previous is not None and not changed_settings(previous, config):
            entries[-1]["to_step"] = max(int(entries[-1]["to_step"]), to_step)
        else:
            entries.append({"from_step": from_step, "to_step": to_step, "config": config.to_dict(),
                            "changed": changed_settings(previous, config) if previous else []})
        write_text(self.history_file, "".join(
            json.dumps(entry, sort_keys=True, default=_jsonable) + "\n" for entry in entries))

    def latest_checkpoint(self, warn: bool = True) -> str | None:
        """The newest listed checkpoint whose files exist, or None before the first one.

        Raises ConfigError when the list (checkpoints/checkpoint) is unreadable or names only
        missing checkpoints: a run must not silently start over beside them.
        """
        listing = os.path.join(self.checkpoints, "checkpoint")
        if not exists(listing):
            return None
        # Relative entries come back joined to the checkpoints folder, as given (relative, gs://).
        state = tf.train.get_checkpoint_state(self.checkpoints)  # None when unparsable
        if state is None or not state.model_checkpoint_path:
            raise ConfigError(
                f"The checkpoint list {listing!r} is unreadable; it may be corrupted: write into it "
                'model_checkpoint_path: "ckpt-N" for the newest ckpt-N.index beside it, or use a new '
                "--model_dir.")
        listed = list(dict.fromkeys([state.model_checkpoint_path,
                                     *reversed(state.all_model_checkpoint_paths)]))
        for path in listed:
            if exists(path + ".index"):
                if path != listed[0] and warn:
                    log.warning("Checkpoint %s is missing; using the older %s.", listed[0], path)
                return path
        raise ConfigError(
            f"The checkpoints listed in {listing!r} are missing ({', '.join(listed)}); put them "
            "back, or use a new --model_dir.")

    def read_claim(self) -> tuple[Config, tuple[int, int, int], int]:
        if not exists(self.config_file):
            raise ConfigError(f"Model dir {self.path!r} holds no config.json; "
                              "is it the --model_dir of a pretraining run?")
        try:
            saved = read_json(self.config_file)
            return from_dict(saved["config"]), tuple(saved["input_shape"]), int(saved["num_classes"])
        except (ValueError, KeyError, TypeError) as error:
            raise ConfigError(f"{self.config_file!r} is not a valid run config ({error}); "
                              "it may be corrupted.") from error

    def checkpoint_manager(self, model, optimizer, keep: int = 3,
                           directory: str | None = None) -> tf.train.CheckpointManager:
        """A manager saving into `directory` (default: the run's checkpoints/); `restore` always
        reads the run's own checkpoints."""
        # Build the optimizer's slots now so a restore fills them instead of deferring.
        optimizer.build(model.trainable_variables)
        self.latest_checkpoint(warn=False)  # a damaged list: the clear error, not the manager's
        return tf.train.CheckpointManager(model_checkpoint(model, optimizer),
                                          directory or self.checkpoints, max_to_keep=keep)

    def restore(self, manager: tf.train.CheckpointManager) -> int:
        """Restores the latest checkpoint, if any; returns the step it was taken at (0 if none)."""
        latest = self.latest_checkpoint()
        if latest is None:
            return 0
        restore_checkpoint(manager.checkpoint, latest)
        step = int(manager.checkpoint.optimizer.iterations.numpy())
        log.info("Resumed from %s at step %d.", latest, step)
        return step

    def export(self, model, input_shape, path: str | None = None, overwrite: bool = True) -> str:
        """The one export of a run (end of pretraining and `nnclr export`): the encoder and its
        projection head served in float32 at `path` (default saved_model/); returns the path."""
        from nnclr_tf.export import export_encoder
        path = path or self.saved_model
        export_encoder(model.encoder, path, image_size=input_shape[0], channels=input_shape[-1],
                       projection_head=model.projection_head, overwrite=overwrite,
                       info={"model_dir": self.path})
        return path

    def save_model(self, model) -> str:
        from nnclr_tf.export import save_full_model
        save_full_model(model, self.keras_file)
        return self.keras_file


def _trained_fields(config: Config) -> dict[str, object]:
    """{"section.field": value} of every field that changes what is learned (not FREE_FIELDS)."""
    return {f"{section}.{name}": value for section, values in config.to_dict().items()
            for name, value in values.items()
            if section != "eval" and f"{section}.{name}" not in FREE_FIELDS}


def changed_settings(old: Config, new: Config) -> list[str]:
    """["optim.batch_size 16 -> 32", ...]: the trained fields in which `new` differs from `old`."""
    before, after = _trained_fields(old), _trained_fields(new)
    show = lambda value: repr(value) if isinstance(value, str) else str(value)  # noqa: E731
    return [f"{key} {show(before[key])} -> {show(after[key])}" for key in after
            if before.get(key) != after[key]]


def checkpoint_step(path: str) -> int:
    """The optimizer step of checkpoint `path` (".../ckpt-N": saved with checkpoint_number=step)."""
    return int(re.search(r"-(\d+)$", path).group(1))


def model_checkpoint(model: keras.Model, optimizer=None) -> tf.train.Checkpoint:
    """A tf.train.Checkpoint of every weight of `model` (and the optimizer's state, if given).

    Besides the model itself, the weights are listed by their Keras path: layers that a layer keeps
    in a Python list (the heads' hidden Dense/BN layers) are not in TensorFlow's object graph, so
    without the list their BN statistics would be neither saved nor restored.
    """
    weights = {}
    for index, variable in enumerate(model.weights):
        # Without the model's own name, which Keras numbers per process ("nnclr_1/...").
        key = variable.path.removeprefix(f"{model.name}/")
        weights[key if key not in weights else f"{key}#{index}"] = variable
    if optimizer is None:
        return tf.train.Checkpoint(model=model, weights=weights)
    return tf.train.Checkpoint(model=model, weights=weights, optimizer=optimizer)


def restore_checkpoint(checkpoint: tf.train.Checkpoint, path: str) -> None:
    """Restores `path` into `checkpoint`, every model weight included, or raises ConfigError."""
    try:
        checkpoint.restore(path).assert_existing_objects_matched().expect_partial()
    except Exception as error:  # a damaged file raises OpError, ValueError, IndexError, ...
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ConfigError(
            f"Checkpoint {path!r} could not be restored ({type(error).__name__}: {detail}); it may "
            "be corrupted or from another model: move its files away to resume from the one "
            "before, or use a new --model_dir.") from error


def weights_finite(model: keras.Model) -> bool:
    """True when no floating weight (BN statistics and support set included) is NaN or Inf."""
    return all(bool(tf.reduce_all(tf.math.is_finite(v.value))) for v in model.weights
               if v.dtype.startswith(("float", "bfloat")))


def save_checkpoint(manager: tf.train.CheckpointManager, model: keras.Model) -> None:
    """Saves at the current step, unless the weights hold NaN/Inf (then the old checkpoints stay)."""
    step = int(model.optimizer.iterations.numpy())
    if not weights_finite(model):
        log.error("Not saving step %d: the weights are not finite.", step)
        return
    latest = manager.latest_checkpoint  # may name one whose files were moved away: save again
    if latest is None or not latest.endswith(f"-{step}") or not tf.io.gfile.exists(latest + ".index"):
        manager.save(checkpoint_number=step)
