"""The `nnclr` command line (also `python -m nnclr_tf`). The only module that reads flags.

    nnclr pretrain                                   # demo preset: embedded data, a few CPU minutes
    nnclr pretrain --preset=cifar10_resnet18 --data_dir=~/tensorflow_datasets --model_dir=runs/c10
    nnclr knn --model_dir=runs/c10                   # evaluate a pretrained encoder
    nnclr linear_eval | finetune | transfer | export --model_dir=...
    nnclr pretrain --set model.top_k=5 --set optim.warmup_epochs=2   # any config field
"""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from nnclr_tf import config as cfg

MODES = ("pretrain", "knn", "linear_eval", "finetune", "transfer", "export", "show_config")

FLAGS = flags.FLAGS
flags.DEFINE_string("preset", None, f"Named preset, one of: {', '.join(cfg.PRESETS)}. Default: demo for "
                    "pretrain; for the other modes, the config saved in --model_dir.")
flags.DEFINE_string("dataset", None, "TFDS name (cifar10, stl10, imagenet2012, ...), a folder of images "
                    "in class sub-folders, 'embedded' (shipped Fashion-MNIST subset) or 'fashion_mnist_full'.")
flags.DEFINE_string("data_dir", None, "TFDS data_dir where prepared datasets live.")
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, exports and the report go; "
                    "running again with the same model_dir resumes.")
flags.DEFINE_integer("batch_size", None, "Global batch size (all replicas together).")
flags.DEFINE_integer("epochs", None, "Pretraining epochs.")
flags.DEFINE_integer("train_steps", None, "Pretraining steps; overrides --epochs when > 0.")
flags.DEFINE_integer("queue_size", None, "Support-set size (paper: 98304).")
flags.DEFINE_float("temperature", None, "Softmax temperature tau (paper: 0.1).")
flags.DEFINE_string("backbone", None, f"One of: {', '.join(cfg.BACKBONES)}.")
flags.DEFINE_integer("image_size", None, "Training image size in pixels.")
flags.DEFINE_string("strategy", None, f"tf.distribute strategy, one of: {', '.join(cfg.STRATEGIES)}.")
flags.DEFINE_integer("cpu_replicas", None, "Split the CPU into N logical devices (to test distribution).")
flags.DEFINE_string("mixed_precision", None, f"One of: {', '.join(cfg.PRECISIONS)}.")
flags.DEFINE_boolean("jit_compile", None, "Compile the train step with XLA.")
flags.DEFINE_integer("seed", None, "Random seed.")
flags.DEFINE_boolean("download", None, "Allow TFDS to download and prepare a dataset (needs network).")
flags.DEFINE_multi_string("set", [], "Override any config field: --set section.field=value, e.g. "
                          "--set model.top_k=5 --set augment.preset=crops. See `nnclr show_config`.")
flags.DEFINE_string("output", None, "export: where to write the SavedModel (default MODEL_DIR/saved_model).")
flags.DEFINE_boolean("debug", False, "Show full tracebacks for errors.")

_FLAG_FIELDS = {
    "dataset": "data.dataset", "data_dir": "data.data_dir", "model_dir": "run.model_dir",
    "batch_size": "optim.batch_size", "epochs": "optim.epochs", "train_steps": "optim.train_steps",
    "queue_size": "model.queue_size", "temperature": "model.temperature", "backbone": "model.backbone",
    "image_size": "data.image_size", "strategy": "run.strategy", "cpu_replicas": "run.cpu_replicas",
    "mixed_precision": "run.mixed_precision", "jit_compile": "run.jit_compile", "seed": "run.seed",
    "download": "data.download",
}


def config_from_flags(mode: str) -> cfg.Config:
    """Turns the parsed flags into a validated Config (raises ConfigError with one sentence)."""
    if FLAGS.preset is None and mode != "pretrain" and FLAGS.model_dir:
        from nnclr_tf.runs import RunDir
        base = RunDir(FLAGS.model_dir).read_claim()[0]
    else:
        base = cfg.get_preset(FLAGS.preset or "demo")
    overrides: dict[str, object] = {}
    for flag_name, key in _FLAG_FIELDS.items():
        value = FLAGS[flag_name].value
        if value is not None:
            overrides[key] = value
    for item in FLAGS.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise cfg.ConfigError(f"--set {item!r} must look like section.field=value, "
                                  "e.g. --set model.top_k=5.")
        overrides[key.strip()] = value.strip()
    if "data.dataset" in overrides and os.path.sep in str(overrides["data.dataset"]):
        overrides["data.dataset"] = os.path.expanduser(str(overrides["data.dataset"]))
    return cfg.override(base, overrides)


def _run_mode(mode: str) -> None:
    config = config_from_flags(mode)
    if mode == "show_config":
        print(config.to_json())
        return
    import tensorflow_datasets as tfds

    from nnclr_tf import modes  # TensorFlow loads only once the arguments are known to be good
    tfds.disable_progress_bar()
    getattr(modes, mode)(config, output=FLAGS.output)


def main(argv) -> None:
    if len(argv) != 2 or argv[1] not in MODES:
        given = " ".join(argv[1:]) or "nothing"
        raise app.UsageError(f"Expected one mode, one of: {', '.join(MODES)}; got {given}. "
                             "Flags go as --name=value; see --helpfull.")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("nnclr_tf").setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS's per-file chatter
    try:
        _run_mode(argv[1])
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        if FLAGS.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"nnclr {argv[1]}: error: {message}", file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(main)


if __name__ == "__main__":
    run()
