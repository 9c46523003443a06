"""Evaluation protocols for a frozen (or fine-tuned) encoder: kNN, linear, fine-tuning, transfer.

Every protocol takes an encoder keras.Model mapping images [batch, H, W, C] float in [0, 1] to
features [batch, D] and tf.data datasets of (images, labels) batches.
"""

from nnclr_tf.evaluation.features import extract_features
from nnclr_tf.evaluation.finetune import fine_tune
from nnclr_tf.evaluation.knn import KNNMonitor, knn_accuracy, knn_evaluate, knn_predict
from nnclr_tf.evaluation.linear import linear_evaluation, linear_probe_accuracy
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
    "KNNMonitor",
    "PAPER_METRIC",
    "PAPER_TRANSFER",
    "TRANSFER_SPLITS",
    "extract_features",
    "fine_tune",
    "knn_accuracy",
    "knn_evaluate",
    "knn_predict",
    "linear_evaluation",
    "linear_probe_accuracy",
    "results_markdown",
    "transfer_suite",
    "write_results",
]
