"""SupportSet lookup at scale: chunked and unchunked scans return the same neighbours."""

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from nnclr_tf.support_set import UNKNOWN_BATCH, SupportSet


def _normalise(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _filled_support_set(size, dim, rows, max_similarity_bytes, top_k=1, seed=0):
    """A support set holding `rows` random rows (wrapping when rows > size), labels = row number."""
    support_set = SupportSet(size, dim, top_k=top_k, write_mode="scatter",
                             max_similarity_bytes=max_similarity_bytes)
    support_set.build((None, dim))
    bank = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    support_set.enqueue(bank, np.arange(rows))
    return support_set


def _indices(support_set, queries, k, jit_compile=False):
    def lookup(z):
        z = tf.math.l2_normalize(z, axis=-1)
        bank = tf.convert_to_tensor(support_set.embeddings)
        return support_set.nearest_indices(z, bank, support_set.filled(), k)
    return tf.function(lookup, jit_compile=jit_compile)(tf.constant(queries)).numpy()


def _reference(support_set, queries, k):
    """NumPy top-k over the filled rows, ties to the lower index."""
    bank = support_set.embeddings.numpy()
    similarities = _normalise(queries) @ bank.T
    similarities[:, int(support_set.filled()):] = -np.inf
    return np.argsort(-similarities, axis=1, kind="stable")[:, :k]


def _assert_no_ties(support_set, queries, k):
    # Chunked matmuls may round differently in the last bit: keep the ranks well separated.
    bank = support_set.embeddings.numpy()[:int(support_set.filled())]
    top = -np.sort(-(_normalise(queries) @ bank.T), axis=1)[:, :k + 1]
    assert np.min(-np.diff(top, axis=1)) > 1e-5, "test data has near-ties; change the seed"


class LookupTest(parameterized.TestCase):

    @parameterized.named_parameters(
        # (size, filled rows, batch, chunk rows): chunks that divide the queue or leave a
        # remainder, a partly filled queue whose boundary falls inside a chunk, a wrapped queue.
        ("divides", 96, 96, 6, 32),
        ("remainder", 100, 100, 5, 7),
        ("partly_filled", 100, 45, 5, 16),
        ("wrapped", 64, 150, 4, 10),
    )
    def test_chunked_equals_unchunked(self, size, rows, batch, chunk):
        dim = 16
        queries = np.random.default_rng(7).normal(size=(batch, dim)).astype(np.float32)
        whole = _filled_support_set(size, dim, rows, None)
        chunked = _filled_support_set(size, dim, rows, 4 * batch * chunk)
        self.assertEqual(chunked.chunk_rows(batch), chunk)
        _assert_no_ties(whole, queries, k=1)
        for jit_compile in (False, True):
            for support_set in (whole, chunked):
                np.testing.assert_array_equal(
                    _indices(support_set, queries, 1, jit_compile)[:, 0],
                    _reference(whole, queries, 1)[:, 0])
        lookup = tf.function(lambda q, s: s.nearest_neighbour(q, return_labels=True))
        neighbours_whole, labels_whole = lookup(queries, whole)
        neighbours_chunked, labels_chunked = lookup(queries, chunked)
        np.testing.assert_array_equal(neighbours_chunked.numpy(), neighbours_whole.numpy())
        np.testing.assert_array_equal(labels_chunked.numpy(), labels_whole.numpy())

    @parameterized.named_parameters(
        ("k5_chunk8", 5, 8), ("k5_chunk3", 5, 3), ("k12_chunk20", 12, 20))
    def test_running_top_k_equals_top_k(self, k, chunk):
        size, dim, batch = 90, 16, 6
        queries = np.random.default_rng(8).normal(size=(batch, dim)).astype(np.float32)
        whole = _filled_support_set(size, dim, size, None, top_k=k, seed=1)
        chunked = _filled_support_set(size, dim, size, 4 * batch * chunk, top_k=k, seed=1)
        self.assertEqual(chunked.chunk_rows(batch), max(chunk, k))  # never fewer rows than k
        _assert_no_ties(whole, queries, k)
        expected = _reference(whole, queries, k)
        for jit_compile in (False, True):
            np.testing.assert_array_equal(_indices(whole, queries, k, jit_compile), expected)
            np.testing.assert_array_equal(_indices(chunked, queries, k, jit_compile), expected)

    @parameterized.parameters(1, 3)
    def test_exact_ties_rank_lower_index_first(self, k):
        # A query along the first axis scores each row by its first coordinate alone, so equal
        # first coordinates tie exactly, in every chunk and summation order.
        size, dim = 24, 4
        rows = np.zeros((size, dim), np.float32)
        rows[:, 0] = np.tile([1.0, 2.0, 3.0], size // 3)  # ties across every chunk
        rows[:, 1] = 1.0
        support_set = SupportSet(size, dim, top_k=k, max_similarity_bytes=4 * 2 * 5)
        support_set.build((None, dim))
        support_set.enqueue(rows)
        queries = np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 0.0, 0.0, 0.0]], np.float32)
        self.assertEqual(support_set.chunk_rows(2), max(5, k))
        expected = _reference(support_set, queries, k)
        np.testing.assert_array_equal(expected[:, 0], [2, 2])
        np.testing.assert_array_equal(_indices(support_set, queries, k), expected)

    def test_similarity_matrix_is_never_whole(self):
        size, dim, batch, bound = 4096, 8, 64, 2**16
        support_set = _filled_support_set(size, dim, size, bound)
        lookup = tf.function(support_set.nearest_neighbour).get_concrete_function(
            tf.TensorSpec([batch, dim], tf.float32))
        widest = max(int(np.prod(output.shape)) for op in lookup.graph.get_operations()
                     for output in op.outputs if output.dtype == tf.float32
                     and output.shape.rank == 2 and output.shape[0] == batch)
        self.assertLessEqual(4 * widest, bound)
        self.assertEqual(support_set.chunk_rows(batch) * batch * 4, bound)

    def test_chunk_rows(self):
        support_set = SupportSet(98304, 256, max_similarity_bytes=64 * 2**20)
        self.assertEqual(support_set.chunk_rows(512), 32768)  # the paper's per-replica batch
        self.assertEqual(support_set.chunk_rows(None), 64 * 2**20 // (4 * UNKNOWN_BATCH))
        self.assertEqual(support_set.chunk_rows(1), 98304)  # never more than the queue
        self.assertEqual(SupportSet(98304, 256, max_similarity_bytes=None).chunk_rows(512), 98304)

    def test_config_keeps_bound(self):
        support_set = SupportSet(64, 4, max_similarity_bytes=1000)
        self.assertEqual(SupportSet.from_config(support_set.get_config()).max_similarity_bytes,
                         1000)
        with self.assertRaisesRegex(ValueError, "max_similarity_bytes"):
            SupportSet(64, 4, max_similarity_bytes=0)


if __name__ == "__main__":
    absltest.main()
