"""The NNCLR loss against an independent NumPy implementation of PAPER.md's formula."""

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from nnclr_tf.losses import contrastive_accuracy, contrastive_loss, nnclr_loss


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reference_rows(anchors, predictions, tau, offset=0):
    """L_i = -log(exp(a_i . p_(i+offset) / tau) / sum_k exp(a_i . p_k / tau)) per row i (float64).

    `predictions` holds every column (all-gathered ones, for cross-replica negatives); row i's
    positive is column i + offset.
    """
    a = _normalise(anchors.astype(np.float64))
    p = _normalise(predictions.astype(np.float64))
    losses = []
    for i in range(len(a)):
        scores = np.array([a[i] @ p[k] / tau for k in range(len(p))])
        losses.append(-(scores[i + offset] - np.log(np.sum(np.exp(scores)))))
    return np.array(losses)


def reference_term(anchors, predictions, tau):
    """The mean of `reference_rows` over the batch."""
    return np.mean(reference_rows(anchors, predictions, tau))


def reference_nnclr(nn_1, nn_2, p_1, p_2, tau, transposed):
    terms = [reference_term(nn_1, p_2, tau), reference_term(nn_2, p_1, tau)]
    if transposed:
        terms += [reference_term(p_2, nn_1, tau), reference_term(p_1, nn_2, tau)]
    return np.mean(terms)


def _batch(seed, batch=6, dim=5):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(batch, dim)).astype(np.float32) for _ in range(4)]


class LossTest(parameterized.TestCase):

    @parameterized.parameters(0.1, 0.5)
    def test_term_matches_numpy_both_orientations(self, tau):
        nn_1, _, _, p_2 = _batch(0)
        self.assertAlmostEqual(float(contrastive_loss(nn_1, p_2, tau)),
                               reference_term(nn_1, p_2, tau), delta=1e-5)
        self.assertAlmostEqual(float(contrastive_loss(p_2, nn_1, tau)),
                               reference_term(p_2, nn_1, tau), delta=1e-5)
        # Not symmetric in its arguments: the two orientations must really differ.
        self.assertGreater(abs(reference_term(nn_1, p_2, tau) - reference_term(p_2, nn_1, tau)),
                           1e-3)

    @parameterized.parameters(False, True)
    def test_nnclr_loss_matches_numpy(self, transposed):
        nn_1, nn_2, p_1, p_2 = _batch(1)
        got = nnclr_loss(nn_1, nn_2, p_1, p_2, temperature=0.1, transposed=transposed)
        self.assertEqual(got.dtype, tf.float32)
        self.assertAlmostEqual(float(got), reference_nnclr(nn_1, nn_2, p_1, p_2, 0.1, transposed),
                               delta=1e-5)

    @parameterized.parameters(0.1, 0.5)
    def test_reduction_none_and_sum_per_row(self, tau):
        nn_1, _, _, p_2 = _batch(2)
        expected = reference_rows(nn_1, p_2, tau)
        per_row = contrastive_loss(nn_1, p_2, tau, reduction="none")
        self.assertEqual(per_row.dtype, tf.float32)
        np.testing.assert_allclose(per_row.numpy(), expected, rtol=0, atol=1e-5)
        self.assertGreater(np.ptp(expected), 0.1)  # the rows really differ: no mean passes
        self.assertAlmostEqual(float(contrastive_loss(nn_1, p_2, tau, reduction="sum")),
                               expected.sum(), delta=1e-4)

    def test_reduction_none_with_gathered_columns(self):
        # A replica's rows 4..7 of a global batch of 8: row i's positive is global column i + 4.
        nn_1, _, _, p_2 = _batch(5, batch=8)
        per_row = contrastive_loss(nn_1[4:], p_2[4:], 0.1, reduction="none",
                                   predictions_global=p_2, label_offset=4)
        np.testing.assert_allclose(per_row.numpy(), reference_rows(nn_1[4:], p_2, 0.1, offset=4),
                                   rtol=0, atol=1e-5)

    def test_reduction_none_of_bfloat16_inputs_is_float32(self):
        nn_1, _, _, p_2 = _batch(2)
        nn_1, p_2 = tf.cast(nn_1, tf.bfloat16), tf.cast(p_2, tf.bfloat16)
        per_row = contrastive_loss(nn_1, p_2, 0.1, reduction="none")
        self.assertEqual(per_row.dtype, tf.float32)
        # Against the reference on the bfloat16-rounded inputs: the math after the cast is float32.
        expected = reference_rows(tf.cast(nn_1, tf.float32).numpy(),
                                  tf.cast(p_2, tf.float32).numpy(), 0.1)
        np.testing.assert_allclose(per_row.numpy(), expected, rtol=0, atol=1e-4)

    @parameterized.parameters(False, True)
    def test_gathered_negatives_equal_global_batch(self, transposed):
        """Two simulated replicas: sum of (local loss with global columns) / 2 == global loss."""
        tensors = [tf.Variable(t) for t in _batch(3, batch=8)]
        with tf.GradientTape() as tape:
            single = nnclr_loss(*tensors, temperature=0.1, transposed=transposed)
        single_grads = tape.gradient(single, tensors)

        local = 4
        with tf.GradientTape() as tape:
            replica_losses = []
            for replica in range(2):
                rows = slice(replica * local, (replica + 1) * local)
                local_tensors = [t[rows] for t in tensors]
                replica_losses.append(nnclr_loss(
                    *local_tensors, temperature=0.1, transposed=transposed,
                    gathered=tuple(tf.convert_to_tensor(t) for t in tensors),
                    label_offset=replica * local) / 2)
            summed = tf.add_n(replica_losses)
        summed_grads = tape.gradient(summed, tensors)

        self.assertAlmostEqual(float(summed), float(single), delta=1e-5)
        for expected, got in zip(single_grads, summed_grads):
            np.testing.assert_allclose(got, expected, atol=1e-6)
        # Without the offset every replica would target the wrong columns.
        wrong = nnclr_loss(*[t[local:] for t in tensors], temperature=0.1,
                           gathered=tuple(tf.convert_to_tensor(t) for t in tensors))
        self.assertGreater(abs(float(wrong) - float(replica_losses[1] * 2)), 1e-2)

    def test_accuracy(self):
        anchors = np.eye(4, dtype=np.float32)
        predictions = anchors[[0, 1, 3, 2]]  # rows 2 and 3 point at each other's column
        self.assertAlmostEqual(float(contrastive_accuracy(anchors, predictions)), 0.5)
        self.assertAlmostEqual(float(contrastive_accuracy(anchors[2:], predictions[2:],
                                                          predictions_global=predictions,
                                                          label_offset=2)), 0.0)
        self.assertAlmostEqual(float(contrastive_accuracy(anchors[:2], predictions[:2],
                                                          predictions_global=predictions)), 1.0)

    def test_bad_arguments(self):
        nn_1, _, _, p_2 = _batch(4)
        with self.assertRaisesRegex(ValueError, "temperature=0"):
            contrastive_loss(nn_1, p_2, temperature=0.0)
        with self.assertRaisesRegex(ValueError, "reduction='avg'"):
            contrastive_loss(nn_1, p_2, reduction="avg")


if __name__ == "__main__":
    absltest.main()
