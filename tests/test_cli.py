"""The `nnclr` command end to end, as a user types it (relative paths, from a working directory),
and its one-sentence errors."""

import json
import os
import sys

import pytest
from conftest import run_nnclr

# Measured on the tiny preset (4 steps of 16; seeds 0, 1, 2; the report scores 64 test images of the
# embedded Fashion-MNIST subset, 10 classes, so chance is 0.10):
#   trained encoder      kNN 0.39 / 0.42 / 0.39   linear 0.53 / 0.50 / 0.52
#   random-init encoder  kNN 0.30 / 0.38 / 0.28   linear 0.36 / 0.39 / 0.31
# `nnclr knn` (all 2,000 test images against the whole training bank): 0.70 at seed 0.
# Four steps are too few for kNN to separate the encoders reliably; the linear probe does (>= 0.11).
TRAINED_KNN, TRAINED_LINEAR, RANDOM_INIT, KNN_MODE = 0.30, 0.42, 0.20, 0.50


def test_pretrain_evaluate_export_end_to_end(tmp_path, embedded_data_dir):
    # 512 report images, not tiny's 64: on 64 the trained-minus-random gap moved from +0.03 to
    # +0.16 linear over seeds 0 to 2 once evaluation took the centre crop; on 512, seeds 0 and 2
    # gave trained 0.568 / 0.635 and 0.574 / 0.654 against random 0.475 / 0.512 and 0.424 / 0.508
    # (kNN / linear; one standard error of the gap about 0.03).
    done = run_nnclr("pretrain", "--preset=tiny", "--model_dir=runs/tiny",
                     "--set=eval.max_eval_examples=512", cwd=tmp_path,
                     data_dir=embedded_data_dir, check=True)
    run = tmp_path / "runs" / "tiny"
    report = json.loads((run / "report.json").read_text())
    trained, random_init = report["trained"], report["random_init"]
    assert trained["knn_top1"] > TRAINED_KNN and trained["linear_top1"] > TRAINED_LINEAR, report
    assert random_init["knn_top1"] > RANDOM_INIT and random_init["linear_top1"] > RANDOM_INIT, report
    assert trained["linear_top1"] > random_init["linear_top1"] + 0.05, report
    # Trained vs raw pixels on the same 512 test images: McNemar's p-values, quoted in the verdict.
    paired = report["trained_vs_raw_pixels"]
    quoted = ["p < 0.001" if p < 0.001 else f"p = {p:.3f}"
              for p in (paired["knn_p"], paired["linear_p"])]
    assert (f"McNemar's exact test on these 512 test images gives {quoted[0]} (kNN) and "
            f"{quoted[1]} (linear probe)") in report["verdict"], report["verdict"]
    assert report["verdict"] in (run / "report.md").read_text()
    assert "kNN top-1" in done.stdout and "random init" in done.stdout
    # TensorFlow's start-up notices for the oneDNN switch (run with it on, as conftest sets) and
    # Keras' per-fit shuffle warning are not passed on to the user.
    assert "oneDNN custom operations" not in done.stderr and "shuffle=True" not in done.stderr
    assert (run / "saved_model" / "saved_model.pb").is_file()
    assert (run / "nnclr.keras").is_file()
    for picture in ("training_curves.png", "neighbours.png"):
        assert (run / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any(path.name.startswith("events.out.tfevents") for path in (run / "logs").rglob("*"))

    knn = run_nnclr("knn", "--model_dir=runs/tiny", cwd=tmp_path, data_dir=embedded_data_dir,
                    check=True)
    assert json.loads((run / "knn.json").read_text())["top1"] > KNN_MODE
    # The mode prints the results file it wrote, in the same format.
    assert (run / "knn.md").read_text().strip() in knn.stdout

    run_nnclr("export", "--model_dir=runs/tiny", "--output=exported", cwd=tmp_path,
              data_dir=embedded_data_dir, check=True)
    assert (tmp_path / "exported" / "saved_model.pb").is_file()


@pytest.mark.parametrize("flag, message", [
    ("--queue_size=-1", "model.queue_size must be > 0, got -1."),
    ("--dataset=no_such_dataset_xyz", "no_such_dataset_xyz"),
    ("--backbone=resnet19", "Unknown backbone 'resnet19'"),
    ("--set=model.top_k", "must look like section.field=value"),
    ("--output=exported", "--output is used by `nnclr export` only"),
    ("--batch_size=abc", "nnclr pretrain: error: flag --batch_size=abc: expected an integer, got 'abc'"),
    ("--no_such_flag=1", "nnclr pretrain: error: Unknown command line flag 'no_such_flag'"),
])
def test_bad_flag_values_fail_with_one_sentence(tmp_path, embedded_data_dir, flag, message):
    done = run_nnclr("pretrain", "--preset=tiny", "--model_dir=runs/x", flag, cwd=tmp_path,
                     data_dir=embedded_data_dir, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists()  # nothing left behind, not even an empty model dir


def test_unknown_or_missing_mode_is_a_usage_error(tmp_path):
    done = run_nnclr("pretrian", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "Expected one mode" in done.stderr and "Did you mean pretrain?" in done.stderr
    done = run_nnclr(cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert "got nothing" in done.stderr and "nnclr --help" in done.stderr


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_the_command_turns_onednn_on_unless_told_otherwise(monkeypatch, preset, expected):
    # TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, on import: the entry point must set it before
    # anything loads TensorFlow, and leave a user's explicit choice alone.
    from nnclr_tf import cli

    if preset is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", preset)
    monkeypatch.setattr(sys, "argv", ["nnclr", "--help"])
    with pytest.raises(SystemExit) as done:
        cli.run()
    assert done.value.code in (0, None)  # help printed, success
    assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == expected


def test_main_gives_back_the_sigterm_handler_it_found(capsys):
    # `nnclr` turns SIGTERM into a one-line stop (test_eval_modes); called in-process, as in a
    # notebook or these tests, it must not leave that handler behind.
    import signal

    from conftest import run_cli

    def mine(signum, frame):
        del signum, frame

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        code, out, _ = run_cli(capsys, "show_config", "--preset=tiny")
        assert code == 0 and '"model_dir": "runs/tiny"' in out
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
