"""The evaluation modes of `nnclr` (knn, linear_eval, finetune, transfer) end to end, in subprocesses.

One tiny pretraining run is shared by the module; every mode must write `<mode>.json` and
`<mode>.md` into the model dir, print the Markdown table, and score clearly above chance.
"""

import json
import os
import pathlib
import re
import signal
import subprocess

import numpy as np
import pytest
from conftest import nnclr_command, run_nnclr, start_until_line


def nnclr(*args, cwd):
    return run_nnclr(*args, cwd=cwd, check=True)


def write_image_folder(root, per_class, seed):
    """root/{bright,dark}/*.png, 20x20 RGB: a two-class folder dataset the tiny encoder can tell apart."""
    import tensorflow as tf  # only here: the modes themselves run in subprocesses

    rng = np.random.default_rng(seed)
    for label, (name, level) in enumerate((("bright", 200), ("dark", 40))):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            pixels = np.clip(level + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
            with open(os.path.join(root, name, f"{label}_{i}.png"), "wb") as handle:
                handle.write(tf.io.encode_png(pixels).numpy())


@pytest.fixture(scope="module", name="run")
def pretrained_run(tmp_path_factory):
    """(common flags, model dir) of a pretrained `tiny` run, with a tmp data_dir."""
    root = tmp_path_factory.mktemp("eval_modes")
    # Relative paths, as a user types them; the mode subprocesses run from `root`.
    common = ["--model_dir=run", "--data_dir=tfds"]
    nnclr("pretrain", "--preset=tiny", *common, "--set=run.report=false", "--set=run.export=false",
          cwd=root)
    return common, str(root / "run"), root


def results(model_dir, name):
    with open(os.path.join(model_dir, f"{name}.json")) as handle:
        values = json.load(handle)
    with open(os.path.join(model_dir, f"{name}.md")) as handle:
        markdown = handle.read()
    return values, markdown


# The tiny run's 4 steps leave batch norm's moving statistics near their initial values, so the
# frozen features are badly scaled: linear_eval's head standardises them (its batch norm), and
# finetune gets a larger learning rate; both a few epochs, to show that they learn at all.
@pytest.mark.parametrize("mode, extra, expected, least", [
    ("knn", [], {"protocol": "knn", "k": 5, "temperature": 0.1, "num_bank": 10000}, 0.3),
    ("linear_eval", ["--set=eval.linear_epochs=3"],
     {"protocol": "linear_eval", "epochs": 3, "num_train": 10000}, 0.2),
    ("finetune", ["--set=eval.label_fraction=0.1", "--set=eval.finetune_epochs=5",
                  "--set=eval.finetune_learning_rate=0.1"],
     {"protocol": "finetune", "label_fraction": 0.1, "num_train": 1000, "batch_size": 124,
      "epochs": 5}, 0.25),
])
def test_mode_writes_json_and_markdown_and_scores_above_chance(run, mode, extra, expected, least):
    common, model_dir, root = run
    done = nnclr(mode, *common, *extra, cwd=root)
    values, markdown = results(model_dir, mode)
    assert {**values, **expected} == values
    assert values["dataset"] == "embedded"
    assert (values["train_split"], values["test_split"]) == ("train", "test")
    assert values.get("num_test", values.get("num_queries")) == 2000
    # 10 classes: the embedded Fashion-MNIST subset; chance is 0.1, one standard error on 2,000
    # test images 0.007, so `least` is more than 4 of them above chance (measured here: kNN 0.70,
    # linear 0.28, finetune 0.40 to 0.47 over three seeds; 0.04 to 0.13 when the
    # 1,000 labelled images were one batch of 1,024, one step per epoch).
    assert least <= values["top1"] <= values["top5"] <= 1.0
    assert markdown.startswith("| dataset | top1 (%) | top5 (%) |")
    assert markdown in done.stdout
    # The classifier's fit is silent; the modes that train one log each epoch.
    epochs = expected.get("epochs", 0)  # knn trains nothing
    logged = [int(m.group(1)) for m in re.finditer(
        rf"{mode}: epoch (\d+)/{epochs}, loss \d+\.\d{{4}}, train top-1 \d+\.\d %, "
        r"\d+:\d\d:\d\d so far$", done.stderr, flags=re.M)]
    assert logged == list(range(1, epochs + 1)), done.stderr[-2000:]


def test_sigterm_stops_an_evaluation_mode_with_one_line_and_writes_nothing(run):
    # A scheduler's SIGTERM used to end linear_eval at once without a word (Python's default).
    common, model_dir, root = run

    def results_files():
        return {path.name: path.read_bytes()
                for path in pathlib.Path(model_dir).glob("linear_eval.*")}

    before = results_files()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    # The first epoch's line: the head is training.
    process, line, lines = start_until_line(
        [*nnclr_command(), "linear_eval", *common, "--set=eval.linear_epochs=200"],
        lambda line: "linear_eval: epoch 1/200" in line, timeout=600, stream="stderr", cwd=root,
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    process.send_signal(signal.SIGTERM)
    _, rest = process.communicate(timeout=300)
    lines = [*lines, line, *rest.splitlines(keepends=True)]
    assert process.returncode == 128 + signal.SIGTERM, lines[-20:]
    assert lines[-1].rstrip("\n") == (
        "nnclr linear_eval: stopped by SIGTERM; the same command runs it again from the start")
    assert not any("Traceback" in line for line in lines)
    assert results_files() == before


@pytest.mark.slow  # extracts features of every available dataset; transfer_suite is unit-tested
def test_transfer_writes_table_with_skip_reasons(run):
    common, model_dir, root = run
    folder = str(root / "folder")
    write_image_folder(os.path.join(folder, "train"), per_class=12, seed=0)
    write_image_folder(os.path.join(folder, "test"), per_class=6, seed=1)
    done = nnclr("transfer", *common, f"--set=eval.transfer_datasets=embedded,{folder},cifar10",
                 cwd=root)
    rows, markdown = results(model_dir, "transfer")
    assert [r["dataset"] for r in rows] == ["embedded", folder, "cifar10"]
    assert [r["status"] for r in rows] == ["ok", "ok", "skipped"]
    embedded, images, cifar = rows
    assert (embedded["num_train"], embedded["num_test"], embedded["num_classes"]) == (10000, 2000, 10)
    # RGB folder images reach the grayscale encoder converted; the classes differ in brightness.
    assert (images["num_train"], images["num_test"], images["num_classes"]) == (24, 12, 2)
    assert images["top1"] >= 0.9
    assert cifar["paper"] == 93.7 and "not prepared" in cifar["reason"]
    lines = markdown.strip().splitlines()
    assert len(lines) == 2 + 3 and "paper (%)" in lines[0]
    assert lines[4].startswith("| cifar10 | skipped |") and "not prepared" in lines[4]
    assert markdown in done.stdout


def tiny_config(run, **overrides):
    from nnclr_tf import config as cfg

    _, model_dir, root = run
    data_dir = str(root / "tfds")
    return cfg.override(cfg.get_preset("tiny"), {"data.data_dir": data_dir,
                                                "run.model_dir": model_dir, **overrides})


def test_knn_monitor_is_built_from_the_config(run):
    from nnclr_tf import evaluate, report, train

    assert report.knn_monitor_callbacks(tiny_config(run), num_classes=10) == []
    config = tiny_config(run, **{"eval.knn_every_epochs": 3})
    (monitor,) = report.knn_monitor_callbacks(config, num_classes=10)
    assert (monitor.every, monitor.k, monitor.first_epoch) == (3, 5, True)
    model, _ = train.load_pretrained(config.run.model_dir)
    monitor.set_model(model)
    monitor.on_train_begin()
    logs = {}
    monitor.on_epoch_end(0, logs)  # the first epoch of a fit call: evaluated, so CSV has the column
    expected = evaluate.knn_evaluate(model.encoder, monitor.bank_ds, monitor.query_ds, 10, k=5)
    assert logs["knn_top1"] == expected["top1"]
    logs = {}
    monitor.on_epoch_end(1, logs)
    assert "knn_top1" not in logs


def test_raw_pixel_baseline_goes_through_the_same_protocol(run):
    from nnclr_tf import evaluate, report
    from nnclr_tf.data import load_arrays

    config = tiny_config(run)  # eval.max_eval_examples=64, image_size=16
    scores = report.raw_pixel_scores(config, num_classes=10)
    data_dir = config.data.data_dir
    train_x, train_y = load_arrays("embedded", "train", data_dir, image_size=16, limit=64)
    test_x, test_y = load_arrays("embedded", "test", data_dir, image_size=16, limit=64)
    train_x = train_x.reshape(64, -1) / np.float32(255)
    test_x = test_x.reshape(64, -1) / np.float32(255)
    knn = evaluate.knn_accuracy(train_x, train_y, test_x, test_y, 10, k=5, temperature=0.1)
    linear = evaluate.linear_probe_accuracy(train_x, train_y, test_x, test_y, 10)
    assert scores["knn_top1"] == pytest.approx(knn["top1"], abs=1 / 64)
    assert scores["linear_top1"] == pytest.approx(linear["top1"], abs=1 / 64)


@pytest.mark.parametrize("trained, expected", [
    ((0.80, 0.90), "beats raw pixels on both kNN (80.0 % vs 70.0 %) and the linear probe (90.0 % vs 85.0 %)."),
    ((0.60, 0.85), "does not beat raw pixels, neither on kNN (60.0 % vs 70.0 %) nor on the linear probe (85.0 % vs 85.0 %)."),
    ((0.75, 0.80), "beats raw pixels on kNN (75.0 % vs 70.0 %) but not on the linear probe (80.0 % vs 85.0 %)."),
    ((0.65, 0.86), "beats raw pixels on the linear probe (86.0 % vs 85.0 %) but not on kNN (65.0 % vs 70.0 %)."),
])
def test_report_says_in_one_sentence_whether_the_encoder_beats_raw_pixels(trained, expected):
    from nnclr_tf import report

    scores = {"trained": {"knn_top1": trained[0], "linear_top1": trained[1]},
              "raw_pixels": {"knn_top1": 0.70, "linear_top1": 0.85}}
    assert report.raw_pixel_verdict(scores, 784) == f"The trained encoder {expected}"
    del scores["raw_pixels"]
    assert "150528 features" in report.raw_pixel_verdict(scores, 150528)


def test_raw_pixels_are_scored_at_the_stored_size_never_upsampled(run):
    from nnclr_tf import config as cfg, report

    config = tiny_config(run)  # image_size=16: below the stored 28 px, scored as trained
    assert report.raw_pixel_size(config) == 16
    upsampled = cfg.override(config, {"data.image_size": 56, "model.cifar_stem": False})
    assert report.raw_pixel_size(upsampled) == 28  # the demo's 56 px input: 784 raw features
    assert report.raw_pixel_features(upsampled) == 28 * 28
