"""Evaluation protocols for a frozen (or fine-tuned) encoder: kNN, linear, fine-tuning, transfer.

One function per protocol takes an encoder keras.Model mapping images [batch, H, W, C] float in
[0, 1] to features [batch, D], and data as a batched tf.data.Dataset of (images, labels) tuples or
{"image", "label"} dicts, or as an (images, labels) tuple of NumPy arrays:

    knn_evaluate(encoder, train, test, num_classes)          # k=200, temperature=0.1
    linear_probe_evaluate(encoder, train, test, num_classes) # L-BFGS logistic regression (fast)
    linear_evaluation(encoder, train, test, num_classes)     # SGD on a frozen encoder, 90 epochs
    fine_tune(encoder, train, test, num_classes)             # the whole encoder, 30 epochs
    transfer_suite(encoder, ["cifar10", "dtd"])              # L-BFGS probe per dataset

On precomputed features: `knn_accuracy` and `linear_probe_accuracy` (`extract_features` makes them;
`return_predictions=True` adds the predicted classes), and `mcnemar_exact_p` to tell whether two
classifiers' accuracies on the same test images differ by more than chance. `EpochLog` (pass it in
`callbacks=`) logs one line per epoch of linear_evaluation or fine_tune, whose fit is silent.
"""

from nnclr_tf.evaluation.classifier import EpochLog
from nnclr_tf.evaluation.features import as_dataset, even_batches, extract_features
from nnclr_tf.evaluation.finetune import fine_tune
from nnclr_tf.evaluation.knn import KNNMonitor, knn_accuracy, knn_evaluate, knn_predict
from nnclr_tf.evaluation.linear import (
    linear_evaluation,
    linear_probe_accuracy,
    linear_probe_evaluate,
)
from nnclr_tf.evaluation.significance import mcnemar_exact_p
from nnclr_tf.evaluation.transfer import (
    DEFAULT_TRANSFER_DATASETS,
    PAPER_METRIC,
    PAPER_TRANSFER,
    TRANSFER_SPLITS,
    results_markdown,
    transfer_suite,
    write_results,
)

__all__ = [
    "DEFAULT_TRANSFER_DATASETS",
    "EpochLog",
    "KNNMonitor",
    "PAPER_METRIC",
    "PAPER_TRANSFER",
    "TRANSFER_SPLITS",
    "as_dataset",
    "even_batches",
    "extract_features",
    "fine_tune",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "linear_evaluation",
    "linear_probe_accuracy",
    "linear_probe_evaluate",
    "mcnemar_exact_p",
    "results_markdown",
    "transfer_suite",
    "write_results",
]
