"""The end-of-run report: kNN and linear-probe top-1 of the trained encoder beside raw pixels and a
random one, through one protocol, with McNemar's test of whether the trained encoder and raw pixels
differ by more than chance on these test images; the exported SavedModel, and the pictures
(training curves, nearest-neighbour grid); and, built from the same config, the kNN monitor that
reports kNN top-1 during pretraining.

    callbacks = knn_monitor_callbacks(config, num_classes)   # [] unless eval.knn_every_epochs > 0
    scores = encoder_scores(encoder, config, num_classes)    # {"knn_top1", "linear_top1", ...}
    baseline = raw_pixel_scores(config, num_classes)         # the same protocol on raw pixels
    text = format_report(report)   # report.md: trained / raw pixels / random init, in percent

On large datasets the probes and the kNN bank take a seeded, class-balanced sample of at most
REPORT_MAX_TRAIN_EXAMPLES training images (ImageNet: 60,000 of 1.28 M), stated in the protocol.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import keras
import numpy as np

from nnclr_tf import backbones, evaluate, pictures
from nnclr_tf.config import Config
from nnclr_tf.data import dataset_info, evaluation_dataset, load_arrays
from nnclr_tf.data.subsets import subset_size
from nnclr_tf.runs import RunDir, write_json, write_text

log = logging.getLogger("nnclr_tf")

# Raw pixels are scored up to 64 x 64 x 3 features; ImageNet's 224 x 224 x 3 would not fit the probe.
RAW_PIXEL_LIMIT = 64 * 64 * 3
# At most this many training images for the report's probes and kNN bank (and the kNN monitor's
# bank): a seeded, class-balanced sample beyond it. Sized so that Fashion-MNIST (60,000) and
# CIFAR (50,000) are scored whole, as before; ImageNet's 1.28 M would mean extracting every
# training image on the chief and fitting seven L-BFGS probes on 1.28 M x 2048 features, twice.
REPORT_MAX_TRAIN_EXAMPLES = 60_000


def _eval_images(config: Config, split: str, limit: int, batch: int = 256):
    """Un-augmented (images, labels) batches of the first `limit` examples of `split` (0: all)."""
    d = config.data
    dataset = evaluation_dataset(d.dataset, split, data_dir=d.data_dir, batch_size=batch,
                                 holdout_fraction=d.holdout_fraction,
                                 image_size=d.image_size)
    if limit:
        dataset = dataset.take(math.ceil(limit / batch))
    return dataset


def train_sample_size(config: Config, max_train_examples: int = REPORT_MAX_TRAIN_EXAMPLES):
    """(images the report trains on, images in data.eval_train_split, sampled): the split or its
    first eval.max_eval_examples, unless that exceeds `max_train_examples`; then a seeded
    (run.seed), class-balanced sample of `max_train_examples` from the whole split."""
    d = config.data
    total = dataset_info(d.dataset, d.eval_train_split, d.data_dir,
                         holdout_fraction=d.holdout_fraction).num_examples
    wanted = min(total, config.eval.max_eval_examples or total)
    if wanted <= max_train_examples:
        return wanted, total, False
    return subset_size(max_train_examples / total, total), total, True


def _train_images(config: Config, max_train_examples: int = REPORT_MAX_TRAIN_EXAMPLES,
                  batch: int = 256):
    """(batches of the report's training images, their count): see train_sample_size."""
    d = config.data
    count, total, sampled = train_sample_size(config, max_train_examples)
    if not sampled:
        return _eval_images(config, d.eval_train_split, config.eval.max_eval_examples, batch), count
    dataset = evaluation_dataset(d.dataset, d.eval_train_split, data_dir=d.data_dir,
                                 batch_size=batch, holdout_fraction=d.holdout_fraction,
                                 image_size=d.image_size, label_fraction=count / total,
                                 seed=config.run.seed)
    return dataset, count


def _features(encoder, config: Config, split: str, limit: int):
    features, labels = evaluate.extract_features(encoder, _eval_images(config, split, limit))
    return features[:limit or None], labels[:limit or None]


def _train_features(encoder, config: Config, max_train_examples: int):
    dataset, count = _train_images(config, max_train_examples)
    features, labels = evaluate.extract_features(encoder, dataset)
    return features[:count], labels[:count]


def knn_monitor_callbacks(config: Config, num_classes: int) -> list:
    """[KNNMonitor] writing "knn_top1" into the epoch logs every eval.knn_every_epochs epochs.

    The bank is data.eval_train_split and the queries data.eval_split, each cut to
    eval.max_eval_examples (0: whole split); k and temperature are eval.knn_k and
    eval.knn_temperature. Returns [] when eval.knn_every_epochs is 0 or the dataset has no labels,
    so `fit(callbacks=[..., *knn_monitor_callbacks(config, n), CSVLogger(...)])` always works;
    put it before CSVLogger and TensorBoard so that they record the key.
    """
    e = config.eval
    if e.knn_every_epochs <= 0 or num_classes <= 0:
        return []
    limit = e.max_eval_examples
    bank, _ = _train_images(config)  # the report's training images
    queries = _eval_images(config, config.data.eval_split, limit)
    # Rows past `limit` in the last batch are kept: the monitor tracks a trend, not the report's number.
    return [evaluate.KNNMonitor(bank, queries, num_classes=num_classes, every=e.knn_every_epochs,
                                k=e.knn_k, temperature=e.knn_temperature, first_epoch=True)]


def encoder_scores(encoder, config: Config, num_classes: int,
                   max_train_examples: int = REPORT_MAX_TRAIN_EXAMPLES) -> dict:
    """kNN and linear-probe top-1 on the eval split, the bank / training set being eval_train_split
    (at most `max_train_examples` of it: `train_sample_size`)."""
    return _scores_and_correct(encoder, config, num_classes, max_train_examples)[0]


def _scores_and_correct(encoder, config: Config, num_classes: int, max_train_examples: int):
    """(encoder_scores' dict, {"labels", "knn", "linear"}: the test labels and, per probe, whether
    each test image was classified right), for paired comparisons of two encoders."""
    d, e = config.data, config.eval
    train_x, train_y = _train_features(encoder, config, max_train_examples)
    test_x, test_y = _features(encoder, config, d.eval_split, e.max_eval_examples)
    knn = evaluate.knn_accuracy(train_x, train_y, test_x, test_y, num_classes=num_classes,
                                k=min(e.knn_k, len(train_x)), temperature=e.knn_temperature,
                                return_predictions=True)
    linear = evaluate.linear_probe_accuracy(train_x, train_y, test_x, test_y,
                                            num_classes=num_classes, return_predictions=True)
    test_y = np.asarray(test_y).reshape(-1)
    correct = {"labels": test_y, "knn": knn["predictions"] == test_y,
               "linear": linear["predictions"] == test_y}
    return ({"knn_top1": float(knn["top1"]), "linear_top1": float(linear["top1"]),
             "num_train": len(train_y), "num_test": len(test_y)}, correct)


def paired_tests(correct_a: dict, correct_b: dict) -> dict | None:
    """McNemar's exact p-values of encoder a against encoder b on the same test images, per probe:
    {"knn_p", "linear_p", "test"}; None when the two were not scored on the same labelled images."""
    if not np.array_equal(correct_a["labels"], correct_b["labels"]):
        return None
    return {"knn_p": evaluate.mcnemar_exact_p(correct_a["knn"], correct_b["knn"]),
            "linear_p": evaluate.mcnemar_exact_p(correct_a["linear"], correct_b["linear"]),
            "test": "McNemar's exact test (two-sided) on the per-image correctness of the two "
                    "encoders over the same test images"}


def raw_pixel_size(config: Config) -> int:
    """The side at which raw pixels are scored: the stored images' when they are smaller than
    data.image_size (Fashion-MNIST's 28 px for the 56 px demo), since upsampling is a linear map
    that adds no information but multiplies the probe's features (and its time) by 4; else
    data.image_size."""
    d = config.data
    height, width, _ = dataset_info(d.dataset, d.eval_split, d.data_dir,
                                    holdout_fraction=d.holdout_fraction).image_shape
    if height and width:
        return min(d.image_size, height, width)
    return d.image_size


def raw_pixel_scores(config: Config, num_classes: int,
                     max_train_examples: int = REPORT_MAX_TRAIN_EXAMPLES) -> dict:
    """encoder_scores with the identity encoder: flattened pixels [batch, H * W * C] in [0, 1].

    The baseline every learned representation has to beat, through the very same kNN and linear
    probe (so it also checks them), at `raw_pixel_size`. Sized for small images: 28x28x1 gives
    784 features.
    """
    return _raw_pixel_scores_and_correct(config, num_classes, max_train_examples)[0]


def _raw_pixel_scores_and_correct(config: Config, num_classes: int, max_train_examples: int):
    size, channels = raw_pixel_size(config), _channels(config)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, image_size=size))
    flatten = keras.layers.Flatten(dtype="float32")  # float32 even under a mixed policy
    pixels = keras.Sequential([keras.Input((size, size, channels)), flatten], name="raw_pixels")
    return _scores_and_correct(pixels, config, num_classes, max_train_examples)


def _channels(config: Config) -> int:
    d = config.data
    return dataset_info(d.dataset, d.eval_split, d.data_dir,
                        holdout_fraction=d.holdout_fraction).image_shape[-1]


def raw_pixel_features(config: Config) -> int:
    """The length of a raw-pixel feature vector: raw_pixel_size^2 x channels."""
    return raw_pixel_size(config) ** 2 * _channels(config)


def random_encoder(config: Config, input_shape):
    """A freshly initialised encoder of the run's architecture, seeded with run.seed."""
    m = config.model
    keras.utils.set_random_seed(config.run.seed)
    return backbones.build_backbone(m.backbone, input_shape=input_shape,
                                    width_multiplier=m.width_multiplier, cifar_stem=m.cifar_stem)


def neighbour_picture(model, config: Config, path: str, class_names=None, queries: int = 8,
                      k: int = 8) -> str:
    """Test images beside their nearest neighbours among training images embedded as a support set."""
    d = config.data
    support_size = min(config.model.queue_size, 4096)
    support_images, support_labels = load_arrays(d.dataset, d.eval_train_split, data_dir=d.data_dir,
                                                 holdout_fraction=d.holdout_fraction,
                                                 image_size=d.image_size, limit=support_size)
    query_images, query_labels = load_arrays(d.dataset, d.eval_split, data_dir=d.data_dir,
                                             holdout_fraction=d.holdout_fraction,
                                             image_size=d.image_size, limit=512)
    # One query per class where possible, so the grid shows the whole label space.
    _, first = np.unique(query_labels, return_index=True)
    chosen = np.sort(first)[:queries]
    query_images, query_labels = query_images[chosen], query_labels[chosen]
    indices = pictures.nearest_neighbour_images(model.encoder, query_images, support_images, k=k,
                                                projection_head=model.projection_head)
    pictures.plot_neighbour_grid(query_images, support_images[indices], path,
                                 query_labels=query_labels, neighbour_labels=support_labels[indices],
                                 class_names=class_names)
    return path


def write_report(model, config: Config, run_dir: RunDir, input_shape, info) -> dict:
    report = {"dataset": config.data.dataset, "eval_split": config.data.eval_split,
              "steps": int(model.optimizer.iterations.numpy()), "model_dir": run_dir.path}
    if info.description or info.num_classes == 0:  # e.g. an image folder's held-out split; no labels
        report["data"] = info.description or (f"Dataset {info.name!r} has no labels, so there are "
                                              "no kNN or linear-probe scores.")
    if config.run.export:
        report["saved_model"] = run_dir.export(model, input_shape)
    if info.num_classes > 0:
        report["config"] = config_summary(config)
        report["trained"], trained_correct = _scores_and_correct(
            model.encoder, config, info.num_classes, REPORT_MAX_TRAIN_EXAMPLES)
        # The baseline a representation has to beat: the pixels it was computed from.
        if raw_pixel_features(config) <= RAW_PIXEL_LIMIT:
            report["raw_pixels"], raw_correct = _raw_pixel_scores_and_correct(
                config, info.num_classes, REPORT_MAX_TRAIN_EXAMPLES)
            size = raw_pixel_size(config)
            report["raw_pixels"]["pixels"] = f"{size}x{size}x{_channels(config)}"
            tests = paired_tests(trained_correct, raw_correct)
            if tests is not None:
                report["trained_vs_raw_pixels"] = tests
        report["random_init"] = encoder_scores(random_encoder(config, input_shape), config,
                                               info.num_classes)
        report["protocol"] = protocol(config, report["trained"], REPORT_MAX_TRAIN_EXAMPLES)
        report["verdict"] = raw_pixel_verdict(report, raw_pixel_features(config))
    curves = run_dir.file("training_curves.png")
    pictures.plot_training_curves(pictures.read_csv_log(run_dir.csv_log), curves)
    report["pictures"] = [curves]
    if info.num_classes > 0:
        report["pictures"].append(neighbour_picture(model, config, run_dir.file("neighbours.png"),
                                                     class_names=info.class_names))
    report["tensorboard"] = run_dir.tensorboard
    write_json(run_dir.file("report.json"), report)
    text = format_report(report)
    write_text(run_dir.file("report.md"), text)
    print(text, flush=True)
    return report


def config_summary(config: Config) -> dict:
    """The settings that decide the numbers, for the report (the whole config is config.json)."""
    m, d, o, r = config.model, config.data, config.optim, config.run
    return {"backbone": m.backbone, "width_multiplier": m.width_multiplier, "cifar_stem": m.cifar_stem,
            "image_size": d.image_size, "batch_size": o.batch_size, "epochs": o.epochs,
            "train_steps": o.train_steps, "optimizer": o.optimizer,
            "base_learning_rate": o.base_learning_rate, "queue_size": m.queue_size,
            "temperature": m.temperature, "positive": m.positive, "augment": config.augment.preset,
            "mixed_precision": r.mixed_precision, "seed": r.seed}


def protocol(config: Config, scores: dict,
             max_train_examples: int = REPORT_MAX_TRAIN_EXAMPLES) -> dict:
    """How the report's numbers were measured: splits, example counts, k and temperature, and the
    training sample when the split was larger than `max_train_examples`."""
    d, e = config.data, config.eval
    result = {"train_split": d.eval_train_split, "test_split": d.eval_split,
              "num_train": scores["num_train"], "num_test": scores["num_test"],
              "max_train_examples": int(max_train_examples),
              "knn_k": min(e.knn_k, scores["num_train"]), "knn_temperature": e.knn_temperature,
              "linear_probe": "L2-regularised logistic regression (L-BFGS) on standardised frozen "
                              "features, L2 chosen on 20% of the training features"}
    count, total, sampled = train_sample_size(config, max_train_examples)
    if sampled:
        result["train_sample"] = (
            f"a class-balanced sample of {count} of the {total} images of the "
            f"'{d.eval_train_split}' split, drawn with seed {config.run.seed} (the report uses at "
            f"most {max_train_examples} training images)")
    return result


def raw_pixel_verdict(report: dict, pixel_features: int) -> str:
    """One sentence: does the trained encoder beat raw pixels on kNN and on the linear probe, and
    are the differences larger than chance on this many test images
    (report["trained_vs_raw_pixels"], when the report has it)?"""
    if "raw_pixels" not in report:
        return (f"Raw pixels were not scored: {pixel_features} features per image is more than the "
                f"probe is sized for ({RAW_PIXEL_LIMIT}).")
    trained, raw = report["trained"], report["raw_pixels"]
    parts = {name: f"{label} ({_percent(trained[key])} % vs {_percent(raw[key])} %)"
             for name, key, label in (("knn", "knn_top1", "kNN"),
                                      ("linear", "linear_top1", "the linear probe"))}
    beats = {name: trained[f"{name}_top1"] > raw[f"{name}_top1"] for name in parts}
    if all(beats.values()):
        claim = f"The trained encoder beats raw pixels on both {parts['knn']} and {parts['linear']}"
    elif not any(beats.values()):
        claim = (f"The trained encoder does not beat raw pixels, neither on {parts['knn']} nor on "
                 f"{parts['linear']}")
    else:
        better, worse = ("knn", "linear") if beats["knn"] else ("linear", "knn")
        claim = (f"The trained encoder beats raw pixels on {parts[better]} but not on "
                 f"{parts[worse]}")
    return claim + _significance(report.get("trained_vs_raw_pixels"), trained.get("num_test")) + "."


def _significance(tests: dict | None, num_test) -> str:
    """The verdict's closing clause: both p-values and which differences are significant at 5 %
    (empty without paired tests)."""
    if not tests:
        return ""
    significant = {name: tests[f"{name}_p"] < 0.05 for name in ("knn", "linear")}
    if all(significant.values()):
        conclusion = "both differences are significant"
    elif not any(significant.values()):
        conclusion = "neither difference is significant"
    else:
        conclusion = ("only the kNN difference is significant" if significant["knn"]
                      else "only the linear-probe difference is significant")
    return (f"; McNemar's exact test on these {num_test} test images gives "
            f"{_p_value(tests['knn_p'])} (kNN) and {_p_value(tests['linear_p'])} (linear probe), "
            f"so {conclusion} at the 5 % level")


def _p_value(p: float) -> str:
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def _percent(fraction: float) -> str:
    return f"{100.0 * fraction:.1f}"


def format_report(report: dict) -> str:
    """report.md (and the console): Markdown, accuracies in percent like every results file."""
    lines = [f"## NNCLR report: {report['dataset']} ({report['steps']} training steps)", ""]
    if report.get("data"):
        lines += [report["data"], ""]
    if "config" in report:
        c = report["config"]
        length = f"{c['train_steps']} steps" if c["train_steps"] > 0 else f"{c['epochs']} epochs"
        lines += [f"Config: {c['backbone']} x{c['width_multiplier']}"
                  f"{' (CIFAR stem)' if c['cifar_stem'] else ''}, {c['image_size']} px, batch "
                  f"{c['batch_size']}, {length}, {c['optimizer']} at base learning rate "
                  f"{c['base_learning_rate']}, support set {c['queue_size']}, temperature "
                  f"{c['temperature']}, positive {c['positive']}, augment {c['augment']}, precision "
                  f"{c['mixed_precision']}, seed {c['seed']} (all settings: config.json).", ""]
    if "trained" in report:
        p = report["protocol"]
        lines += [f"Top-1 accuracy (%) on {p['num_test']} images of the '{p['test_split']}' split, "
                  f"from frozen features; bank and probe training set: {p['num_train']} images of "
                  f"the '{p['train_split']}' split"
                  + (f" ({p['train_sample']})" if p.get("train_sample") else "")
                  + f". kNN: k={p['knn_k']} cosine neighbours, votes "
                  f"weighted exp(cosine / {p['knn_temperature']}). Linear probe: "
                  f"{p['linear_probe']}."
                  + (f" Raw pixels: the {report['raw_pixels']['pixels']} stored images, flattened."
                     if "pixels" in report.get("raw_pixels", {}) else ""), "",
                  "| encoder | kNN top-1 (%) | linear-probe top-1 (%) |",
                  "| --- | --- | --- |"]
        for name in ("trained", "raw_pixels", "random_init"):
            if name in report:
                scores = report[name]
                lines.append(f"| {name.replace('_', ' ')} | {_percent(scores['knn_top1'])} | "
                             f"{_percent(scores['linear_top1'])} |")
        lines += ["", report["verdict"], ""]
    if "saved_model" in report:
        lines.append(f"SavedModel (serving signature): {report['saved_model']}")
    lines.append(f"Pictures: {', '.join(report['pictures'])}")
    lines.append(f"TensorBoard: tensorboard --logdir {report['tensorboard']}")
    return "\n".join(lines) + "\n"
