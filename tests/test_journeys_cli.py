"""User journeys through the `nnclr` command: help, the one export of a run, switching backbones.

Each runs the installed `nnclr` from a temporary working directory with relative paths, as a user
types it, and checks the outcome and the message.
"""

import json
import re

import numpy as np
import pytest
from conftest import run_nnclr

from nnclr_tf import backbones
from nnclr_tf import config as cfg

# --- Help -----------------------------------------------------------------------------------------


def test_help_lists_every_mode_and_the_main_flags_with_their_defaults(tmp_path):
    from nnclr_tf.cli import MODES
    done = run_nnclr("--help", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    for mode, summary in MODES.items():
        assert re.search(rf"^  {mode} +{re.escape(summary)}$", done.stdout, re.M), mode
    demo = cfg.get_preset("demo")
    for flag, default in [("preset", "demo"), ("batch_size", demo.optim.batch_size),
                          ("backbone", demo.model.backbone), ("model_dir", demo.run.model_dir),
                          ("overwrite", "false")]:
        assert f"--{flag}  (default: {default})" in done.stdout, flag
    assert "--helpfull" in done.stdout


def test_mode_help_shows_the_defaults_of_the_chosen_preset(tmp_path):
    done = run_nnclr("pretrain", "--help", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("nnclr pretrain: ")
    assert f"--image_size  (default: {cfg.get_preset('demo').data.image_size})" in done.stdout
    tiny = run_nnclr("pretrain", "--preset=tiny", "-h", cwd=tmp_path, timeout=120)
    assert tiny.returncode == 0, tiny.stderr
    assert f"--batch_size  (default: {cfg.get_preset('tiny').optim.batch_size})" in tiny.stdout
    # The evaluation modes read the run's settings; export has its own flags.
    knn = run_nnclr("knn", "--help", cwd=tmp_path, timeout=120)
    assert "--dataset  (default: the run's, saved in MODEL_DIR/config.json)" in knn.stdout
    export = run_nnclr("export", "--help", cwd=tmp_path, timeout=120)
    assert export.returncode == 0 and "--overwrite  (default: false)" in export.stdout
    assert "--batch_size" not in export.stdout


def test_helpfull_still_lists_every_flag(tmp_path):
    done = run_nnclr("--helpfull", cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "Modes:" in done.stdout
    assert "--batch_size: Global batch size" in done.stdout  # absl's listing, after the overview
    assert "--[no]only_check_args" in done.stdout  # and absl's own flags


# --- One export per run -------------------------------------------------------------------------


def test_end_of_run_export_and_nnclr_export_are_the_same_float32_model(tmp_path, embedded_data_dir):
    from nnclr_tf.export import load_encoder
    run = dict(cwd=tmp_path, data_dir=embedded_data_dir)
    # Trained under mixed_bfloat16: serving as trained would move the outputs by ~1e-2.
    run_nnclr("pretrain", "--preset=tiny", "--model_dir=runs/bf16", "--mixed_precision=mixed_bfloat16",
              "--set=run.report=false", check=True, **run)
    run_nnclr("export", "--model_dir=runs/bf16", "--output=exported", check=True, **run)
    at_end, exported = (load_encoder(str(tmp_path / path)) for path in ("runs/bf16/saved_model",
                                                                          "exported"))
    assert at_end.info == exported.info
    assert at_end.info["precision"] == "float32"
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28, 1), dtype=np.uint8)
    first, second = at_end.predict(images), exported.predict(images)
    for key in ("features", "embeddings"):
        np.testing.assert_allclose(first[key], second[key], atol=1e-5)

    # An existing --output is kept unless the user says --overwrite.
    before = (tmp_path / "exported" / "saved_model.pb").read_bytes()
    again = run_nnclr("export", "--model_dir=runs/bf16", "--output=exported", **run)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        "nnclr export: error: --output 'exported' already exists and is not empty; pass "
        "--overwrite to replace it, or choose another --output."]
    assert (tmp_path / "exported" / "saved_model.pb").read_bytes() == before
    run_nnclr("export", "--model_dir=runs/bf16", "--output=exported", "--overwrite", check=True,
              **run)
    assert load_encoder(str(tmp_path / "exported")).info["precision"] == "float32"


# --- Switching the backbone of a preset ----------------------------------------------------------


def test_config_and_backbones_agree_on_the_smallest_image():
    for name in backbones.BACKBONES:
        for cifar_stem in (False, True):
            assert cfg.min_image_size(cifar_stem) == backbones.min_image_size(name, cifar_stem)


@pytest.mark.slow  # trains a ResNet-50; the config-level checks above run by default
def test_resnet50_from_the_tiny_preset_trains_at_once(tmp_path, embedded_data_dir):
    run_nnclr("pretrain", "--preset=tiny", "--backbone=resnet50", "--train_steps=1",
              "--model_dir=runs/r50", "--set=run.report=false", "--set=run.export=false",
              cwd=tmp_path, data_dir=embedded_data_dir, check=True)
    saved = json.loads((tmp_path / "runs" / "r50" / "config.json").read_text())
    assert saved["config"]["model"]["backbone"] == "resnet50"


@pytest.mark.parametrize("preset, channels", [("demo", 1), ("cifar10_resnet18", 3)])
def test_resnet50_config_of_a_preset_builds(tmp_path, preset, channels):
    shown = run_nnclr("show_config", f"--preset={preset}", "--backbone=resnet50", cwd=tmp_path,
                      timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert_builds(cfg.from_dict(json.loads(shown.stdout)), channels)


def assert_builds(config, channels):
    """The config's NNCLR model builds for its image size and maps images to features."""
    from nnclr_tf import train
    size = config.data.image_size
    model = train.build_model(config, (size, size, channels), num_classes=10)
    features = model.encoder(np.zeros((2, size, size, channels), np.float32))
    assert features.shape[0] == 2 and features.shape[1] == model.encoder.output_shape[-1]


def advice(stderr):
    """The flags an error's advice names: "...; add --a=1 or --set b.c=2." -> [["--a=1"], [...]]."""
    match = re.search(r"; add (.*)\.$", stderr.strip())
    assert match, stderr
    return [re.sub(r"--set (\S+)", r"--set=\1", way).split() for way in match.group(1).split(" or ")]


@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_imagenet_stem_on_small_images_one_sentence_whose_advice_works(tmp_path, backbone):
    args = ("--preset=demo", f"--backbone={backbone}", "--set=model.cifar_stem=false",
            "--image_size=28")
    done = run_nnclr("pretrain", *args, "--model_dir=runs/x", cwd=tmp_path, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"nnclr pretrain: error: data.image_size=28 is too small for {backbone} with the ImageNet "
        "stem (model.cifar_stem=false), which needs at least 32 pixels; add --image_size=32 or "
        "--set model.cifar_stem=true."]
    assert not (tmp_path / "runs").exists()
    # Either way out gives a config that validates and a model that builds (the demo data is gray).
    for way in advice(done.stderr):
        shown = run_nnclr("show_config", *args, *way, cwd=tmp_path, timeout=120)
        assert shown.returncode == 0, (way, shown.stderr)
        assert_builds(cfg.from_dict(json.loads(shown.stdout)), channels=1)
