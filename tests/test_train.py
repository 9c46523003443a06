"""The pretraining job: segments, resume, refusing another architecture, stopping on NaN."""

import csv
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from nnclr_tf import config as cfg
from nnclr_tf import train
from nnclr_tf.runs import TrainingDivergedError


def tiny(tmp_path, **overrides):
    values = {"run.model_dir": str(tmp_path / "run"), "data.data_dir": str(tmp_path.parent / "tfds"),
              "run.report": "false", "run.export": "false"}
    values.update(overrides)
    return cfg.override(cfg.get_preset("tiny"), values)


class PlanSegmentsTest(parameterized.TestCase):

    @parameterized.parameters(
        (0, 30, 10, [(0, 3, 10)]),
        (0, 25, 10, [(0, 2, 10), (2, 3, 5)]),
        (13, 30, 10, [(1, 2, 7), (2, 3, 10)]),
        (13, 15, 10, [(1, 2, 2)]),
        (30, 30, 10, []),
    )
    def test_segments_cover_the_remaining_steps_once(self, start, total, per_epoch, expected):
        segments = train.plan_segments(start, total, per_epoch)
        self.assertEqual(segments, expected)
        self.assertEqual(sum((e - i) * s for i, e, s in segments), total - start)


def support_set_rows(model):
    return np.array(model.support_set.embeddings.numpy())


def test_second_run_resumes_from_the_checkpoint(tmp_path):
    first = train.pretrain(tiny(tmp_path, **{"optim.train_steps": "4"}), verbose=0)
    assert int(first.model.optimizer.iterations.numpy()) == 4
    saved_queue = support_set_rows(first.model)
    assert np.abs(saved_queue).sum() > 0

    resumed_at = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            resumed_at["step"] = int(self.model.optimizer.iterations.numpy())
            resumed_at["queue"] = support_set_rows(self.model)

    longer = {"optim.train_steps": "6", "run.allow_config_change": "true"}  # an explicit act
    second = train.pretrain(tiny(tmp_path, **longer), verbose=0,
                            callbacks=[Probe()])
    assert resumed_at["step"] == 4
    np.testing.assert_array_equal(resumed_at["queue"], saved_queue)
    assert int(second.model.optimizer.iterations.numpy()) == 6
    assert tf.train.latest_checkpoint(os.path.join(tmp_path, "run", "checkpoints")).endswith("-6")


def test_float16_loss_scale_is_checkpointed_and_resumed(tmp_path):
    """Under mixed_float16, compile wraps the optimizer in a LossScaleOptimizer: its dynamic loss
    scale is optimizer state, saved with the checkpoint and restored on resume."""
    overrides = {"run.mixed_precision": "mixed_float16"}
    train.pretrain(tiny(tmp_path, **overrides, **{"optim.train_steps": "2"}), verbose=0)
    reader = tf.train.load_checkpoint(str(tmp_path / "run" / "checkpoints"))
    keys = [k for k in reader.get_variable_to_shape_map() if "dynamic_scale" in k]
    assert keys, sorted(reader.get_variable_to_shape_map())[:20]
    saved = float(reader.get_tensor(keys[0]))
    resumed = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            resumed["scale"] = float(self.model.optimizer.dynamic_scale.numpy())

    longer = {"optim.train_steps": "3", "run.allow_config_change": "true"}
    train.pretrain(tiny(tmp_path, **overrides, **longer), verbose=0,
                   callbacks=[Probe()])
    assert resumed["scale"] == saved


def test_model_dir_of_another_architecture_is_refused_and_kept(tmp_path):
    train.pretrain(tiny(tmp_path, **{"optim.train_steps": "2"}), verbose=0)
    config_file = tmp_path / "run" / "config.json"
    before = config_file.read_text()
    with pytest.raises(cfg.ConfigError, match=r"different architecture \(model.projection_dim"):
        train.pretrain(tiny(tmp_path, **{"model.projection_dim": "8"}), verbose=0)
    assert config_file.read_text() == before


def test_image_size_too_small_for_the_backbone_is_refused_before_training(tmp_path):
    # Refused by the config itself, before pretrain is reached.
    with pytest.raises(cfg.ConfigError, match="data.image_size=8 is too small for resnet18"):
        tiny(tmp_path, **{"data.image_size": "8", "model.cifar_stem": "false"})
    assert not (tmp_path / "run").exists()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    class Poison(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if int(self.model.optimizer.iterations.numpy()) == 3:
                kernel = self.model.encoder.trainable_variables[0]
                kernel.assign(tf.fill(kernel.shape, float("nan")))

    config = tiny(tmp_path, **{"optim.train_steps": "8"})
    with pytest.raises(TrainingDivergedError, match="stopped at step 4: the loss is not finite"):
        train.pretrain(config, verbose=0, callbacks=[Poison()])
    latest = tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert latest.endswith("-2")
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.isfinite(value).all(), name


def test_knn_monitor_writes_knn_top1_into_the_training_log(tmp_path):
    config = tiny(tmp_path, **{"optim.train_steps": "2", "eval.knn_every_epochs": "1"})
    result = train.pretrain(config, verbose=0)
    knn = result.history["knn_top1"][-1]
    # 10 balanced classes: chance is 0.1. Conv features, trained for 2 steps or not, put images of
    # one Fashion-MNIST class near each other far more often; misaligned labels would sit at chance.
    assert knn > 0.3, knn
    with open(tmp_path / "run" / "training_log.csv", newline="") as log:
        rows = list(csv.DictReader(log))
    assert float(rows[-1]["knn_top1"]) == pytest.approx(knn, abs=1e-6)
