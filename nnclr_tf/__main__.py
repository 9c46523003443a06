"""`python -m nnclr_tf MODE --flags` is the same as the `nnclr` command."""

from nnclr_tf.cli import run

run()
