"""The command lines of BUILD.md's "ImageNet on 8 GPUs or a TPU pod" with a remote model dir: ram://
(TensorFlow's in-memory file system, reached only through tf.io.gfile, as gs:// is) stands in for
gs://. A file written with plain open() or os calls would land in a local ./ram:/ folder instead.

ram:// lives in one process, so pretrain, linear_eval and export run in this process through the
command line's own entry point (flags parsed and reset around each call); the mirrored run with the
end-of-run report and export is a subprocess of its own. Both are slow.
"""

import json
import os

import keras
import pytest
import tensorflow as tf

from conftest import run_cli, run_nnclr


@pytest.fixture(autouse=True)
def keep_dtype_policy():
    """pretrain sets a global mixed-precision policy; later tests expect theirs back."""
    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)


def _files(model_dir):
    return {os.path.join(folder, name)[len(model_dir) + 1:]
            for folder, _, names in tf.io.gfile.walk(model_dir) for name in names}


@pytest.mark.slow  # 4 min on 2 busy cores: linear_eval reads the whole embedded split
def test_pretrain_linear_eval_export_with_a_remote_model_dir(embedded_data_dir, tmp_path,
                                                              monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    model_dir = f"ram://{tmp_path.name}/imagenet"
    code, _, err = run_cli(capsys, "pretrain", "--preset=tiny", f"--model_dir={model_dir}",
                          f"--data_dir={embedded_data_dir}", "--train_steps=2",
                          "--set", "run.report=false")
    assert code == 0, err[-3000:]
    code, _, err = run_cli(capsys, "linear_eval", f"--model_dir={model_dir}",
                          "--set", "eval.linear_epochs=1")
    assert code == 0, err[-3000:]
    result = json.loads(tf.io.gfile.GFile(f"{model_dir}/linear_eval.json").read())
    assert result["dataset"] == "embedded", result  # the run's own, read from the remote config
    code, _, err = run_cli(capsys, "export", f"--model_dir={model_dir}")
    assert code == 0, err[-3000:]
    written = _files(model_dir)
    assert {"config.json", "checkpoints/checkpoint", "checkpoints/ckpt-2.index",
            "linear_eval.json", "saved_model/saved_model.pb"} <= written, sorted(written)
    assert os.listdir(tmp_path) == []  # nothing went to a local ./ram:/ folder


@pytest.mark.slow
def test_mirrored_pretrain_with_report_and_export_to_a_remote_model_dir(embedded_data_dir,
                                                                        tmp_path):
    """The 8-GPU line's flags on 2 CPU replicas, in one process: train, report, export."""
    done = run_nnclr("pretrain", "--preset=tiny", "--strategy=mirrored", "--cpu_replicas=2",
                     "--model_dir=ram://run/imagenet", "--train_steps=2", cwd=tmp_path,
                     data_dir=embedded_data_dir, timeout=600)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    assert "ram://run/imagenet/saved_model" in done.stdout + done.stderr
    assert os.listdir(tmp_path) == []
