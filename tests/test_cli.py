"""The `nnclr` command end to end in a subprocess, and its one-sentence errors."""

import json
import os
import subprocess
import sys
import time

import pytest


def nnclr(*args, timeout=600):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run([sys.executable, "-m", "nnclr_tf", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_pretrain_evaluate_export_end_to_end(tmp_path):
    model_dir, data_dir = str(tmp_path / "run"), str(tmp_path / "tfds")
    common = [f"--model_dir={model_dir}", f"--data_dir={data_dir}"]
    done = nnclr("pretrain", "--preset=tiny", *common)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    for encoder in ("trained", "random_init"):
        assert 0.0 <= report[encoder]["knn_top1"] <= 1.0
        assert 0.0 <= report[encoder]["linear_top1"] <= 1.0
    assert "kNN top-1" in done.stdout and "random init" in done.stdout
    assert os.path.isfile(os.path.join(model_dir, "saved_model", "saved_model.pb"))
    assert os.path.isfile(os.path.join(model_dir, "nnclr.keras"))
    for picture in ("training_curves.png", "neighbours.png"):
        with open(os.path.join(model_dir, picture), "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    events = [f for _, _, files in os.walk(os.path.join(model_dir, "logs")) for f in files]
    assert any(f.startswith("events.out.tfevents") for f in events)

    knn = nnclr("knn", *common)
    assert knn.returncode == 0, knn.stderr[-3000:]
    assert "knn" in knn.stdout.lower()
    exported = nnclr("export", *common, f"--output={tmp_path / 'exported'}")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert os.path.isfile(tmp_path / "exported" / "saved_model.pb")


@pytest.mark.parametrize("flag, message", [
    ("--queue_size=-1", "model.queue_size must be > 0, got -1."),
    ("--dataset=no_such_dataset_xyz", "no_such_dataset_xyz"),
    ("--backbone=resnet19", "Unknown backbone 'resnet19'"),
    ("--set=model.top_k", "must look like section.field=value"),
])
def test_bad_flag_values_exit_quickly_with_one_sentence(tmp_path, flag, message):
    started = time.monotonic()
    done = nnclr("pretrain", "--preset=tiny", f"--model_dir={tmp_path / 'run'}",
                 f"--data_dir={tmp_path / 'tfds'}", flag, timeout=120)
    assert done.returncode != 0
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_unknown_mode_is_a_usage_error():
    done = nnclr("pretrian", timeout=60)
    assert done.returncode != 0
    assert "Expected one mode" in done.stderr
