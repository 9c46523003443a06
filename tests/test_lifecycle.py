"""Never lose work, always a clear error: export, kill-and-resume, interrupts, changed settings,
model dirs on any filesystem, NaN stops, and bad input.

Pretraining is the "tiny" preset for a few steps. The command line runs in-process (cli.main, with
the flags parsed and reset around it) where only its message matters, and as a subprocess where a
process has to die: the SIGKILL and SIGTERM tests run `nnclr pretrain` (conftest.nnclr_command) and
tests/pretrain_until.py (the same command with a stop-and-wait hook). The user journeys from a
temporary working directory are in test_journeys_rundir.py.
"""

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import nnclr_command, run_cli, run_nnclr, start_until_line
from nnclr_tf import evaluate, export, modes, train
from nnclr_tf import config as cfg
from nnclr_tf.augment import view_augmenter
from nnclr_tf.callbacks import CSVLog
from nnclr_tf.data import pipeline, pretraining_dataset
from nnclr_tf.runs import RunDir, RunDirError, TrainingDivergedError

TESTS = os.path.dirname(os.path.abspath(__file__))
PRETRAIN_UNTIL = os.path.join(TESTS, "pretrain_until.py")


@pytest.fixture(scope="module", autouse=True)
def keep_dtype_policy():
    """pretrain sets a global mixed-precision policy; later test modules expect theirs back."""
    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)


@pytest.fixture(scope="module", name="data_dir")
def data_dir_fixture(embedded_data_dir):
    return embedded_data_dir  # prepared once per session, not by two subprocesses at once


def tiny(model_dir, data_dir, **overrides):
    values = {"run.model_dir": str(model_dir), "data.data_dir": data_dir, "run.report": "false"}
    values.update(overrides)
    return cfg.override(cfg.get_preset("tiny"), values)


@pytest.fixture(scope="module", name="trained")
def trained_fixture(tmp_path_factory, data_dir):
    """A model dir after 2 steps: checkpoints, config.json, saved_model/, nnclr.keras."""
    model_dir = tmp_path_factory.mktemp("trained") / "run"
    result = train.pretrain(tiny(model_dir, data_dir, **{"optim.train_steps": "2"}), verbose=0)
    return str(model_dir), result.model


def snapshot(folder):
    """{relative path: bytes} of every file under `folder`."""
    files = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, folder)] = handle.read()
    return files


def copy_run(trained, tmp_path):
    target = str(tmp_path / "run")
    shutil.copytree(trained[0], target)
    return target


def random_images(shape, seed):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# 1. Export -----------------------------------------------------------------------------------

def test_cli_export_reloads_by_both_routes_with_the_encoder_outputs(trained, tmp_path, capsys):
    output = str(tmp_path / "exported")
    code, _, err = run_cli(capsys, "export", f"--model_dir={trained[0]}", f"--output={output}")
    assert code == 0, err
    model, config = train.load_pretrained(trained[0])  # float32, as the export
    size = config.data.image_size
    loaded = tf.saved_model.load(output).signatures["serving_default"]
    layer = keras.layers.TFSMLayer(output, call_endpoint="serving_default")
    for shape in [(3, 20, 20, 1), (2, 37, 23, 1)]:
        images = random_images(shape, seed=shape[1])
        features = model.encode(export.preprocess_for_eval(images, size, channels=1)).numpy()
        embeddings = model.projection_head(features, training=False).numpy()
        embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
        for outputs in (loaded(images=tf.constant(images)), layer(images)):
            np.testing.assert_allclose(outputs["features"].numpy(), features, atol=1e-5)
            np.testing.assert_allclose(outputs["embeddings"].numpy(), embeddings, atol=1e-5)
    # The signature itself refuses another dtype or rank, saying what it expected.
    with pytest.raises(tf.errors.InvalidArgumentError, match="expected to be a uint8 tensor"):
        loaded(images=tf.zeros([1, 20, 20, 1], tf.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="must be 4-dimensional"):
        loaded(images=tf.zeros([20, 20, 1], tf.uint8))
    with pytest.raises(TypeError, match="dtype=tf.uint8"):
        layer(np.zeros([1, 20, 20, 1], np.float32))


def test_full_model_keras_file_loads_in_safe_mode_with_its_support_set(trained):
    model_dir, model = trained
    loaded = export.load_full_model(RunDir(model_dir).keras_file)  # safe_mode=True
    assert type(loaded).__name__ == "NNCLR"
    for name in ("embeddings", "labels", "count"):
        np.testing.assert_array_equal(getattr(loaded.support_set, name).numpy(),
                                      getattr(model.support_set, name).numpy())
    assert loaded.support_set.count.numpy() > 0
    images = np.random.default_rng(0).random((2, 16, 16, 1), np.float32)
    np.testing.assert_allclose(loaded.encode(images).numpy(), model.encode(images).numpy(),
                               atol=1e-6)


# 2. Resume -----------------------------------------------------------------------------------

def _batches(dataset, count):
    return [{key: value.numpy() for key, value in batch.items()} for batch in dataset.take(count)]


def _assert_same_batches(expected, actual):
    assert len(expected) == len(actual)
    for want, got in zip(expected, actual):
        assert sorted(want) == sorted(got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.fixture(name="image_folder")
def image_folder_fixture(tmp_path):
    """10 RGB PNGs in two class folders: 2.5 batches of 4, so batches straddle epochs."""
    rng = np.random.default_rng(0)
    for index in range(10):
        folder = tmp_path / "images" / f"class_{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        image = rng.integers(0, 256, (12 + index, 14, 3), dtype=np.uint8)
        tf.io.write_file(str(folder / f"{index}.png"), tf.io.encode_png(image))
    return str(tmp_path / "images")


@pytest.mark.parametrize("source", ["embedded", "embedded_uncached", "folder"])
def test_data_stream_from_a_step_matches_the_stream_that_got_there(
        source, data_dir, image_folder, monkeypatch):
    if source == "folder":  # images one by one, read encoded, epochs of 10 in batches of 4
        kwargs = {"dataset": image_folder, "batch_size": 4, "augment": "cifar"}
        start, count = 3, 3
    else:  # whole batches, the split cached in memory or read encoded again each epoch
        kwargs = {"dataset": "embedded", "data_dir": data_dir, "batch_size": 8,
                  "augment": "crops"}
        start, count = 5, 2
        if source == "embedded_uncached":
            monkeypatch.setattr(pipeline, "_CACHE_LIMIT_BYTES", 0)
    kwargs.update(image_size=8, seed=7, channels=3, shuffle_buffer=32)
    stream = _batches(pretraining_dataset(**kwargs), start + count)
    _assert_same_batches(stream[start:],
                         _batches(pretraining_dataset(initial_step=start, **kwargs), count))
    if source == "folder":
        other = _batches(pretraining_dataset(**dict(kwargs, seed=8)), 1)[0]
        assert not np.array_equal(other["view_1"], stream[0]["view_1"])


def test_seeded_views_are_a_function_of_the_seed_and_still_per_image():
    augmenter = view_augmenter(1, 8, preset="byol", channels=3, seed=1)
    images = np.repeat(np.random.default_rng(0).random((1, 12, 12, 3), np.float32), 4, axis=0)
    views = augmenter(images, seed=tf.constant([3, 4])).numpy()
    # Another layer (other generator seed) with the same call seed draws the same views.
    np.testing.assert_array_equal(
        view_augmenter(1, 8, preset="byol", channels=3, seed=2)(images, seed=tf.constant([3, 4])),
        views)
    assert not np.array_equal(augmenter(images, seed=tf.constant([3, 5])).numpy(), views)
    assert len({views[i].tobytes() for i in range(4)}) == 4  # one image, four different views


def _checkpoint_tensors(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if "OBJECT_GRAPH" not in name}


def _support_set(tensors, name):
    """The support set's `name` variable among a checkpoint's tensors (saved under one path)."""
    found = [value for key, value in tensors.items()
             if re.search(rf"support_set(/|\.S){name}/\.ATTRIBUTES", key)]
    assert len(found) == 1, sorted(tensors)
    return found[0]


def _run_until_blocked(command, timeout, stderr=subprocess.DEVNULL, **popen):
    """Starts `command`, waits for its "BLOCKED <step>" line; returns (process, step)."""
    process, line, _ = start_until_line(command, lambda line: line.startswith("BLOCKED"), timeout,
                                        stderr=stderr, **popen)
    return process, int(line.split()[1])


# 3: the neighbour is sampled, statelessly (slow: the default suite keeps top_k=1)
@pytest.mark.parametrize("top_k", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkilled_pretrain_resumes_and_ends_bit_identical(tmp_path, data_dir, top_k):
    common = ["--preset=tiny", f"--data_dir={data_dir}", "--train_steps=8",
              "--set=run.checkpoint_every_steps=2", "--set=run.deterministic=true",
              "--set=run.report=false", "--set=run.export=false", f"--set=model.top_k={top_k}"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    run_a, run_b = tmp_path / "uninterrupted", tmp_path / "killed"
    # The uninterrupted reference runs alongside the run that gets killed.
    with open(tmp_path / "a.log", "w") as log:
        reference = subprocess.Popen(
            [*nnclr_command(), "pretrain", *common, f"--model_dir={run_a}"],
            stdout=log, stderr=subprocess.STDOUT, env=env)
    hooked = [sys.executable, PRETRAIN_UNTIL, *common, f"--model_dir={run_b}"]
    try:
        process, blocked_at = _run_until_blocked(hooked + ["--block_at_step=3"], timeout=300)
        checkpoints = RunDir(str(run_b)).checkpoints
        last = tf.train.latest_checkpoint(checkpoints)
        assert last.endswith("-2"), last
        process.send_signal(signal.SIGKILL)  # mid-interval: step 3 is done but not saved
        assert process.wait() == -signal.SIGKILL
        saved = _checkpoint_tensors(last)

        probe = tmp_path / "resumed.npz"
        resumed = subprocess.run(hooked + [f"--probe={probe}"], capture_output=True, text=True,
                                 timeout=300, env=env)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        with np.load(probe, allow_pickle=False) as at_start:
            assert at_start["step"] == 2
            assert blocked_at - at_start["step"] <= 2  # at most one checkpoint interval redone
            for name in ("embeddings", "labels", "count"):
                np.testing.assert_array_equal(at_start[name], _support_set(saved, name))
    finally:
        assert reference.wait(timeout=300) == 0, (tmp_path / "a.log").read_text()[-3000:]

    final_a = _checkpoint_tensors(tf.train.latest_checkpoint(RunDir(str(run_a)).checkpoints))
    final_b = _checkpoint_tensors(tf.train.latest_checkpoint(checkpoints))
    assert _support_set(final_b, "count") == 8 * 16
    assert sorted(final_a) == sorted(final_b)
    different = [name for name in final_a if not np.array_equal(final_a[name], final_b[name])]
    assert not different, f"{len(different)} of {len(final_a)} tensors differ, e.g. {different[:3]}"


@pytest.mark.slow
def test_sigkill_at_random_moments_still_ends_bit_identical(tmp_path, data_dir):
    """Kills the run at seeded random moments (during checkpoint writes too), then finishes it."""
    common = ["--preset=tiny", f"--data_dir={data_dir}", "--train_steps=12",
              "--set=run.checkpoint_every_steps=1", "--set=run.deterministic=true",
              "--set=run.report=false", "--set=run.export=false"]
    run_nnclr("pretrain", *common, "--model_dir=a", cwd=tmp_path, check=True)
    killed = [*nnclr_command(), "pretrain", *common, "--model_dir=b"]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    checkpoints = RunDir(str(tmp_path / "b")).checkpoints
    rng = np.random.default_rng(0)
    steps_seen = []
    for _ in range(4):
        process = subprocess.Popen(killed, cwd=tmp_path, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, env=env)
        watchdog = threading.Timer(300, process.kill)  # a hung run ends the wait, and fails below
        watchdog.start()
        start = tf.train.latest_checkpoint(checkpoints)
        # Wait for one new checkpoint, then kill after a random extra moment (0 to 0.5 s).
        while tf.train.latest_checkpoint(checkpoints) == start and process.poll() is None:
            _wait(process, 0.02)
        _wait(process, rng.uniform(0.0, 0.5))
        watchdog.cancel()
        process.send_signal(signal.SIGKILL)
        process.wait()
        steps_seen.append(tf.train.latest_checkpoint(checkpoints))
    final = run_nnclr(*killed[len(nnclr_command()):], cwd=tmp_path)
    assert final.returncode == 0, final.stderr[-3000:]
    final_a = _checkpoint_tensors(tf.train.latest_checkpoint(RunDir(str(tmp_path / "a")).checkpoints))
    final_b = _checkpoint_tensors(tf.train.latest_checkpoint(checkpoints))
    different = [name for name in final_a if not np.array_equal(final_a[name], final_b[name])]
    assert not different, (steps_seen, different[:3])


def _wait(process, seconds):
    """Waits up to `seconds` for `process` to end (the moments between a run's steps)."""
    try:
        process.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        pass


# 2b. Interrupts, changed settings, model dirs anywhere ----------------------------------------

def _summary_steps(log_dir, tag):
    """The steps at which the TensorBoard event files under `log_dir` hold `tag`, in file order."""
    steps = []
    for path in sorted(tf.io.gfile.glob(f"{log_dir}/train/events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return steps


def _csv_rows(path):
    return list(csv.DictReader(io.StringIO(tf.io.gfile.GFile(path).read())))


def test_sigterm_mid_run_saves_that_step_and_the_same_command_resumes_there(tmp_path, data_dir):
    # No periodic checkpoint before the end: the one the run resumes from is the signal's.
    common = ["--preset=tiny", f"--data_dir={data_dir}", "--train_steps=6", "--model_dir=run",
              "--set=run.checkpoint_every_steps=100", "--set=run.report=false",
              "--set=run.export=false"]
    hooked = [sys.executable, PRETRAIN_UNTIL, *common]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")  # as `nnclr` sets it
    with open(tmp_path / "stopped.log", "w") as log:
        process, blocked_at = _run_until_blocked(hooked + ["--block_at_step=3"], timeout=300,
                                                 stderr=log, cwd=tmp_path, env=env)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    err = (tmp_path / "stopped.log").read_text()
    assert err.strip().splitlines()[-1] == \
        "nnclr pretrain: interrupted at step 3; the same command resumes", err[-2000:]
    assert "Traceback" not in err
    run_dir = RunDir(str(tmp_path / "run"))
    assert blocked_at == 3 and run_dir.latest_checkpoint().endswith("ckpt-3")

    resumed = subprocess.run(hooked + ["--probe=probe.npz"], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    with np.load(tmp_path / "probe.npz") as at_start:
        assert at_start["step"] == 3
    assert run_dir.latest_checkpoint().endswith("ckpt-6")
    # The logs continue: each step once in TensorBoard (Keras restarted at 1), rows at 3 and 6.
    assert _summary_steps(run_dir.tensorboard, "batch_loss") == [1, 2, 3, 4, 5, 6]
    assert _summary_steps(run_dir.tensorboard, "epoch_loss") == [3, 6]
    assert [row["step"] for row in _csv_rows(run_dir.csv_log)] == ["3", "6"]
    history = run_dir.config_history()
    assert [(h["from_step"], h["to_step"]) for h in history] == [(0, 6)]


def test_csv_log_continues_at_the_step_a_run_resumes_from(tmp_path):
    path = f"ram://{tmp_path.name}/training_log.csv"
    tf.io.gfile.GFile(path, "w").write("epoch,step,loss\n0,2,3.5\n1,4,3.0\n2,6,2.5\n")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.iterations.assign(4)  # killed after step 6's row, resumed from ckpt-4
    log = CSVLog(path)
    log.set_model(model)
    log.on_train_begin()
    model.optimizer.iterations.assign(6)
    log.on_epoch_end(2, {"loss": 2.25, "knn_top1": 0.5})
    assert _csv_rows(path) == [
        {"epoch": "0", "step": "2", "loss": "3.5", "knn_top1": "nan"},
        {"epoch": "1", "step": "4", "loss": "3.0", "knn_top1": "nan"},
        {"epoch": "2", "step": "6", "loss": "2.25", "knn_top1": "0.5"}]


def test_resume_with_other_settings_is_refused_naming_them_unless_allowed(
        trained, data_dir, tmp_path, capsys):
    model_dir = copy_run(trained, tmp_path)  # 2 steps of batch 16, seed 0, lr 1.0, no warm-up
    before = snapshot(model_dir)
    changed = ["--batch_size=8", "--train_steps=4", "--seed=3"]
    args = ["pretrain", "--preset=tiny", f"--model_dir={model_dir}", f"--data_dir={data_dir}",
            "--set=run.report=false", *changed]
    code, _, err = run_cli(capsys, *args)
    # The new cosine at step 2 of 4 is half its peak, 1.0 * 8 / 256; the old one ended at 0.
    rate = 0.5 * (1 + np.cos(np.pi * 2 / 4)) * 1.0 * 8 / 256
    assert_one_sentence(code, err, "pretrain", (
        f"holds a run at step 2 trained with other settings (optim.batch_size 16 -> 8, "
        f"optim.train_steps 2 -> 4, run.seed 0 -> 3): run with the same settings to resume it, "
        f"add --allow_config_change to continue it with the new ones (the learning-rate schedule "
        f"is then recomputed for 4 steps instead of 2: the rate at step 2 becomes {rate:.4g} "
        f"instead of 0, decaying to 0 at step 4), or use a new --model_dir."))
    assert snapshot(model_dir) == before

    code, _, err = run_cli(capsys, *args, "--allow_config_change")
    assert code == 0, err
    run_dir = RunDir(model_dir)
    assert run_dir.latest_checkpoint().endswith("ckpt-4")
    assert run_dir.read_claim()[0].optim.batch_size == 8
    history = run_dir.config_history()
    assert [(h["from_step"], h["to_step"], h["changed"]) for h in history] == [
        (0, 2, []),
        (2, 4, ["optim.batch_size 16 -> 8", "optim.train_steps 2 -> 4", "run.seed 0 -> 3"])]
    assert history[0]["config"]["optim"]["batch_size"] == 16


def test_a_relative_model_dir_finds_its_checkpoints(trained, tmp_path, monkeypatch):
    shutil.copytree(trained[0], tmp_path / "runs" / "x")
    monkeypatch.chdir(tmp_path)
    latest = RunDir("runs/x").latest_checkpoint()
    assert latest == os.path.join("runs", "x", "checkpoints", "ckpt-2")
    model, _ = train.load_pretrained("runs/x")
    np.testing.assert_array_equal(model.support_set.count.numpy(),
                                  trained[1].support_set.count.numpy())


def test_ram_model_dir_pretrain_knn_export_in_one_process(data_dir, tmp_path, monkeypatch):
    """ram:// behaves as a remote filesystem: a file written with open() would land in ./ram:/."""
    monkeypatch.chdir(tmp_path)
    model_dir = f"ram://{tmp_path.name}/run"
    config = cfg.override(cfg.get_preset("tiny"), {"run.model_dir": model_dir,
                                                   "data.data_dir": data_dir,
                                                   "optim.train_steps": "2"})
    result = train.pretrain(config, verbose=0)  # with the report: pictures, report.md, export
    knn = modes.knn(config)
    exported = modes.export(config)
    written = {os.path.join(folder, name)[len(model_dir) + 1:]
               for folder, _, names in tf.io.gfile.walk(model_dir) for name in names}
    expected = {"config.json", "config_history.jsonl", "training_log.csv", "report.json",
                "report.md", "training_curves.png", "neighbours.png", "knn.json", "knn.md",
                "nnclr.keras", "checkpoints/checkpoint", "checkpoints/ckpt-2.index",
                "saved_model/saved_model.pb", "saved_model/export.json"}
    assert expected <= written, sorted(written)
    assert any(name.startswith("logs/train/events.out.tfevents.") for name in written)
    assert os.listdir(tmp_path) == []  # no local ./ram:/ folder
    assert json.loads(tf.io.gfile.GFile(f"{model_dir}/knn.json").read())["top1"] == \
        pytest.approx(float(knn["top1"]))
    assert json.loads(tf.io.gfile.GFile(f"{model_dir}/report.json").read())["steps"] == \
        result.report["steps"] == 2
    features = export.load_encoder(exported["saved_model"])(random_images((2, 16, 16, 1), 0))
    assert features["features"].shape[0] == 2


def test_knn_prints_its_result_before_writing_it(trained, data_dir, tmp_path, capsys,
                                                 monkeypatch):
    model_dir = copy_run(trained, tmp_path)
    computed = []

    def disk_full(results, model_dir, name):  # the disk filled up after the writability check
        computed.append(results)
        raise RunDirError(f"Could not write '{model_dir}/{name}.json' (No space left on device); "
                          "free some space.")

    monkeypatch.setattr(evaluate, "write_results", disk_full)
    code, out, err = run_cli(capsys, "knn", f"--model_dir={model_dir}", f"--data_dir={data_dir}")
    assert_one_sentence(code, err, "knn", "(No space left on device)")
    assert len(computed) == 1 and evaluate.results_markdown(computed[0]).strip() in out, out


# 3. Numerical faults -------------------------------------------------------------------------

def test_poisoned_batch_stops_with_the_step_and_keeps_the_last_good_checkpoint(
        tmp_path, data_dir, monkeypatch):
    real = train.pretraining_dataset

    def poisoned(*args, initial_step=0, **kwargs):
        # Batch 4 of the stream (optimizer step 5) carries a NaN pixel in view 1.
        def poison(index, batch):
            view = batch["view_1"]
            nan = tf.tensor_scatter_nd_update(view, [[0, 0, 0, 0]], [float("nan")])
            return dict(batch, view_1=tf.where(tf.equal(index, 4), nan, view))
        stream = real(*args, initial_step=initial_step, **kwargs)
        return tf.data.Dataset.zip(tf.data.Dataset.counter(initial_step), stream).map(poison)

    monkeypatch.setattr(train, "pretraining_dataset", poisoned)
    model_dir = tmp_path / "run"
    config = tiny(model_dir, data_dir, **{"optim.train_steps": "8", "run.export": "false"})
    with pytest.raises(TrainingDivergedError, match=r"stopped at step 5: the loss is not finite "
                                                    r"\(NaN or Inf\)\. The last good checkpoint"):
        train.pretrain(config, verbose=0)
    checkpoints = RunDir(str(model_dir)).checkpoints
    assert tf.train.latest_checkpoint(checkpoints).endswith("-4")
    for name, value in _checkpoint_tensors(os.path.join(checkpoints, "ckpt-4")).items():
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.isfinite(value).all(), name
    assert not os.path.exists(RunDir(str(model_dir)).keras_file)  # nothing saved from NaN weights


# 4. Bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--set=optim.momentum=1.5"], "optim.momentum must be in [0, 1), got 1.5."),
    (["--queue_size=-1"], "model.queue_size must be > 0, got -1."),
    (["--dataset=no_such_dataset_xyz"], "Unknown dataset 'no_such_dataset_xyz'"),
    (["--backbone=resnet19"], "Unknown backbone 'resnet19'"),
    (["--preset=tinny"], "Unknown preset 'tinny'"),
    (["--image_size=8", "--set=model.cifar_stem=false"],
     "data.image_size=8 is too small for resnet18"),
    (["--set=model.projection_dim=8"], "holds a checkpoint of a different architecture "
                                       "(model.projection_dim)"),
    (["--image_size=20"], "different architecture (input shape (16, 16, 1) -> (20, 20, 1))"),
])
def test_bad_input_is_one_sentence_and_leaves_the_model_dir_alone(
        trained, data_dir, tmp_path, capsys, args, message):
    model_dir = copy_run(trained, tmp_path)
    before = snapshot(model_dir)
    preset = [] if any(a.startswith("--preset") for a in args) else ["--preset=tiny"]
    code, _, err = run_cli(capsys, "pretrain", *preset, f"--model_dir={model_dir}",
                           f"--data_dir={data_dir}", *args)
    assert_one_sentence(code, err, "pretrain", message)
    assert snapshot(model_dir) == before


def assert_one_sentence(code, err, mode, message):
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"nnclr {mode}: error: ") and message in last, err
    assert "Traceback" not in err


def _truncate(path):
    with open(path, "r+b") as handle:
        handle.truncate(os.path.getsize(path) // 2)


def _garble(path):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("model_checkpoint_path: {{{ not a checkpoint state")


@pytest.mark.parametrize("damage, file, message", [
    (_truncate, "ckpt-2.data-00000-of-00001", "could not be restored"),
    (_truncate, "ckpt-2.index", "could not be restored"),
    (_garble, "checkpoint", "The checkpoint list"),
])
def test_corrupted_checkpoint_is_refused_by_pretrain_and_export_and_kept(
        trained, data_dir, tmp_path, capsys, damage, file, message):
    model_dir = copy_run(trained, tmp_path)
    damage(os.path.join(model_dir, "checkpoints", file))
    before = snapshot(model_dir)
    code, _, err = run_cli(capsys, "pretrain", "--preset=tiny", f"--model_dir={model_dir}",
                           f"--data_dir={data_dir}", "--train_steps=2")  # the run's own settings
    assert_one_sentence(code, err, "pretrain", message)
    assert "corrupted" in err, err
    code, _, err = run_cli(capsys, "export", f"--model_dir={model_dir}")
    assert_one_sentence(code, err, "export", "corrupted")
    assert snapshot(model_dir) == before  # the damaged checkpoint and the old export are kept


def test_a_missing_latest_checkpoint_falls_back_to_the_one_before(trained, tmp_path):
    run_dir = RunDir(copy_run(trained, tmp_path))
    listing = os.path.join(run_dir.checkpoints, "checkpoint")
    with open(listing, "w", encoding="utf-8") as handle:  # ckpt-9 was moved away, say
        handle.write('model_checkpoint_path: "ckpt-9"\nall_model_checkpoint_paths: "ckpt-2"\n'
                     'all_model_checkpoint_paths: "ckpt-9"\n')
    assert run_dir.latest_checkpoint().endswith("ckpt-2")
    for name in os.listdir(run_dir.checkpoints):
        if name.startswith("ckpt-2."):
            os.remove(os.path.join(run_dir.checkpoints, name))
    with pytest.raises(cfg.ConfigError, match="are missing"):
        run_dir.latest_checkpoint()


def test_checkpoint_of_another_architecture_without_its_config_is_refused(
        trained, data_dir, tmp_path, capsys):
    model_dir = copy_run(trained, tmp_path)
    os.remove(RunDir(model_dir).config_file)  # nothing left to compare configs with
    before = snapshot(model_dir)
    code, _, err = run_cli(capsys, "pretrain", "--preset=tiny", f"--model_dir={model_dir}",
                           f"--data_dir={data_dir}", "--set=model.projection_dim=8")
    assert_one_sentence(code, err, "pretrain", "could not be restored")
    assert "from another model" in err
    assert snapshot(model_dir) == before


def test_corrupted_saved_model_and_keras_file_give_clear_errors(trained, tmp_path):
    model_dir = copy_run(trained, tmp_path)
    run_dir = RunDir(model_dir)
    data = [os.path.join(run_dir.saved_model, "variables", f)
            for f in os.listdir(os.path.join(run_dir.saved_model, "variables")) if ".data" in f]
    _truncate(data[0])
    with pytest.raises(ValueError, match="is not a readable encoder SavedModel"):
        export.load_encoder(run_dir.saved_model)
    _truncate(run_dir.keras_file)
    with pytest.raises(ValueError, match="Could not load the Keras model"):
        export.load_full_model(run_dir.keras_file)


# 5. Safety -----------------------------------------------------------------------------------

def test_no_pickle_and_keras_files_load_in_safe_mode_by_default():
    import inspect  # pylint: disable=import-outside-toplevel

    import nnclr_tf  # pylint: disable=import-outside-toplevel
    package = os.path.dirname(os.path.abspath(nnclr_tf.__file__))
    for parent, _, names in os.walk(package):
        for name in (n for n in names if n.endswith(".py")):
            with open(os.path.join(parent, name), encoding="utf-8") as handle:
                text = handle.read()
            for unsafe in ("import pickle", "allow_pickle=True", "safe_mode=False", "cloudpickle"):
                assert unsafe not in text, f"{name} uses {unsafe}"
    assert inspect.signature(export.load_full_model).parameters["safe_mode"].default is True
