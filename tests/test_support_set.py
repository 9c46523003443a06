"""SupportSet: FIFO order, nearest neighbours against brute force, masking, round trip."""

import collections
import math

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from conftest import round_trip
from nnclr_tf.support_set import SupportSet

MODES = (("scatter", "scatter"), ("assign", "assign"), ("auto", "auto"))


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _ranks(neighbours, bank, top):
    """Rank of each returned row among its query's nearest rows `top` [batch, k]; -1 if absent."""
    index = np.argmin(np.abs(neighbours[:, None, :] - bank[None]).sum(-1), axis=1)
    hits = top == index[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1), -1)


def chi_square_p_value(counts):
    """P(chi-square >= the statistic of `counts`) under equal category probabilities.

    Pearson's statistic has len(counts) - 1 degrees of freedom; for an even number 2m of them the
    survival function is closed form, exp(-x/2) * sum_{j<m} (x/2)^j / j! (no SciPy here).
    """
    counts = np.asarray(counts, np.float64)
    expected = counts.sum() / len(counts)
    statistic = float(np.sum((counts - expected) ** 2 / expected))
    dof = len(counts) - 1
    assert dof % 2 == 0, "use an odd number of categories"
    half = statistic / 2
    return float(np.exp(-half) * sum(half ** j / math.factorial(j) for j in range(dof // 2)))


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
        for _ in range(10):
            ranks = _ranks(lookup(queries).numpy(), bank, top)
            self.assertTrue(np.all(ranks >= 0), ranks)

    @parameterized.named_parameters(("stateless", True), ("stateful", False))
    def test_top_k_draw_is_uniform_over_the_k_candidates(self, seeded):
        # Every query's pick, as its rank among the query's k nearest rows, is uniform on 0..k-1:
        # a chi-square test over 5,000 picks (1,000 expected per rank) at p = 1e-4. The seeds are
        # fixed, so the test is deterministic; a draw that never picks the k-th row, or favours
        # the nearest, gives p < 1e-30.
        size, dim, k, batch = 64, 8, 5, 500
        support_set = _support_set(size, dim, top_k=k)
        rng = np.random.default_rng(5)
        bank = _normalise(rng.normal(size=(size, dim)).astype(np.float32))
        support_set.enqueue(bank)
        queries = rng.normal(size=(batch, dim)).astype(np.float32)
        top = np.argsort(-(_normalise(queries) @ bank.T), axis=1)[:, :k]
        lookup = tf.function(support_set.nearest_neighbour)
        tf.random.set_seed(6)  # the stateful generator's draws
        ranks = []
        for call in range(10):
            seed = tf.constant([6, call], tf.int64) if seeded else None
            ranks.append(_ranks(lookup(queries, seed=seed).numpy(), bank, top))
        ranks = np.concatenate(ranks)
        self.assertTrue(np.all(ranks >= 0))  # only true top-k rows
        counts = np.bincount(ranks, minlength=k)
        self.assertGreater(chi_square_p_value(counts), 1e-4, counts)

    def test_top_k_draw_is_uniform_over_the_filled_rows_when_fewer_than_k(self):
        # 3 rows filled, top_k = 5: each pick is uniform over the 3 (2 degrees of freedom).
        support_set = _support_set(16, 4, top_k=5)
        rows = _normalise(np.random.default_rng(7).normal(size=(3, 4)).astype(np.float32))
        support_set.enqueue(rows)
        queries = np.random.default_rng(8).normal(size=(3000, 4)).astype(np.float32)
        picked = support_set.nearest_neighbour(queries, seed=tf.constant([8, 0], tf.int64)).numpy()
        top = np.argsort(-(_normalise(queries) @ rows.T), axis=1)  # [batch, 3]
        ranks = _ranks(picked, rows, top)
        self.assertTrue(np.all(ranks >= 0))  # never an unfilled slot
        counts = np.bincount(ranks, minlength=3)
        self.assertGreater(chi_square_p_value(counts), 1e-4, counts)

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
