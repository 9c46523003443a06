"""Shared test helpers: a tiny encoder and the layer round trip.

Test modules (pytest or absl parameterized.TestCase) import them with
`from conftest import tiny_encoder, round_trip`; pytest puts tests/ on sys.path.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

# The kernels the `nnclr` command runs (nnclr_tf.cli.run sets this before TensorFlow loads).
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import keras  # noqa: E402  (after the environment TensorFlow reads once)
import numpy as np
import pytest
from absl import flags

from nnclr_tf import cli


def tiny_encoder(input_shape=(16, 16, 3), width=8, name="tiny_encoder"):
    """A small conv Functional model: images [batch, H, W, C] -> pooled features [batch, 2*width].

    Made of Keras core layers only, so it saves and loads with safe_mode.
    """
    images = keras.Input(shape=tuple(input_shape), name="images")
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(images)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(2 * width, 3, strides=2, padding="same", use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    features = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(images, features, name=name)


def _numpy(x):
    return x.numpy() if hasattr(x, "numpy") else np.asarray(x)


def _as_numpy(outputs):
    return [_numpy(o) for o in keras.tree.flatten(outputs)]


def assert_weights_equal(expected, actual):
    """Bit-for-bit equality of two weight lists (names and values)."""
    assert len(expected) == len(actual), (len(expected), len(actual))
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(_numpy(e), _numpy(a), err_msg=str(getattr(e, "path", "")))


def round_trip(layer, inputs, directory=None, atol=1e-6, **call_kwargs):
    """Build and call `layer`, then check get_config/from_config and a `.keras` save/load.

    Args:
      layer: a Keras layer (built or not).
      inputs: a NumPy batch to call it on.
      directory: a writable folder (pytest tmp_path); a temporary one when None.
    Returns:
      The layer reloaded from the `.keras` file.
    """
    inputs = np.asarray(inputs)
    expected = _as_numpy(layer(inputs, **call_kwargs))

    clone = layer.__class__.from_config(layer.get_config())
    clone(inputs, **call_kwargs)  # builds the weights
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == layer.get_config()
    for e, a in zip(expected, _as_numpy(clone(inputs, **call_kwargs))):
        np.testing.assert_allclose(a, e, atol=atol)

    symbolic = keras.Input(shape=inputs.shape[1:], dtype=str(inputs.dtype))
    wrapper = keras.Model(symbolic, layer(symbolic, **call_kwargs))
    with tempfile.TemporaryDirectory(dir=directory) as folder:
        path = os.path.join(folder, f"{layer.name}.keras")
        wrapper.save(path)
        loaded = keras.saving.load_model(path, safe_mode=True)
    assert_weights_equal(wrapper.weights, loaded.weights)
    for e, a in zip(expected, _as_numpy(loaded(inputs))):
        np.testing.assert_allclose(a, e, atol=atol)
    reloaded = [l for l in loaded.layers if l.name == layer.name]
    assert len(reloaded) == 1 and type(reloaded[0]) is type(layer), loaded.layers
    return reloaded[0]


def nnclr_command():
    """The installed `nnclr` console script beside this interpreter (`python -m nnclr_tf` without one)."""
    script = shutil.which("nnclr", path=os.path.dirname(sys.executable))
    return [script] if script else [sys.executable, "-m", "nnclr_tf"]


def run_nnclr(*args, cwd, data_dir=None, timeout=600, env=None, check=False):
    """Runs `nnclr *args` as a user types it: a subprocess whose working directory is `cwd`, so
    relative paths in `args` resolve there. Returns the CompletedProcess (text stdout / stderr).

    `data_dir` becomes TFDS_DATA_DIR (where TFDS looks when no --data_dir is given), so tests share
    one prepared copy of the embedded data instead of writing into ~/tensorflow_datasets.
    """
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env or {}))
    if data_dir is not None:
        environment["TFDS_DATA_DIR"] = str(data_dir)
    done = subprocess.run([*nnclr_command(), *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=environment, stdin=subprocess.DEVNULL, check=False)
    if check:
        assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.fixture(scope="session", name="embedded_data_dir")
def embedded_data_dir_fixture(tmp_path_factory):
    """A TFDS data_dir holding the prepared embedded dataset, shared by the whole session (per worker)."""
    from nnclr_tf.data import dataset_info
    data_dir = tmp_path_factory.getbasetemp() / "tfds_embedded"
    dataset_info("embedded", data_dir=str(data_dir))
    return str(data_dir)


@pytest.fixture(name="tiny_encoder")
def tiny_encoder_fixture():
    """pytest fixture form: returns the `tiny_encoder` builder."""
    return tiny_encoder


@pytest.fixture(name="round_trip")
def round_trip_fixture():
    """pytest fixture form: returns the `round_trip` helper."""
    return round_trip


@pytest.fixture(autouse=True)
def float32_policy():
    """Every test starts and ends with the float32 policy: `train.pretrain` sets the global Keras
    dtype policy (mixed_bfloat16 on AMX CPUs), which would leak into the next test in the process."""
    keras.mixed_precision.set_dtype_policy("float32")
    yield
    keras.mixed_precision.set_dtype_policy("float32")


def run_cli(capsys, *args):
    """`nnclr *args` in this process, for its message only (a subprocess costs a TensorFlow import):
    (exit code, stdout, stderr)."""
    try:
        argv = flags.FLAGS(["nnclr", *args])
        try:
            cli.main(argv)
            code = 0
        except SystemExit as stop:
            code = stop.code
    finally:
        flags.FLAGS.unparse_flags()
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def free_ports(count):
    """`count` free TCP ports on 127.0.0.1 (for workers of a loopback cluster)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_loopback_workers(commands, env_for, logs, timeout, cwd=None):
    """One process per command, as the workers of a MultiWorkerMirroredStrategy cluster on
    127.0.0.1 (TF_CONFIG set; index 0 the chief), each writing stdout and stderr to its log, stdin
    closed; all killed `timeout` seconds after the start. `env_for(index)` gives each worker's extra
    environment. Returns [(exit code, output)] per worker."""
    workers = [f"127.0.0.1:{port}" for port in free_ports(len(commands))]
    processes = []
    for index, command in enumerate(commands):
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **env_for(index), TF_CONFIG=json.dumps(
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}))
        log = open(logs[index], "w", encoding="utf-8")  # pylint: disable=consider-using-with
        processes.append((subprocess.Popen(  # pylint: disable=consider-using-with
            command, cwd=None if cwd is None else str(cwd), env=env, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
    deadline = time.monotonic() + timeout
    try:
        for process, _ in processes:
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            log.close()
    return [(process.returncode, log_path.read_text(encoding="utf-8"))
            for (process, _), log_path in zip(processes, logs)]


def start_until_line(command, until, timeout, stream="stdout", **popen):
    """Starts `command` (text mode, `stream` piped; other Popen arguments in `popen`) and reads
    `stream` until a line for which `until(line)` is true. Returns (process, that line, the lines
    before it); the caller reads the rest and waits. A command that ends first fails the test; one
    that neither prints the line nor ends is killed after `timeout` seconds (the test fails, not the
    suite)."""
    process = subprocess.Popen(command, text=True, **{stream: subprocess.PIPE}, **popen)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    before = []
    try:
        for line in getattr(process, stream):
            if until(line):
                return process, line, before
            before.append(line)
    finally:
        watchdog.cancel()
    raise AssertionError(f"{command} ended (exit {process.wait()}) without the line awaited; its "
                         f"last lines: {before[-10:]}")
