"""Cosine-similarity matmuls at float32 precision on every device.

    logits = float32_matmul(anchors, predictions, transpose_b=True)  # [batch, columns] float32

GPUs run float32 matmuls in TF32 by default (a 10-bit mantissa) and TPUs in one bfloat16 pass (8
bits): cosines of near-identical rows, which the support-set lookup ranks and the loss divides by
a temperature of 0.1, then differ by ~1e-3, enough to swap neighbours. TensorFlow has no per-op
precision, and `tf.config.experimental.enable_tensor_float_32_execution(False)` would slow every
other matmul of the model, so these products are computed exactly where they are needed: each
operand is split into a bfloat16 head and a bfloat16 remainder, whose pairwise products are exact
in TF32 or bfloat16 with float32 accumulation, and three of them (XLA's "HIGH" precision, bf16_3x)
give the product to ~1e-5 relative. On CPUs (and GPUs with TF32 off) one float32 matmul already is.
"""

import tensorflow as tf


def reduced_precision_matmuls(tpu: bool, gpu: bool, tf32_enabled: bool) -> bool:
    """True where a float32 matmul computes with fewer mantissa bits: TPUs, GPUs with TF32 on."""
    return tpu or (gpu and tf32_enabled)


def _platform_rounds_matmuls() -> bool:
    return reduced_precision_matmuls(
        tpu=bool(tf.config.list_logical_devices("TPU")),
        gpu=bool(tf.config.list_logical_devices("GPU")),
        tf32_enabled=tf.config.experimental.tensor_float_32_execution_enabled())


def _split(x):
    """x = head + tail (+ below float32 resolution of the product), head and tail bfloat16-exact."""
    head = tf.cast(tf.cast(x, tf.bfloat16), tf.float32)
    tail = tf.cast(tf.cast(x - head, tf.bfloat16), tf.float32)
    return head, tail


_device_matmul = tf.matmul  # the product the split feeds; tests stand in a bfloat16 one


def float32_matmul(a, b, transpose_b=False, split=None):
    """a @ b (b^T with transpose_b) in float32 at float32 precision: [m, k] x [n, k] -> [m, n].

    split: None decides from the platform (TPU, or GPU with TF32 on); True / False force it.
    """
    a, b = tf.cast(a, tf.float32), tf.cast(b, tf.float32)
    matmul = _device_matmul
    if split is None:
        split = _platform_rounds_matmuls()
    if not split:
        return matmul(a, b, transpose_b=transpose_b)
    (a_head, a_tail), (b_head, b_tail) = _split(a), _split(b)
    # Smallest terms first; tail x tail is below float32 resolution.
    return (matmul(a_tail, b_head, transpose_b=transpose_b)
            + matmul(a_head, b_tail, transpose_b=transpose_b)
            + matmul(a_head, b_head, transpose_b=transpose_b))
