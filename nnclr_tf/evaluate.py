"""Public entry point of the evaluation protocols; the code lives in `nnclr_tf/evaluation/`.

    from nnclr_tf.evaluate import extract_features, knn_accuracy, linear_probe_accuracy
"""

from nnclr_tf.evaluation import *  # noqa: F401,F403  (the names listed in evaluation.__all__)
from nnclr_tf.evaluation import __all__  # noqa: F401
