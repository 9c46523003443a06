"""The model directory of a run: its config, checkpoints, logs, export and report, and never losing them.

Layout of `run.model_dir`:
    config.json            the config and input shape of the run (a different architecture is refused)
    checkpoints/           tf.train checkpoints of model (with its support set) and optimizer
    logs/                  TensorBoard events;  training_log.csv: per-epoch metrics
    saved_model/           the exported encoder (serving signature);  nnclr.keras: the full model
    report.json, report.md, training_curves.png, neighbours.png
"""

from __future__ import annotations

import json
import logging
import math
import os

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf.config import Config, ConfigError, from_dict

log = logging.getLogger("nnclr_tf")

# Fields that change the shape of the saved variables: a model dir refuses a run that changes them.
ARCHITECTURE_FIELDS = ("backbone", "width_multiplier", "cifar_stem", "projection_hidden_dims",
                       "projection_dim", "prediction_hidden_dims", "queue_size", "online_probe")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint was kept."""


def write_json(path: str, values) -> None:
    """Writes JSON atomically (a crash never leaves a half-written file)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(values, handle, indent=2, sort_keys=True, default=_jsonable)
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    return str(value)


class RunDir:
    def __init__(self, model_dir: str):
        self.path = model_dir
        self.config_file = os.path.join(model_dir, "config.json")
        self.checkpoints = os.path.join(model_dir, "checkpoints")
        self.tensorboard = os.path.join(model_dir, "logs")
        self.csv_log = os.path.join(model_dir, "training_log.csv")
        self.saved_model = os.path.join(model_dir, "saved_model")
        self.keras_file = os.path.join(model_dir, "nnclr.keras")

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def check_claim(self, config: Config, input_shape, num_classes: int) -> None:
        """Raises ConfigError if the model dir is a file or holds checkpoints of another architecture."""
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ConfigError(f"run.model_dir {self.path!r} is a file, not a directory; choose another path.")
        if os.path.exists(self.config_file) and self.latest_checkpoint(warn=False):
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

    def record_claim(self, config: Config, input_shape, num_classes: int) -> None:
        os.makedirs(self.path, exist_ok=True)
        write_json(self.config_file, {"config": config.to_dict(), "input_shape": list(input_shape),
                                      "num_classes": num_classes})

    def latest_checkpoint(self, warn: bool = True) -> str | None:
        """The newest listed checkpoint whose files exist, or None before the first one.

        Raises ConfigError when the list (checkpoints/checkpoint) is unreadable or names only
        missing checkpoints: a run must not silently start over beside them.
        """
        listing = os.path.join(self.checkpoints, "checkpoint")
        if not tf.io.gfile.exists(listing):
            return None
        state = tf.train.get_checkpoint_state(self.checkpoints)  # None when unparsable
        if state is None or not state.model_checkpoint_path:
            raise ConfigError(
                f"The checkpoint list {listing!r} is unreadable; it may be corrupted: write into it "
                'model_checkpoint_path: "ckpt-N" for the newest ckpt-N.index beside it, or use a new '
                "--model_dir.")
        listed = [state.model_checkpoint_path, *reversed(state.all_model_checkpoint_paths)]
        for path in listed:
            path = path if os.path.isabs(path) else os.path.join(self.checkpoints, path)
            if tf.io.gfile.exists(path + ".index"):
                if path != listed[0] and warn:
                    log.warning("Checkpoint %s is missing; using the older %s.", listed[0], path)
                return path
        raise ConfigError(
            f"The checkpoints listed in {listing!r} are missing ({', '.join(listed)}); put them "
            "back, or use a new --model_dir.")

    def read_claim(self) -> tuple[Config, tuple[int, int, int], int]:
        try:
            with open(self.config_file, encoding="utf-8") as handle:
                saved = json.load(handle)
            return from_dict(saved["config"]), tuple(saved["input_shape"]), int(saved["num_classes"])
        except FileNotFoundError:
            raise ConfigError(f"Model dir {self.path!r} holds no config.json; "
                              "is it the --model_dir of a pretraining run?") from None
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

    def export(self, model, input_shape) -> str:
        from nnclr_tf.export import export_encoder
        export_encoder(model.encoder, self.saved_model, image_size=input_shape[0],
                       channels=input_shape[-1], projection_head=model.projection_head, overwrite=True)
        return self.saved_model

    def save_model(self, model) -> str:
        from nnclr_tf.export import save_full_model
        save_full_model(model, self.keras_file)
        return self.keras_file


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


class CheckpointCallback(keras.callbacks.Callback):
    """Saves every `every_steps` optimizer steps; stops, without saving, when the loss is not finite."""

    def __init__(self, manager: tf.train.CheckpointManager, every_steps: int):
        super().__init__()
        self.manager = manager
        self.every_steps = every_steps
        self.diverged_at = None

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.diverged_at = step
            self.model.stop_training = True
            return
        if step % self.every_steps == 0:
            save_checkpoint(self.manager, self.model)


def save_checkpoint(manager: tf.train.CheckpointManager, model: keras.Model) -> None:
    """Saves at the current step, unless the weights hold NaN/Inf (then the old checkpoints stay)."""
    step = int(model.optimizer.iterations.numpy())
    if not weights_finite(model):
        log.error("Not saving step %d: the weights are not finite.", step)
        return
    latest = manager.latest_checkpoint  # may name one whose files were moved away: save again
    if latest is None or not latest.endswith(f"-{step}") or not tf.io.gfile.exists(latest + ".index"):
        manager.save(checkpoint_number=step)
