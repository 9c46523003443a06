"""Public entry point of the evaluation protocols; the code lives in `nnclr_tf/evaluation/`, whose
docstring lists one function per protocol (`knn_evaluate`, `linear_probe_evaluate`,
`linear_evaluation`, `fine_tune`, `transfer_suite`), each taking an encoder.
"""

from nnclr_tf.evaluation import *  # noqa: F401,F403  (the names listed in evaluation.__all__)
from nnclr_tf.evaluation import __all__  # noqa: F401
