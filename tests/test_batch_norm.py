"""The fused batch norm against Keras' own layer: outputs, gradients, moving statistics, round trip."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import parameterized

from conftest import round_trip
from nnclr_tf.batch_norm import BatchNormalization


def _pair(shape, policy, synchronized, seed=0):
    """Keras' layer and ours with the same (random) gamma and beta, both built for `shape`."""
    rng = np.random.default_rng(seed)
    kwargs = dict(momentum=0.9, epsilon=1e-5, synchronized=synchronized, dtype=policy)
    reference, fused = keras.layers.BatchNormalization(**kwargs), BatchNormalization(**kwargs)
    gamma = rng.normal(size=shape[-1:]).astype(np.float32)
    beta = rng.normal(size=shape[-1:]).astype(np.float32)
    for layer in (reference, fused):
        layer.build(shape)
        layer.gamma.assign(gamma)
        layer.beta.assign(beta)
    return reference, fused


def _train_and_infer(layer, x):
    """Output, gradients (x, gamma, beta), moving stats after two training calls, inference output."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        # A loss that is not invariant to the normalisation, so the x-gradient is not ~0.
        loss = tf.reduce_sum(tf.cast(y, tf.float32) ** 3)
    grads = tape.gradient(loss, [x, layer.gamma, layer.beta])
    layer(x * 0.5 + 1.0, training=True)
    inference = layer(x, training=False)
    return [y, *grads, layer.moving_mean, layer.moving_variance, inference]


class BatchNormTest(parameterized.TestCase):

    @parameterized.product(
        shape=[(16, 5, 5, 16), (32, 16)],
        policy=["float32", "mixed_bfloat16"],
        synchronized=[False, True],
    )
    def test_matches_keras(self, shape, policy, synchronized):
        reference, fused = _pair(shape, policy, synchronized)
        self.assertTrue(fused._fused_applies(tf.zeros(shape), None))
        x = tf.constant(np.random.default_rng(1).normal(2.0, 3.0, shape).astype(np.float32))
        expected, actual = _train_and_infer(reference, x), _train_and_infer(fused, x)
        self.assertEqual(actual[0].dtype, expected[0].dtype)
        # bfloat16 keeps 8 bits of mantissa: compare relative to the largest value.
        rtol = 1e-5 if policy == "float32" else 1e-3
        names = ["output", "grad x", "grad gamma", "grad beta", "moving mean", "moving variance",
                 "inference output"]
        for name, e, a in zip(names, expected, actual):
            e, a = (np.asarray(tf.cast(t, tf.float32)) for t in (e, a))
            np.testing.assert_allclose(a, e, atol=rtol * np.abs(e).max(), err_msg=name)

    def test_frozen_layer_uses_moving_statistics(self):
        reference, fused = _pair((8, 3, 3, 16), "float32", False)
        for layer in (reference, fused):
            layer.moving_mean.assign(np.arange(16, dtype=np.float32))
            layer.trainable = False
        x = np.random.default_rng(2).normal(size=(8, 3, 3, 16)).astype(np.float32)
        np.testing.assert_allclose(fused(x, training=True), reference(x, training=True), atol=1e-5)
        np.testing.assert_array_equal(fused.moving_mean, np.arange(16))

    def test_few_channels_defer_to_keras(self):
        fused = BatchNormalization()
        self.assertFalse(fused._fused_applies(tf.zeros((4, 3, 3, 8)), None))
        self.assertTrue(fused._fused_applies(tf.zeros((4, 3, 3, 16)), None))

    def test_other_axes_and_masks_defer_to_keras(self):
        x = np.random.default_rng(3).normal(size=(4, 6, 5)).astype(np.float32)
        for kwargs in (dict(axis=1), dict()):  # axis 1; rank 3 (the kernel takes rank 4)
            reference = keras.layers.BatchNormalization(**kwargs)
            fused = BatchNormalization(**kwargs)
            np.testing.assert_allclose(fused(x, training=True), reference(x, training=True),
                                       atol=1e-5)

    def test_round_trip(self):
        layer = BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=True)
        x = np.random.default_rng(4).normal(size=(6, 4, 4, 3)).astype(np.float32)
        layer(x, training=True)
        self.assertIsInstance(round_trip(layer, x), BatchNormalization)


_TWO_REPLICAS = """
import sys
import numpy as np
import tensorflow as tf
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0], [tf.config.LogicalDeviceConfiguration()] * 2)
from nnclr_tf.batch_norm import BatchNormalization
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    layer = BatchNormalization(momentum=0.0, synchronized=sys.argv[1] == "sync")
    layer.build((None, 16))
x = np.concatenate([np.zeros((4, 16), np.float32), np.full((4, 16), 4.0, np.float32)])
batches = strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(x))
strategy.run(tf.function(lambda batch: layer(batch, training=True)), args=(next(iter(batches)),))
print("STATS", *layer.moving_mean.numpy(), *layer.moving_variance.numpy())
"""


@pytest.mark.parametrize("mode, mean, variance", [
    ("sync", 2.0, 4.0),  # Keras' all-reduce path: the global batch [0]*4 + [4]*4
    ("local", None, 0.0),  # the fused kernel on each replica's constant half
])
def test_statistics_under_two_replicas(mode, mean, variance):
    """Synchronized BN keeps global-batch statistics across replicas (the fused kernel is not
    used there); unsynchronized BN uses each replica's own batch."""
    result = subprocess.run([sys.executable, "-c", _TWO_REPLICAS, mode], capture_output=True,
                            text=True, timeout=300, check=False,
                            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    line = [l for l in result.stdout.splitlines() if l.startswith("STATS")]
    assert line, result.stderr[-3000:]
    stats = np.array(line[0].split()[1:], np.float32)
    if mean is not None:
        np.testing.assert_allclose(stats[:16], mean, atol=1e-6)
    np.testing.assert_allclose(stats[16:], variance, atol=1e-5)
