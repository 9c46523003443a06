"""The `nnclr` command line (also `python -m nnclr_tf`). The only module that reads flags.

    nnclr pretrain                                   # demo preset: embedded data, a few CPU minutes
    nnclr pretrain --preset=cifar10_resnet18 --data_dir=~/tensorflow_datasets --model_dir=runs/c10
    nnclr knn --model_dir=runs/c10                   # evaluate a pretrained encoder
    nnclr linear_eval | finetune | transfer | export --model_dir=...
    nnclr pretrain --set model.top_k=5 --set optim.warmup_epochs=2   # any config field
    nnclr --help;  nnclr pretrain --help             # the modes; a mode's flags and their defaults
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import signal
import sys
import tempfile
import textwrap
import threading

from absl import app, flags
from absl import logging as absl_logging

from nnclr_tf import config as cfg

MODES = {
    "pretrain": "pretrain an encoder with NNCLR; the same command again resumes from --model_dir",
    "knn": "kNN top-1 accuracy of the encoder pretrained in --model_dir",
    "linear_eval": "train a linear classifier on the frozen encoder; print its top-1 accuracy",
    "finetune": "fine-tune the encoder on a fraction of the labels (--set eval.label_fraction=...)",
    "transfer": "linear evaluation on other datasets (--set eval.transfer_datasets=...)",
    "export": "write the encoder as a float32 SavedModel (default MODEL_DIR/saved_model)",
    "show_config": "print the config that the preset, flags and --set give, as JSON",
    "embed": "embed a folder (or a TFDS split) with an encoder into a collection folder; resumable",
    "search": "the --k nearest images of a --collection to each --query image (table and picture)",
    "duplicates": "near-duplicate groups of a --collection above a cosine --threshold (never deletes)",
    "map": "a 2-D map of a --collection coloured by label (PNG) and a TensorBoard projector export",
}

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
flags.DEFINE_boolean("allow_config_change", None, "pretrain: continue a --model_dir with other settings "
                     "(batch size, learning rate, steps, ...); its config_history.jsonl keeps them.")
flags.DEFINE_multi_string("set", [], "Override any config field: --set section.field=value, e.g. "
                          "--set model.top_k=5 --set augment.preset=crops. See `nnclr show_config`.")
flags.DEFINE_string("output", None, "export: where to write the SavedModel (default "
                    "MODEL_DIR/saved_model, which is always regenerated). embed: the collection "
                    "folder; search: the picture; duplicates, map: the report folder.")
flags.DEFINE_boolean("overwrite", False, "export: replace an existing --output.")
flags.DEFINE_boolean("debug", False, "Show full tracebacks for errors.")
# embed / search / duplicates (nnclr_tf/collection_modes.py)
flags.DEFINE_string("encoder", None, "A model dir (its saved_model/) or an encoder SavedModel.")
flags.DEFINE_multi_string("input", [], "embed: a folder of images (any sizes, nested) or image files.")
flags.DEFINE_string("split", "test", "embed: the TFDS split of --dataset to embed.")
flags.DEFINE_string("collection", None, "search, duplicates: a folder written by nnclr embed.")
flags.DEFINE_multi_string("query", [], "search: a query image file or folder (repeat for more).")
flags.DEFINE_integer("k", 5, "search: neighbours per query.")
flags.DEFINE_string("index", "exact", "search: exact (chunked) or faiss (approximate, "
                    "pip install nnclr_tf[search]).")
flags.DEFINE_float("threshold", None, "duplicates: cosine similarity from which two images are "
                   "near-duplicates (default measured on planted copies, see nnclr_tf/duplicates.py).")
flags.DEFINE_string("format", "savedmodel", "export: savedmodel, tflite (LiteRT; uint8 images at the "
                    "encoder's size) or onnx (pip install nnclr_tf[onnx]).")
flags.DEFINE_string("space", None, "search, duplicates: compare the encoder's features (search's "
                    "default), the projection head's embeddings, or 8x8 thumbnails (duplicates' default).")

_FLAG_FIELDS = {
    "dataset": "data.dataset", "data_dir": "data.data_dir", "model_dir": "run.model_dir",
    "batch_size": "optim.batch_size", "epochs": "optim.epochs", "train_steps": "optim.train_steps",
    "queue_size": "model.queue_size", "temperature": "model.temperature", "backbone": "model.backbone",
    "image_size": "data.image_size", "strategy": "run.strategy", "cpu_replicas": "run.cpu_replicas",
    "mixed_precision": "run.mixed_precision", "jit_compile": "run.jit_compile", "seed": "run.seed",
    "download": "data.download", "allow_config_change": "run.allow_config_change",
}


def config_from_flags(mode: str) -> cfg.Config:
    """Turns the parsed flags into a validated Config (raises ConfigError with one sentence)."""
    if mode != "export":
        for name in ("output", "overwrite"):
            if FLAGS[name].present:
                raise cfg.ConfigError(f"--{name} is used by `nnclr export` only; drop it from "
                                      f"`nnclr {mode}`.")
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


# The flags each mode reads, in the order `nnclr MODE --help` lists them.
_EVAL_FLAGS = ("model_dir", "data_dir", "dataset", "download", "set", "preset", "debug")
_MODE_FLAGS = {
    "pretrain": ("preset", "dataset", "data_dir", "model_dir", "batch_size", "epochs", "train_steps",
                 "backbone", "image_size", "queue_size", "temperature", "mixed_precision", "strategy",
                 "cpu_replicas", "jit_compile", "seed", "download", "allow_config_change", "set",
                 "debug"),
    "knn": _EVAL_FLAGS, "transfer": _EVAL_FLAGS,
    # The protocols that train a head run under the pretraining's strategy and precision.
    "linear_eval": (*_EVAL_FLAGS[:-1], "strategy", "cpu_replicas", "mixed_precision", "debug"),
    "export": ("model_dir", "output", "overwrite", "format", "debug"),
}
_MODE_FLAGS["finetune"] = _MODE_FLAGS["linear_eval"]
_MODE_FLAGS["show_config"] = _MODE_FLAGS["pretrain"]
_MODE_FLAGS.update(
    embed=("encoder", "input", "dataset", "split", "data_dir", "output", "batch_size", "overwrite",
           "debug"),
    search=("collection", "query", "k", "index", "space", "encoder", "output", "debug"),
    duplicates=("collection", "threshold", "space", "output", "debug"),
    map=("collection", "space", "output", "debug"))
_MAIN_FLAGS = ("preset", "dataset", "data_dir", "model_dir", "batch_size", "train_steps", "backbone",
               "set", "output", "overwrite")


def _default(name: str, mode: str | None) -> str:
    """The value flag `name` takes when it is not given, in words."""
    from_run = mode not in (None, "pretrain", "show_config") and FLAGS.preset is None
    if from_run and (name == "preset" or name in _FLAG_FIELDS and name != "model_dir"):
        return "the run's, saved in MODEL_DIR/config.json"
    if name == "preset":
        return FLAGS.preset or "demo"
    if name == "output":
        return {"embed": "none, required", "search": "search.png",
                "duplicates": "COLLECTION_duplicates", "map": "COLLECTION_map"}.get(
                    mode, "MODEL_DIR/saved_model")
    if name == "set":
        return "none"
    key = _FLAG_FIELDS.get(name)
    if key is None:
        return str(FLAGS[name].default).lower()
    section, field = key.split(".")
    value = getattr(getattr(cfg.get_preset(FLAGS.preset or "demo"), section), field)
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _flag_lines(names, mode: str | None) -> list[str]:
    lines = []
    for name in names:
        # absl appends "; repeat this option ..." to a multi flag's help: the name says it.
        text = re.sub(r";\s*repeat this option.*", "", FLAGS[name].help, flags=re.S)
        lines.append(f"  --{name}  (default: {_default(name, mode)})")
        lines += textwrap.wrap(text, width=96, initial_indent="      ", subsequent_indent="      ")
    return lines


def help_text(mode: str | None) -> str:
    """`nnclr --help` (mode None: every mode and the main flags) or `nnclr MODE --help`."""
    preset = FLAGS.preset or "demo"
    if mode is None:
        width = max(map(len, MODES))
        lines = ["nnclr: NNCLR self-supervised learning (pretrain, evaluate, export).", "",
                 "Usage: nnclr MODE [--flag=value ...]", "", "Modes:"]
        lines += [f"  {name.ljust(width)}  {summary}" for name, summary in MODES.items()]
        lines += ["", *textwrap.wrap(
            f"Main flags (defaults from preset {preset!r}; the evaluation modes and export read "
            "the run's config from --model_dir):", width=100)]
        lines += _flag_lines(_MAIN_FLAGS, None)
        lines += ["", "nnclr MODE --help: the flags of one mode and their defaults.",
                  "nnclr show_config: every config field that --set section.field=value can change.",
                  "nnclr --helpfull: every flag, absl's included."]
        return "\n".join(lines)
    lines = [f"nnclr {mode}: {MODES[mode]}.", "", f"Usage: nnclr {mode} [--flag=value ...]", "",
             "Flags:"]
    lines += _flag_lines(_MODE_FLAGS[mode], mode)
    lines.append("")
    if "set" in _MODE_FLAGS[mode]:
        lines.append("Any other config field: --set section.field=value (see nnclr show_config).")
    lines.append("All modes: nnclr --help.")
    return "\n".join(lines)


def show_help(argv, full: bool = False) -> None:
    """Prints the help of the mode in `argv` (or of all modes), absl's full flag list with `full`."""
    print(help_text(_check_mode(argv)))
    if full:
        print("\nAll flags, absl's included:\n" + FLAGS.get_help())


def _run_mode(mode: str) -> None:
    if mode in ("embed", "search", "duplicates", "map"):  # no config: they use an exported encoder
        from nnclr_tf import collection_modes
        values = {name: FLAGS[name].value for name in _MODE_FLAGS[mode] if name != "debug"}
        for flag, name in (("input", "inputs"), ("query", "queries")):
            if flag in values:
                values[name] = values.pop(flag)
        getattr(collection_modes, mode)(**values)
        return
    config = config_from_flags(mode)
    if mode == "show_config":
        print(config.to_json())
        return
    import tensorflow_datasets as tfds

    from nnclr_tf import modes  # TensorFlow loads only once the arguments are known to be good
    tfds.disable_progress_bar()
    if mode == "export" and FLAGS.format != "savedmodel":
        from nnclr_tf import collection_modes
        collection_modes.export_format(config, FLAGS.format, FLAGS.output, FLAGS.overwrite)
    elif mode == "export":
        modes.export(config, output=FLAGS.output, overwrite=FLAGS.overwrite)
    else:
        getattr(modes, mode)(config)


def _check_mode(argv) -> str | None:
    """The mode named in `argv` (None for none); exits 2 with one sentence for anything else."""
    if len(argv) > 2 or (len(argv) == 2 and argv[1] not in MODES):
        close = difflib.get_close_matches(argv[1], list(MODES), n=1)
        hint = f" Did you mean {close[0]}?" if close and len(argv) == 2 else ""
        print(f"nnclr: error: Expected one mode, one of: {', '.join(MODES)}; got "
              f"{' '.join(argv[1:])}.{hint} Flags go as --name=value; see nnclr --help.",
              file=sys.stderr)
        sys.exit(2)
    return argv[1] if len(argv) == 2 else None


def main(argv) -> None:
    mode = _check_mode(argv)
    if mode is None:
        print(f"nnclr: error: Expected one mode, one of: {', '.join(MODES)}; got nothing. "
              "See nnclr --help.", file=sys.stderr)
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("nnclr_tf").setLevel(logging.INFO)
    absl_logging.set_verbosity(absl_logging.WARNING)  # TFDS's per-file chatter
    if mode != "show_config":  # the one mode that never loads TensorFlow
        _import_tensorflow_quietly()
    # Restored at the end: main() also runs inside other programs (tests, notebooks).
    handles_sigterm = threading.current_thread() is threading.main_thread()  # Python's rule
    if handles_sigterm:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        _run_mode(mode)
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        if FLAGS.debug:
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"nnclr {mode}: error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: one line, exit 128 + signal
        if FLAGS.debug:
            raise
        print(f"nnclr {mode}: {_stopped(mode, stop)}", file=sys.stderr)
        sys.exit(getattr(stop, "exit_code", 128 + signal.SIGINT))
    finally:
        if handles_sigterm:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`, a preempted VM) outside pretraining's steps, which handle it
    themselves (callbacks.StopOnSignal): the mode stops as on Ctrl-C, with the shell's exit 143."""

    exit_code = 128 + signal.SIGTERM


def _raise_terminated(signum, frame):
    del signum, frame
    raise Terminated()


# What running the same command again does after a stop; the other modes start again.
_AFTER_A_STOP = {"pretrain": "resumes from the last checkpoint",
                 "embed": "embeds only the images not yet embedded"}


def _stopped(mode: str, stop: KeyboardInterrupt) -> str:
    """The line for a mode stopped by a signal: the stop's own (pretraining names its step), or
    the cause and what the same command does next."""
    if str(stop):
        return str(stop)
    cause = "stopped by SIGTERM" if isinstance(stop, Terminated) else "interrupted"
    return f"{cause}; the same command {_AFTER_A_STOP.get(mode, 'runs it again from the start')}"


# Start-up notices TensorFlow 2.21 writes to stderr before its log level applies; with
# TF_ENABLE_ONEDNN_OPTS=1 set (run() below) it announces "oneDNN custom operations are on" twice.
_STARTUP_NOTICES = ("oneDNN custom operations are", "absl::InitializeLog() is called")


def _import_tensorflow_quietly() -> None:
    """Imports TensorFlow with stderr captured, and passes on every line but _STARTUP_NOTICES."""
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines():
                if not any(notice in line for notice in _STARTUP_NOTICES):
                    print(line, file=sys.stderr)


# absl's own --help shows the flags of the console script's wrapper (none) and exits 1.
_HELP = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "help")
_HELP_FULL = ("--helpfull", "-helpfull")


def parse_flags(argv):
    """absl's flag parsing, with a flag error as the CLI's one sentence and exit 2 (absl's own
    parser prints "FATAL Flags parsing error" and exits 1)."""
    try:
        return FLAGS(argv)
    except flags.Error as error:
        mode = next((word for word in argv[1:] if not word.startswith("-")), None)
        detail = str(error).replace("invalid literal for int() with base 10:", "expected an integer, got")
        prefix = f"nnclr {mode}" if mode in MODES else "nnclr"
        print(f"{prefix}: error: {detail}; see nnclr {mode + ' ' if mode in MODES else ''}--help.",
              file=sys.stderr)
        sys.exit(2)


def run() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow turns its oneDNN kernels on by itself only on CPUs with AVX-512 VNNI / BF16 or
    # AMX; on AVX2 CPUs they still run the default job's step 1.5x faster than the default
    # kernels (2.8x a ResNet-18's; BUILD.md, "The default job"). Read once, on import: an
    # explicit TF_ENABLE_ONEDNN_OPTS=0 keeps them off.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    words = sys.argv[1:]
    asked = [word for word in words if word in _HELP + _HELP_FULL]
    if asked:
        rest = [word for word in words if word not in asked]
        app.run(functools.partial(show_help, full=any(w in _HELP_FULL for w in asked)),
                argv=[sys.argv[0], *rest])
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
