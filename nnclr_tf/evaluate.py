"""Public entry point of the evaluation protocols; the code lives in `nnclr_tf/evaluation/`.

    from nnclr_tf.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
"""

from nnclr_tf.evaluation import (
    PAPER_METRIC,
    PAPER_TRANSFER,
    TRANSFER_SPLITS,
    KNNMonitor,
    extract_features,
    fine_tune,
    knn_accuracy,
    knn_evaluate,
    knn_predict,
    linear_evaluation,
    linear_probe_accuracy,
    results_markdown,
    transfer_suite,
    write_results,
)

__all__ = [
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
