"""Public entry point of the evaluation protocols; the code lives in `nnclr_tf/evaluation/`.

    from nnclr_tf.evaluate import knn_evaluate, linear_evaluation, fine_tune
    knn_evaluate(encoder, (x_train, y_train), (x_test, y_test), num_classes=10)
"""

from nnclr_tf.evaluation import *  # noqa: F401,F403  (the names listed in evaluation.__all__)
from nnclr_tf.evaluation import __all__  # noqa: F401
