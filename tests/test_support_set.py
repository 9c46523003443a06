"""SupportSet: FIFO order, nearest neighbours against brute force, masking, round trip."""

import collections

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from conftest import round_trip
from nnclr_tf.support_set import SupportSet

MODES = (("scatter", "scatter"), ("assign", "assign"), ("auto", "auto"))


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _support_set(size, dim, write_mode="scatter", **kwargs):
    support_set = SupportSet(size, dim, write_mode=write_mode, **kwargs)
    support_set.build((None, dim))
    return support_set


class SupportSetTest(parameterized.TestCase):

    @parameterized.named_parameters(*MODES)
    def test_fifo_order_and_wrap_around(self, write_mode):
        size, dim = 7, 3
        support_set = _support_set(size, dim, write_mode)
        enqueue = tf.function(support_set.enqueue)
        reference = collections.deque(maxlen=size)
        labels_reference = collections.deque(maxlen=size)
        rng = np.random.default_rng(0)
        # 3, 3 (fills), 2 (wraps past the remainder of 1), 10 (> size), 1.
        for step, batch in enumerate((3, 3, 2, 10, 1)):
            rows = rng.normal(size=(batch, dim)).astype(np.float32)
            labels = np.arange(batch, dtype=np.int32) + 100 * step
            enqueue(tf.constant(rows), tf.constant(labels))
            reference.extend(_normalise(rows))
            labels_reference.extend(labels)
            np.testing.assert_allclose(support_set.ordered().numpy(), np.array(reference),
                                       atol=1e-6)
            self.assertEqual(int(support_set.filled()), len(reference))
            pointer = int(support_set.count.numpy()) % size
            stored = np.roll(support_set.labels.numpy(), -pointer)
            if len(labels_reference) == size:
                np.testing.assert_array_equal(stored, np.array(labels_reference))
        self.assertEqual(int(support_set.count.numpy()), 19)

    @parameterized.named_parameters(*MODES)
    def test_nearest_neighbour_matches_brute_force(self, write_mode):
        size, dim = 32, 8
        support_set = _support_set(size, dim, write_mode)
        rng = np.random.default_rng(1)
        bank = rng.normal(size=(40, dim)).astype(np.float32)  # wraps: the last 32 stay
        support_set.enqueue(bank[:25], np.arange(25))
        support_set.enqueue(bank[25:], np.arange(25, 40))
        queries = rng.normal(size=(10, dim)).astype(np.float32) * 3.0
        neighbours, labels = tf.function(
            lambda q: support_set.nearest_neighbour(q, return_labels=True))(queries)
        stored = _normalise(bank[-size:])
        best = np.argmax(_normalise(queries) @ stored.T, axis=1)
        np.testing.assert_allclose(neighbours.numpy(), stored[best], atol=1e-6)
        np.testing.assert_array_equal(labels.numpy(), best + 40 - size)
        np.testing.assert_allclose(support_set(queries).numpy(), stored[best], atol=1e-6)

    def test_unfilled_slots_never_returned(self):
        size, dim = 16, 4
        support_set = _support_set(size, dim)
        # Garbage in every slot that the queue has not filled yet: it would win every lookup.
        garbage = np.tile(np.array([[1.0, 0.0, 0.0, 0.0]], np.float32), (size, 1))
        support_set.embeddings.assign(garbage)
        filled_rows = _normalise(np.array([[-1.0, 1.0, 0.0, 0.0], [-1.0, 0.0, 1.0, 0.0],
                                           [-1.0, 0.0, 0.0, 1.0]], np.float32))
        support_set.enqueue(filled_rows)
        queries = np.array([[1.0, 0.1, 0.0, 0.0], [1.0, 0.0, 0.0, 0.2]], np.float32)
        neighbours, labels = support_set.nearest_neighbour(queries, return_labels=True)
        np.testing.assert_allclose(neighbours.numpy(), filled_rows[[0, 2]], atol=1e-6)
        np.testing.assert_array_equal(labels.numpy(), [-1, -1])  # enqueued without labels

    def test_empty_queue_returns_query(self):
        support_set = _support_set(8, 3)
        queries = np.array([[3.0, 4.0, 0.0], [0.0, 0.0, -2.0]], np.float32)
        neighbours, labels = support_set.nearest_neighbour(queries, return_labels=True)
        np.testing.assert_allclose(neighbours.numpy(), _normalise(queries), atol=1e-6)
        np.testing.assert_array_equal(labels.numpy(), [-1, -1])

    def test_no_gradient_through_lookup(self):
        support_set = _support_set(8, 3)
        support_set.enqueue(np.eye(3, dtype=np.float32))
        z = tf.Variable(np.array([[1.0, 0.2, 0.0]], np.float32))
        for lookup_is_empty in (False, True):
            if lookup_is_empty:
                support_set.count.assign(0)
            with tf.GradientTape() as tape:
                total = tf.reduce_sum(support_set.nearest_neighbour(z) * 2.0)
            self.assertIsNone(tape.gradient(total, z))

    def test_top_k_samples_only_true_top_k(self):
        size, dim, k = 64, 8, 5
        support_set = _support_set(size, dim, top_k=k)
        rng = np.random.default_rng(2)
        bank = _normalise(rng.normal(size=(size, dim)).astype(np.float32))
        support_set.enqueue(bank)
        queries = rng.normal(size=(4, dim)).astype(np.float32)
        top = np.argsort(-(_normalise(queries) @ bank.T), axis=1)[:, :k]
        lookup = tf.function(support_set.nearest_neighbour)
        picked = [set() for _ in queries]
        for _ in range(40):
            neighbours = lookup(queries).numpy()
            for i, row in enumerate(neighbours):
                index = int(np.argmin(np.abs(bank - row).sum(axis=1)))
                self.assertIn(index, top[i])
                picked[i].add(index)
        self.assertTrue(all(len(p) > 1 for p in picked), picked)  # it really samples

    def test_top_k_draw_is_a_function_of_the_seed(self):
        support_set = _support_set(64, 8, top_k=8)
        rng = np.random.default_rng(4)
        support_set.enqueue(rng.normal(size=(64, 8)).astype(np.float32))
        queries = rng.normal(size=(32, 8)).astype(np.float32)
        lookup = tf.function(support_set.nearest_neighbour)
        first = lookup(queries, seed=tf.constant([7, 3], tf.int64)).numpy()
        lookup(queries)  # the stateful generator moves on; the seeded draw does not depend on it
        np.testing.assert_array_equal(lookup(queries, seed=tf.constant([7, 3], tf.int64)), first)
        other = lookup(queries, seed=tf.constant([7, 4], tf.int64)).numpy()
        self.assertFalse(np.array_equal(other, first))

    def test_top_k_with_fewer_filled_rows_than_k(self):
        support_set = _support_set(16, 2, top_k=4)
        support_set.embeddings.assign(np.tile([[1.0, 0.0]], (16, 1)).astype(np.float32))
        support_set.enqueue(np.array([[0.0, 1.0], [-1.0, 0.0]], np.float32))
        for _ in range(10):
            rows = support_set.nearest_neighbour(np.ones((8, 2), np.float32)).numpy()
            self.assertTrue(np.all(rows[:, 0] <= 0.0), rows)

    def test_round_trip_keeps_queue(self):
        support_set = _support_set(10, 4, top_k=1)
        rng = np.random.default_rng(3)
        support_set.enqueue(rng.normal(size=(13, 4)).astype(np.float32), np.arange(13))
        reloaded = round_trip(support_set, rng.normal(size=(5, 4)).astype(np.float32))
        for name in ("embeddings", "labels", "count"):
            np.testing.assert_array_equal(getattr(reloaded, name).numpy(),
                                          getattr(support_set, name).numpy())
        self.assertEqual(reloaded.get_config(), support_set.get_config())

    @parameterized.parameters(dict(size=0), dict(top_k=11), dict(write_mode="copy"))
    def test_bad_arguments(self, **overrides):
        args = dict(size=10, dim=4, top_k=1, write_mode="scatter")
        args.update(overrides)
        with self.assertRaisesRegex(ValueError, "SupportSet"):
            SupportSet(**args)


if __name__ == "__main__":
    absltest.main()
