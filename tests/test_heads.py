"""Projection / prediction heads and the linear probe: structure, dtypes, round trips."""

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from conftest import round_trip
from nnclr_tf.heads import LinearProbe, PredictionHead, ProjectionHead


def _features(batch=6, dim=12, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, dim)).astype(np.float32)


class HeadsTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("projection", ProjectionHead, dict(hidden_dims=(16, 8), output_dim=4)),
        ("projection_sync_bn", ProjectionHead,
         dict(hidden_dims=(16,), output_dim=4, synchronized_bn=True)),
        ("prediction", PredictionHead, dict(hidden_dims=(16,), output_dim=4)),
        ("probe", LinearProbe, dict(num_classes=3)),
    )
    def test_round_trip(self, cls, kwargs):
        layer = cls(**kwargs)
        outputs = layer(_features())
        self.assertEqual(outputs.shape, (6, 3 if cls is LinearProbe else 4))
        reloaded = round_trip(layer, _features(seed=1))
        self.assertEqual(reloaded.get_config(), layer.get_config())

    def test_projection_structure(self):
        head = ProjectionHead(hidden_dims=(16, 8), output_dim=4, synchronized_bn=True)
        head.build((None, 12))
        dense = head.hidden_dense + [head.output_dense]
        bn = head.hidden_bn + [head.output_bn]
        self.assertEqual([d.units for d in dense], [16, 8, 4])
        self.assertTrue(all(not d.use_bias for d in dense))  # BN follows every Dense
        self.assertTrue(all(b.synchronized for b in bn))
        # 3 Dense kernels + 3 BN (gamma, beta) trainable.
        self.assertLen(head.trainable_weights, 3 + 2 * 3)

    def test_projection_last_layer_has_no_relu(self):
        head = ProjectionHead(hidden_dims=(16,), output_dim=8)
        outputs = head(_features(batch=32), training=True).numpy()
        # Last BN without ReLU: batch-normalised outputs are negative about half of the time.
        self.assertGreater(np.mean(outputs < 0), 0.3)
        hidden = tf.nn.relu(head.hidden_bn[0](head.hidden_dense[0](_features(batch=32)),
                                              training=True))
        self.assertTrue(np.all(hidden.numpy() >= 0))

    def test_prediction_structure(self):
        head = PredictionHead(hidden_dims=(16,), output_dim=4)
        head.build((None, 4))
        self.assertTrue(head.output_dense.use_bias)
        self.assertEqual(head.hidden_dense[0].units, 16)
        self.assertLen(head.hidden_bn, 1)

    def test_probe_blocks_gradient_to_features(self):
        probe = LinearProbe(3)
        features = tf.Variable(_features())
        with tf.GradientTape(persistent=True) as tape:
            loss = tf.reduce_sum(probe(features))
        self.assertIsNone(tape.gradient(loss, features))
        self.assertTrue(all(g is not None
                            for g in tape.gradient(loss, probe.trainable_weights)))

    @parameterized.named_parameters(
        ("projection", lambda: ProjectionHead((16,), 4)),
        ("prediction", lambda: PredictionHead((16,), 4)),
        ("probe", lambda: LinearProbe(3)),
    )
    def test_float32_outputs_under_mixed_bfloat16(self, make):
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        try:
            layer = make()
            outputs = layer(_features(), training=True)
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        self.assertEqual(outputs.dtype, tf.float32)
        if not isinstance(layer, LinearProbe):
            self.assertEqual(layer.hidden_dense[0].compute_dtype, "bfloat16")

    @parameterized.parameters(
        (ProjectionHead, dict(hidden_dims=(0,))), (PredictionHead, dict(output_dim=-1)),
        (LinearProbe, dict(num_classes=0)))
    def test_bad_arguments(self, cls, kwargs):
        with self.assertRaises(ValueError):
            cls(**kwargs)


if __name__ == "__main__":
    absltest.main()
