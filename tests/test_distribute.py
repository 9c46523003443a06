"""Distributed training: strategies, replicated support sets, global-batch gradients, XLA, precision.

Every distributed run is a process of its own (tests/distributed_worker.py): logical CPUs must be
set before TensorFlow starts, and TF 2.21 fails a second MirroredStrategy in a process where one
has trained. The runs train NNCLR for a few global batches of 16 on 2 logical CPUs, on two worker
processes, or on one device, and the tests compare what they saved.

Tolerances. A one-device run and a distributed one compute the same sums in different orders, so
they agree to float32 rounding, amplified by Keras' synchronised batch norm, whose variance
E[x^2] - E[x]^2 cancels where the features' mean is large against their spread (mean^2 / var
reaches 70 at the first projection BN here); measured, at most 3.3e-6 after 4 steps. The comparisons
use an encoder with smooth activations: with ReLUs, an input within rounding of 0 switches its
gradient on or off with the summation order. That is not distribution: two one-device runs of the
ResNet-18 stem, one with each global batch's rows permuted, differ by 6e-3 in the stem after one
SGD step (lr 1) from a single activation that is 0.0 in one run and 2.4e-7 in the other.
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import run_loopback_workers, tiny_encoder
from nnclr_tf import config as cfg
from nnclr_tf import distribute
from nnclr_tf.model import NNCLR

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_worker.py")
STEPS = 4
GLOBAL_BATCH = 16
QUEUE_SIZE = 40
TOLERANCE = 1e-5
RUN_ARGS = [f"--steps={STEPS}", "--learning_rate=0.1"]


def run_worker(*args, timeout=300):
    """Runs the worker to completion (or kills it at `timeout`); fails the test with its output."""
    result = subprocess.run([sys.executable, WORKER, *args], capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
                            check=False)
    assert result.returncode == 0 and "WORKER_OK" in result.stdout, result.stderr[-4000:]


class Run:
    """What a worker saved: weights in model order, support-set copies, per-step logs."""

    def __init__(self, path):
        with np.load(path) as saved:
            self.arrays = {k: saved[k] for k in saved.files}
        self.names = list(self.arrays["weight_names"])
        self.weights = [self.arrays[f"weight/{i:03d}"] for i in range(len(self.names))]
        self.initial = [self.arrays.get(f"initial/{i:03d}") for i in range(len(self.names))]
        self.logs = json.loads(str(self.arrays["logs"]))
        self.replicas = int(self.arrays["replicas"])

    def copies(self, name):
        """Every local replica's copy of support-set variable `name`."""
        return [v for k, v in sorted(self.arrays.items()) if k.startswith(f"queue/{name}/")]

    def ordered(self):
        return self.arrays["ordered"]


def assert_same_training(got, want, atol=TOLERANCE):
    """Weights (queue included), and every step's logs, equal to `atol`."""
    assert got.names == want.names
    for name, a, b in zip(got.names, got.weights, want.weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=name)
    np.testing.assert_array_equal(got.copies("labels")[0], want.copies("labels")[0])
    np.testing.assert_array_equal(got.copies("count")[0], want.copies("count")[0])
    assert len(got.logs) == len(want.logs) == STEPS
    for step, (a, b) in enumerate(zip(got.logs, want.logs)):
        assert a.keys() == b.keys()
        for key in a:
            assert abs(a[key] - b[key]) <= atol, (step, key, a[key], b[key])


@pytest.fixture(scope="module", name="mirrored")
def mirrored_fixture(tmp_path_factory):
    """(2-replica MirroredStrategy run, one-device run on the same global batches)."""
    path = str(tmp_path_factory.mktemp("mirrored") / "run.npz")
    run_worker("mirrored", path, *RUN_ARGS)
    return Run(path), Run(path.replace(".npz", ".single.npz"))


def test_mirrored_strategy_equals_one_device_on_the_global_batch(mirrored):
    """One test, so that the fixture's run happens once even when pytest-xdist splits the module."""
    run, single = mirrored
    assert (run.replicas, single.replicas) == (2, 1)
    # The replicas' copies of the queue are bitwise equal ...
    for name in ("embeddings", "labels", "count"):
        copies = run.copies(name)
        assert len(copies) == 2
        np.testing.assert_array_equal(copies[0], copies[1], err_msg=name)
    # ... and hold the newest QUEUE_SIZE samples, oldest first, in global order: labels are sample
    # ids, and global batch s is replica 0's rows (ids s * 16 + 0..7), then replica 1's (+ 8..15).
    count = int(run.copies("count")[0])
    assert count == STEPS * GLOBAL_BATCH
    labels = run.copies("labels")[0]
    np.testing.assert_array_equal(np.roll(labels, -(count % QUEUE_SIZE)),
                                  np.arange(count - QUEUE_SIZE, count))
    # Weights, queue and every step's logs equal the one-device run's.
    assert_same_training(run, single)
    np.testing.assert_allclose(run.ordered(), single.ordered(), rtol=0, atol=TOLERANCE)
    # The check has teeth: training moved the weights far more than the tolerance.
    moved = max(np.abs(w - i).max() for name, w, i in zip(single.names, single.weights, single.initial)
                if not name.startswith("support_set/"))
    assert moved > 1000 * TOLERANCE, moved


def test_xla_step_with_the_tpu_write_mode_matches_no_xla(tmp_path):
    """jit_compile=True, queue written by whole-buffer assign (TPU's mode), one device."""
    path = str(tmp_path / "xla.npz")
    run_worker("xla", path, *RUN_ARGS, "--write_mode=assign")
    xla, plain = Run(path), Run(path.replace(".npz", ".nojit.npz"))
    assert bool(xla.arrays["jit_compile"]) and not bool(plain.arrays["jit_compile"])
    assert_same_training(xla, plain)


@pytest.mark.slow
def test_mirrored_assign_write_mode_trains_bitwise_like_scatter(mirrored, tmp_path):
    """TPU's write mode under MirroredStrategy: writes are exact, so nothing else may change."""
    path = str(tmp_path / "assign.npz")
    run_worker("mirrored", path, *RUN_ARGS, "--write_mode=assign")
    assign, scatter = Run(path), mirrored[0]
    np.testing.assert_array_equal(*assign.copies("embeddings"))
    assert_same_training(assign, scatter, atol=0)


def run_two_workers(tmp_path, tag, args_for, expect_success=True):
    """Two MultiWorkerMirroredStrategy workers (TF_CONFIG on 127.0.0.1, index 0 the chief) running
    `distributed_worker.py *args_for(index)`, TMPDIR tmp_path/tmp<index>; killed after 300 s.
    Returns their outputs."""
    def scratch(index):
        (tmp_path / f"tmp{index}").mkdir(exist_ok=True)
        return {"TMPDIR": str(tmp_path / f"tmp{index}")}

    results = run_loopback_workers([[sys.executable, WORKER, *args_for(index)] for index in range(2)],
                                   scratch, [tmp_path / f"{tag}{index}.log" for index in range(2)], 300)
    outputs = [output for _, output in results]
    for (code, output) in results:
        succeeded = code == 0 and "WORKER_OK" in output
        assert succeeded == expect_success, output[-4000:]
    return outputs


@pytest.mark.slow
def test_two_workers_match_mirrored_strategy(mirrored, tmp_path):
    """MultiWorkerMirroredStrategy, two processes on 127.0.0.1, = MirroredStrategy on 2 CPUs."""
    paths = [str(tmp_path / f"worker{index}.npz") for index in range(2)]
    run_two_workers(tmp_path, "worker", lambda index: ["multi_worker", paths[index], *RUN_ARGS])
    first, second = Run(paths[0]), Run(paths[1])
    assert first.replicas == second.replicas == 2
    for name in ("embeddings", "labels", "count"):  # the two workers' copies, bitwise
        np.testing.assert_array_equal(first.copies(name)[0], second.copies(name)[0])
    run, _ = mirrored
    assert_same_training(first, run)


@pytest.mark.slow
def test_two_workers_share_one_model_dir_and_resume_together(tmp_path):
    """train.pretrain on two workers with one model dir: the chief writes it, both resume from it;
    workers that read different copies of it stop with a clear error instead of diverging."""
    model_dir = tmp_path / "run"

    def pretrain(tag, steps, model_dirs=(model_dir, model_dir)):
        def args_for(index):
            return ["pretrain", str(tmp_path / f"{tag}{index}.npz"), f"--steps={steps}",
                    f"--model_dir={model_dirs[index]}", f"--data_dir={tmp_path / f'tfds{index}'}",
                    "--strategy=multi_worker"]
        return args_for

    run_two_workers(tmp_path, "first", pretrain("first", 4))
    first = [Run(tmp_path / f"first{index}.npz") for index in range(2)]
    assert [int(run.arrays["end_step"]) for run in first] == [4, 4]
    np.testing.assert_array_equal(first[0].copies("embeddings")[0], first[1].copies("embeddings")[0])
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-4")
    assert (model_dir / "config.json").is_file() and (model_dir / "nnclr.keras").is_file()
    # The other worker saved into a scratch folder under its TMPDIR, deleted at the end.
    assert not list((tmp_path / "tmp1").glob("nnclr_worker_checkpoints_*"))

    run_two_workers(tmp_path, "second", pretrain("second", 6))
    second = [Run(tmp_path / f"second{index}.npz") for index in range(2)]
    for run in second:
        assert int(run.arrays["start_step"]) == 4 and int(run.arrays["end_step"]) == 6
        np.testing.assert_array_equal(run.arrays["start_queue"], first[0].copies("embeddings")[0])

    outputs = run_two_workers(tmp_path, "third", pretrain("third", 8, (model_dir, tmp_path / "copy")),
                              expect_success=False)
    for output in outputs:
        assert "resume from different steps" in output, output[-4000:]


def pretrain_run(tmp_path, name, steps, *args):
    path = str(tmp_path / f"{name}.npz")
    run_worker("pretrain", path, f"--steps={steps}", f"--model_dir={tmp_path / 'run'}",
               f"--data_dir={tmp_path.parent / 'tfds'}", *args, timeout=400)
    return Run(path)


@pytest.mark.slow
def test_checkpoint_of_two_replicas_restores_on_one_and_continues(tmp_path):
    """train.pretrain on 2 logical CPUs for 4 steps, then the same model_dir on one device."""
    first = pretrain_run(tmp_path, "two", 4, "--strategy=mirrored", "--cpu_replicas=2")
    assert first.replicas == 2 and int(first.arrays["end_step"]) == 4
    np.testing.assert_array_equal(*first.copies("embeddings"))
    second = pretrain_run(tmp_path, "one", 6, "--strategy=default")
    assert second.replicas == 1
    assert int(second.arrays["start_step"]) == 4
    assert int(second.arrays["start_count"]) == int(first.copies("count")[0]) == 4 * GLOBAL_BATCH
    np.testing.assert_array_equal(second.arrays["start_queue"], first.copies("embeddings")[0])
    assert int(second.arrays["end_step"]) == 6
    assert int(second.copies("count")[0]) == 6 * GLOBAL_BATCH
    assert all(np.isfinite(step["loss"]) for step in second.logs)


@pytest.mark.slow
def test_cli_pretrains_on_two_cpu_replicas(tmp_path):
    command = [sys.executable, "-m", "nnclr_tf", "pretrain", "--preset=tiny", "--cpu_replicas=2",
               "--strategy=mirrored", f"--model_dir={tmp_path / 'run'}",
               f"--data_dir={tmp_path / 'tfds'}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "2 replica(s)" in result.stderr
    assert tf.train.latest_checkpoint(str(tmp_path / "run" / "checkpoints")).endswith("-4")
    assert (tmp_path / "run" / "saved_model").is_dir()


# In-process checks: no strategy of more than one replica is needed.

def test_strategy_names():
    assert distribute.get_strategy("default") is tf.distribute.get_strategy()
    with pytest.raises(cfg.ConfigError, match="Unknown strategy 'gpu'"):
        distribute.get_strategy("gpu")


def test_multi_worker_without_tf_config_is_refused(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(cfg.ConfigError, match="needs the TF_CONFIG"):
        distribute.get_strategy("multi_worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(cfg.ConfigError, match="TF_CONFIG is not valid JSON"):
        distribute.get_strategy("auto")


def test_auto_without_hints_or_cluster_is_one_device(monkeypatch):
    for name in ("TF_CONFIG", "TPU_NAME", "COLAB_TPU_ADDR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distribute, "_TPU_DEVICE_FILES", ())
    assert distribute.get_strategy("auto") is tf.distribute.get_strategy()


def test_split_cpu_after_tensorflow_started_says_so():
    tf.config.list_logical_devices("CPU")  # starts the devices, if nothing did yet
    with pytest.raises(cfg.ConfigError, match="must be set before TensorFlow starts"):
        distribute.split_cpu(len(tf.config.list_logical_devices("CPU")) + 1)


def test_precision_per_platform(monkeypatch):
    assert distribute.resolve_precision("float32") == "float32"
    monkeypatch.setattr(distribute, "is_tpu", lambda strategy: True)
    strategy = tf.distribute.get_strategy()
    assert distribute.resolve_precision("auto", strategy) == "mixed_bfloat16"
    with pytest.raises(cfg.ConfigError, match="mixed_float16 does not run on TPUs"):
        distribute.resolve_precision("mixed_float16", strategy)
    monkeypatch.setattr(distribute, "is_tpu", lambda strategy: False)
    monkeypatch.setattr(tf.config, "list_physical_devices",
                        lambda kind=None: ["gpu"] if kind == "GPU" else [])
    assert distribute.resolve_precision("auto", strategy) == "mixed_float16"
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: [])
    monkeypatch.setattr(distribute, "cpu_has_amx", lambda: True)
    assert distribute.resolve_precision("auto", strategy) == "mixed_bfloat16"
    monkeypatch.setattr(distribute, "cpu_has_amx", lambda: False)
    assert distribute.resolve_precision("auto", strategy) == "float32"


def _one_step(policy, batch, optimizer):
    keras.mixed_precision.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        model = NNCLR(tiny_encoder((16, 16, 3)), projection_hidden_dims=(16,), projection_dim=8,
                      prediction_hidden_dims=(16,), queue_size=32)
        model.compile(optimizer=optimizer)
        before = [v.numpy() for v in model.trainable_variables]
        logs = model.train_on_batch(batch, return_dict=True)
        moved = [v.numpy() - b for v, b in zip(model.trainable_variables, before)]
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    return model, logs, moved


def test_mixed_float16_step_is_loss_scaled():
    """GPU's policy, run here on CPU. Keras' compile wraps the optimizer in a LossScaleOptimizer;
    train_step scales the loss with it, the optimizer unscales the gradients: the update equals
    float32's to fp16 precision (unscaled, it would be 256 times too small)."""
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        model = NNCLR(tiny_encoder((16, 16, 3)), projection_hidden_dims=(16,), projection_dim=8,
                      prediction_hidden_dims=(16,), queue_size=32)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)

    rng = np.random.default_rng(0)
    batch = {"view_1": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32),
             "view_2": rng.uniform(size=(8, 16, 16, 3)).astype(np.float32)}
    # A small initial scale, so that the first step's float16 gradients do not overflow (with
    # Keras' default 2**15 they do, and the loss-scale optimizer skips the step and halves it).
    scaled = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=256.0)
    model, logs, moved = _one_step("mixed_float16", batch, scaled)
    _, want_logs, want = _one_step("float32", batch, keras.optimizers.SGD(0.1))
    assert model.encoder.layers[1].compute_dtype == "float16"
    assert int(model.optimizer.step_counter.numpy()) == 1  # finite gradients: the step was applied
    assert float(model.optimizer.dynamic_scale.numpy()) == 256.0
    assert abs(logs["loss"] - want_logs["loss"]) < 1e-2
    # Each weight's update, as a whole, within 10 % of float32's (measured: at most 4.6 %; an
    # unscaled update would be off by 100 %, a doubly scaled one by 25,500 %). Not element by element:
    # one of a thousand float16 values lands 5 % of the tensor's largest away, depending on the CPU.
    for got, expected in zip(moved, want):
        error = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert error < 0.1, (got.shape, error)
