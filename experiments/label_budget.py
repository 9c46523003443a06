"""How many labels does the linear probe need before an encoder beats raw pixels?

Scores a pretrained run's encoder and raw pixels (28x28, flattened) on the full Fashion-MNIST
(Debian's `dataset-fashion-mnist`, dataset name `fashion_mnist_full`) with the report's linear
probe, trained either on the 10,000 training images the embedded set ships or on all 60,000, and
tested on the embedded set's 2,000 test images, on the other 8,000 and on all 10,000. The embedded
images are found in the full files by their pixels. Prints a Markdown table.

    python experiments/label_budget.py runs/demo
"""

import sys

import keras
import numpy as np

from nnclr_tf import evaluate, train
from nnclr_tf.data import evaluation_dataset, load_arrays
from nnclr_tf.data.tfds_builder import embedded_path


def rows_in_full(split, images):
    """The positions of `images` (uint8 [N, 28, 28]) in fashion_mnist_full's `split`."""
    full = load_arrays("fashion_mnist_full", split)[0]
    where = {full[i].tobytes(): i for i in range(len(full))}
    return np.array([where[image.reshape(full.shape[1:]).tobytes()] for image in images])


def features(encoder, split, image_size):
    batches = evaluation_dataset("fashion_mnist_full", split, image_size=image_size)
    return evaluate.extract_features(encoder, batches)


def main(run_dir):
    model, config = train.load_pretrained(run_dir)
    embedded = np.load(embedded_path())
    train_rows = rows_in_full("train", embedded["train_images"])
    test_rows = rows_in_full("test", embedded["test_images"])
    pixels = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten()])
    encoders = {"raw pixels (28x28)": (pixels, 28),
                "encoder": (model.encoder, config.data.image_size)}
    table = {}
    for name, (encoder, size) in encoders.items():
        train_x, train_y = features(encoder, "train", size)
        test_x, test_y = features(encoder, "test", size)
        assert (train_y[train_rows] == embedded["train_labels"]).all()
        assert (test_y[test_rows] == embedded["test_labels"]).all()
        for labels, rows in (("10,000 (the embedded set's)", train_rows),
                             ("60,000 (all)", np.arange(len(train_y)))):
            result = evaluate.linear_probe_accuracy(train_x[rows], train_y[rows], test_x, test_y,
                                                    num_classes=10, return_predictions=True)
            right = result["predictions"] == test_y
            table[name, labels] = (right[test_rows].mean(), np.delete(right, test_rows).mean(),
                                   right.mean())
    print(f"Linear-probe top-1 on Fashion-MNIST's test images, encoder of {run_dir}:\n")
    print("| features | probe trained on | embedded test (2,000) | other test (8,000) | "
          "all test (10,000) |")
    print("| --- | --- | --- | --- | --- |")
    for (name, labels), scores in table.items():
        print(f"| {name} | {labels} | " + " | ".join(f"{s:.4f}" for s in scores) + " |")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
