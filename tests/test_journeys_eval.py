"""Evaluation as a user meets it: the installed `nnclr`, run from a working directory with relative
paths. One tiny run pretrained on two CPU replicas with the end-of-run report on serves every test.
"""

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import run_nnclr

MODEL_DIR = "runs/two"


@pytest.fixture(scope="module", name="run")
def two_replica_run(tmp_path_factory, embedded_data_dir):
    """(cwd, data_dir, pretrain process) of `nnclr pretrain --preset=tiny` on two CPU replicas."""
    cwd = tmp_path_factory.mktemp("journeys_eval")
    done = run_nnclr("pretrain", "--preset=tiny", "--strategy=mirrored", "--cpu_replicas=2",
                     f"--model_dir={MODEL_DIR}", "--train_steps=3", "--batch_size=16",
                     "--queue_size=64", "--set=run.export=false", cwd=cwd,
                     data_dir=embedded_data_dir)
    return cwd, embedded_data_dir, done


def read(cwd, name):
    return (cwd / MODEL_DIR / name).read_text(encoding="utf-8")


def table(markdown, header):
    """The rows (lists of cells) of the Markdown table whose header line starts with `header`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    assert set(rows[1]) == {"---"} and len(rows[1]) == len(rows[0]), rows[:2]
    return rows[0], rows[2:]


def test_report_under_two_replicas_has_three_rows_through_one_protocol_and_a_verdict(run):
    cwd, _, done = run
    # Under MirroredStrategy the report's feature extraction once duplicated every row.
    assert done.returncode == 0, done.stderr[-3000:]
    report, markdown = json.loads(read(cwd, "report.json")), read(cwd, "report.md")
    assert markdown in done.stdout  # the console shows the same table

    protocol = report["protocol"]
    # The tiny preset scores the first 64 images of each split (eval.max_eval_examples=64).
    assert (protocol["num_train"], protocol["num_test"]) == (64, 64)
    assert (protocol["train_split"], protocol["test_split"], protocol["knn_k"]) == ("train", "test", 5)
    assert protocol["knn_temperature"] == 0.1
    assert "k=5" in markdown and "64 images of the 'test' split" in markdown
    assert report["config"]["batch_size"] == 16 and "batch 16" in markdown

    header, rows = table(markdown, "| encoder |")
    assert header == ["encoder", "kNN top-1 (%)", "linear-probe top-1 (%)"]
    assert [row[0] for row in rows] == ["trained", "raw pixels", "random init"]
    for row, name in zip(rows, ("trained", "raw_pixels", "random_init")):
        scores = report[name]
        assert row[1:] == [f"{100 * scores['knn_top1']:.1f}", f"{100 * scores['linear_top1']:.1f}"]
    # 10 classes, chance 10 %: raw pixels of Fashion-MNIST are far above it on 64 images.
    assert report["raw_pixels"]["knn_top1"] > 0.3 and report["raw_pixels"]["linear_top1"] > 0.3

    trained, raw = report["trained"], report["raw_pixels"]
    beats = [trained[key] > raw[key] for key in ("knn_top1", "linear_top1")]
    verdict = {(True, True): "beats raw pixels on both", (False, False): "does not beat raw pixels",
               (True, False): "beats raw pixels on kNN", (False, True): "beats raw pixels on the linear"}
    sentences = [line for line in markdown.splitlines() if line.startswith("The trained encoder")]
    assert len(sentences) == 1 and verdict[tuple(beats)] in sentences[0], sentences
    assert report["verdict"] == sentences[0]


def test_finetune_on_an_odd_number_of_labelled_images_finishes(run):
    # 0.0017 of 10,000 images: one training batch of 17. TensorFlow 2.21's oneDNN kernels (CPUs
    # with AVX-512 / AMX) crashed the process on it: exit 139 / 134, no message.
    cwd, data_dir, _ = run
    done = run_nnclr("finetune", f"--model_dir={MODEL_DIR}", "--set=eval.label_fraction=0.0017",
                     cwd=cwd, data_dir=data_dir)
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    result = json.loads(read(cwd, "finetune.json"))
    assert (result["num_train"], result["num_test"], result["label_fraction"]) == (17, 2000, 0.0017)
    assert (result["train_split"], result["test_split"]) == ("train", "test")
    assert 0 < result["top1"] <= result["top5"] <= 1


def test_knn_prints_percent_and_states_its_protocol(run):
    cwd, data_dir, _ = run
    done = run_nnclr("knn", f"--model_dir={MODEL_DIR}", cwd=cwd, data_dir=data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(read(cwd, "knn.json"))
    expected = {"protocol": "knn", "k": 5, "temperature": 0.1, "train_split": "train",
                "test_split": "test", "num_bank": 10000, "num_queries": 2000}
    assert {**result, **expected} == result
    # 10 classes: chance is 10 %; three steps of pretraining already give a useful kNN.
    assert result["top1"] > 0.3
    header, (row,) = table(read(cwd, "knn.md"), "| dataset |")
    assert header[1:3] == ["top1 (%)", "top5 (%)"]
    assert row[1] == f"{100 * result['top1']:.1f}"
    assert re.search(rf"\| {re.escape(row[1])} \|", done.stdout)


TWO_REPLICA_FEATURES = """
import json, sys
import numpy as np, tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from conftest import tiny_encoder
from nnclr_tf import evaluate
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    encoder = tiny_encoder((8, 8, 1))
plain = tiny_encoder((8, 8, 1))  # the same weights, built without a strategy: the reference
plain.set_weights(encoder.get_weights())
images = np.random.default_rng(0).uniform(size=(21, 8, 8, 1)).astype("float32")
data = tf.data.Dataset.from_tensor_slices((images, np.arange(21))).batch(8)  # 8, 8, 5
features, labels = evaluate.extract_features(encoder, data)
expected = plain.predict(images, verbose=0)
with strategy.scope():  # as the kNN monitor runs, inside model.fit
    in_scope, _ = evaluate.extract_features(encoder, data)
print(json.dumps({"rows": len(features), "labels": labels.tolist(), "scope_rows": len(in_scope),
                  "error": float(np.max(np.abs(features - expected))),
                  "scope_error": float(np.max(np.abs(in_scope - expected)))}))
"""


def test_features_of_a_model_built_under_two_replicas_have_one_row_per_image(tmp_path):
    # Logical CPU devices exist only if configured before TensorFlow starts: a fresh process.
    script = tmp_path / "two_replicas.py"
    script.write_text(textwrap.dedent(TWO_REPLICA_FEATURES))
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=tests)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=600, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # Keras' predict under the strategy returned 42 rows for these 21 images.
    assert result["rows"] == 21 and result["labels"] == list(range(21))
    assert result["error"] < 1e-5
    assert result["scope_rows"] == 21 and result["scope_error"] < 1e-5
