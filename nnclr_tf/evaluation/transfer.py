"""Transfer suite: the linear fast path on frozen features of each downstream dataset.

rows = transfer_suite(encoder, ["cifar10", "dtd"], data_dir="~/tensorflow_datasets", image_size=224)
print(write_results(rows, model_dir, "transfer"))   # JSON + Markdown beside the paper's numbers
"""

import math
import os

from nnclr_tf.evaluation.features import extract_features
from nnclr_tf.evaluation.linear import DEFAULT_L2_GRID, linear_probe_accuracy

# The paper's transfer numbers (ResNet-50, linear evaluation on frozen features, percent).
# Keys are TFDS names; "fgvc_aircraft" and "birdsnap" have no TFDS builder, so they are not in the
# default list and only run when named with a `load_fn` that supplies them (e.g. image folders).
PAPER_TRANSFER = {
    "food101": 76.7,
    "cifar10": 93.7,
    "cifar100": 79.0,
    "sun397": 62.5,
    "cars196": 67.1,
    "fgvc_aircraft": 64.1,
    "voc/2007": 83.0,
    "dtd": 75.5,
    "oxford_iiit_pet": 91.8,
    "oxford_flowers102": 95.1,
    "birdsnap": 61.4,
    "caltech101": 91.3,
}
# What the paper's number measures, where it is not top-1 (Kornblith et al. 2019's protocol).
PAPER_METRIC = {
    "fgvc_aircraft": "mean_per_class",
    "oxford_iiit_pet": "mean_per_class",
    "oxford_flowers102": "mean_per_class",
    "caltech101": "mean_per_class",
    "voc/2007": "mAP (11-point, multi-label; ours is single-label top-1)",
}
# (train, test) TFDS splits per dataset; training merges train + validation where TFDS has both.
TRANSFER_SPLITS = {
    "food101": ("train", "validation"),
    "voc/2007": ("train+validation", "test"),
    "dtd": ("train+validation", "test"),
    "oxford_flowers102": ("train+validation", "test"),
}
# What transfer_suite runs by default: the paper's datasets that TFDS can build.
DEFAULT_TRANSFER_DATASETS = tuple(name for name in PAPER_TRANSFER
                                  if name not in ("fgvc_aircraft", "birdsnap"))
_PERCENT_KEYS = ("top1", "top5", "mean_per_class", "val_top1", "knn_top1")


def _default_load_fn(data_dir, image_size, batch_size, channels):
    def load(name, split):
        from nnclr_tf import data  # imported here: the suite itself needs no data pipeline

        return data.evaluation_dataset(
            name,
            split,
            data_dir=data_dir,
            batch_size=batch_size,
            image_size=image_size,
            channels=channels,
        )

    return load


def _input_channels(encoder):
    """The encoder's input channels (1 or 3), or None when its input shape is not known."""
    shape = getattr(encoder, "input_shape", None)
    channels = shape[-1] if isinstance(shape, tuple) and shape else None
    return channels if channels in (1, 3) else None


def transfer_suite(
    encoder,
    datasets=None,
    data_dir=None,
    image_size=224,
    load_fn=None,
    batch_size=256,
    l2_grid=DEFAULT_L2_GRID,
    splits=None,
    num_classes=None,
):
    """Linear fast-path evaluation of `encoder` on each dataset; unprepared ones are skipped.

    Args:
      encoder: keras.Model, images [batch, H, W, C] float in [0, 1] -> features [batch, D].
      datasets: dataset names: TFDS names, "embedded", "fashion_mnist_full" or image folders
        (None or empty: DEFAULT_TRANSFER_DATASETS, the paper's ten that TFDS has).
      load_fn: `load_fn(name, split) -> tf.data` of (images, labels) batches; by default
        `nnclr_tf.data.evaluation_dataset(name, split, data_dir, batch_size, image_size)`, with
        the images converted to the encoder's input channels (grayscale <-> RGB). A
        ValueError / FileNotFoundError from it (e.g. DatasetNotPreparedError) marks the dataset
        skipped, with the message as the reason.
      splits: {name: (train_split, test_split)} overriding TRANSFER_SPLITS (otherwise
        ("train", "test")).
      num_classes: {name: classes}; by default 1 + the largest label seen in train or test.

    Returns:
      a list of row dicts: dataset, status ("ok" / "skipped"), top1, top5, mean_per_class, l2,
      val_top1, num_train, num_test, num_classes, paper (percent, or None), paper_metric,
      protocol ("linear_probe": L-BFGS logistic regression, L2 chosen on 20 % of the training
      features), train_split, test_split, reason.
    """
    if isinstance(datasets, str):
        datasets = [datasets]
    datasets = list(datasets or DEFAULT_TRANSFER_DATASETS)
    load_fn = load_fn or _default_load_fn(
        data_dir, image_size, batch_size, _input_channels(encoder)
    )
    splits = {**TRANSFER_SPLITS, **(splits or {})}
    rows = []
    for name in datasets:
        row = {
            "dataset": name,
            "paper": PAPER_TRANSFER.get(name),
            "paper_metric": PAPER_METRIC.get(name, "top1"),
        }
        train_split, test_split = splits.get(name, ("train", "test"))
        row.update(protocol="linear_probe", train_split=train_split, test_split=test_split)
        try:
            train_ds, test_ds = load_fn(name, train_split), load_fn(name, test_split)
        except (ValueError, FileNotFoundError) as error:
            rows.append(
                {**row, "status": "skipped", "reason": str(error).strip() or type(error).__name__}
            )
            continue
        train_x, train_y = extract_features(encoder, train_ds)
        test_x, test_y = extract_features(encoder, test_ds)
        if min(train_y.min(), test_y.min()) < 0:
            reason = f"{name!r} has unlabelled images (label -1); a linear probe needs labels."
            rows.append({**row, "status": "skipped", "reason": reason})
            continue
        classes = (num_classes or {}).get(name) or int(max(train_y.max(), test_y.max())) + 1
        results = linear_probe_accuracy(train_x, train_y, test_x, test_y, classes, l2_grid=l2_grid)
        rows.append(
            {
                **row,
                "status": "ok",
                **results,
                "num_train": len(train_y),
                "num_test": len(test_y),
                "num_classes": classes,
            }
        )
    return rows


def _format(key, value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key in _PERCENT_KEYS and isinstance(value, float):
        return f"{100.0 * value:.1f}"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def results_markdown(rows):
    """A Markdown table of result rows; accuracies in percent, the paper's column beside ours."""
    if isinstance(rows, dict):
        rows = [rows]
    columns = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    # Ours first, then the paper's number, then bookkeeping; the skip reason goes last.
    front = [
        c
        for c in ("dataset", "status", "top1", "top5", "mean_per_class", "paper", "paper_metric")
        if c in columns
    ]
    back = [c for c in ("reason",) if c in columns]
    columns = front + [c for c in columns if c not in front + back] + back
    titles = {key: f"{key} (%)" for key in _PERCENT_KEYS}
    titles["paper"] = "paper (%)"
    lines = [
        "| " + " | ".join(titles.get(c, c) for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format(c, row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def write_results(results, model_dir, name):
    """Writes `<model_dir>/<name>.json` and `<model_dir>/<name>.md`; returns the Markdown table.

    `results` is a list of row dicts (e.g. `transfer_suite`'s) or one dict (e.g.
    `linear_evaluation`'s).
    """
    if not name or os.sep in name:
        raise ValueError(f"Results name {name!r} must be a plain file stem such as 'transfer'.")
    from nnclr_tf.runs import write_json, write_text  # through tf.io.gfile: gs://, ram://

    markdown = results_markdown(results)
    write_json(os.path.join(model_dir, f"{name}.json"), results)
    write_text(os.path.join(model_dir, f"{name}.md"), markdown)
    return markdown
