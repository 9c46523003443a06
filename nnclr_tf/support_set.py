"""The support set: a FIFO queue of past embeddings and nearest-neighbour lookup.

Usable on its own (lightly-style composition)::

    import tensorflow as tf
    from nnclr_tf.losses import nnclr_loss
    support_set = SupportSet(size=4096, dim=128)            # weights exist at once
    z_1, z_2 = tf.random.normal([8, 128]), tf.random.normal([8, 128])   # projections [batch, dim]
    p_1, p_2 = tf.random.normal([8, 128]), tf.random.normal([8, 128])   # predictions
    nn_1 = support_set.nearest_neighbour(z_1)               # no gradient
    nn_2 = support_set.nearest_neighbour(z_2)
    loss = nnclr_loss(nn_1, nn_2, p_1, p_2, temperature=0.1)
    support_set.enqueue(z_1)                                # after the step
    assert int(support_set.filled()) == 8

The queue is a buffer, not parameters: `count_params()` is 0 and `buffer_size()` counts it.

The queue lives in Keras variables (`add_weight`), so `.keras` saving, `save_weights`
and `BackupAndRestore` checkpoint it. Under `tf.distribute` every replica holds a copy:
callers must enqueue the rows all-gathered across replicas (in the same replica order
everywhere), and each replica then writes those same rows into its own copy. The copies stay
bitwise equal without any cross-replica traffic for the write.
"""

import math

import keras
import tensorflow as tf

from nnclr_tf import similarity

WRITE_MODES = ("auto", "scatter", "assign")
# The paper's per-replica lookup (512 x 98,304 float32, 192 MiB whole) then runs in 12 chunks, in
# the same CPU time as whole (benchmarks/lookup.py).
DEFAULT_MAX_SIMILARITY_BYTES = 16 * 2**20
UNKNOWN_BATCH = 512  # queries assumed when the batch is unknown at trace time


@keras.saving.register_keras_serializable(package="nnclr_tf")
class SupportSet(keras.layers.Layer):
    """FIFO ring buffer of L2-normalised embeddings with top-k nearest-neighbour lookup.

    Args:
      size: number of rows the queue holds (the paper uses 98,304).
      dim: embedding width (the projection output, 256 in the paper).
      top_k: 1 returns the nearest neighbour; k > 1 samples uniformly among the k nearest.
      store_labels: also keep an int32 label per row (-1 where unknown), for `nn_acc`.
      write_mode: "scatter" writes only the new rows with `scatter_update` (O(batch); CPU and
        GPU, whose variables support it); "assign" assigns the whole buffer the result of
        `tensor_scatter_nd_update`, which TPU variables support: O(size) without XLA, O(batch)
        under XLA, which updates the buffer in place (always on TPU; at 98,304 x 256 and
        batch 256 on CPU: 1.2 ms with jit_compile, 30 ms without); "auto" picks "assign" under
        a TPUStrategy and "scatter" otherwise.
      max_similarity_bytes: memory bound of the float32 similarity matrix [batch, size] of one
        lookup; above it the lookup scans the queue in chunks of
        `max_similarity_bytes // (4 * batch)` rows with a running max (running top-k), which
        returns the same neighbours. None never chunks. A batch unknown when the lookup is
        traced counts as `UNKNOWN_BATCH` rows.

    Weights (created by the constructor: size and dim fix every shape): `embeddings` float32
    [size, dim], `labels` int32 [size], `count` int64 scalar (rows ever enqueued; the write
    pointer is `count % size`, the fill level `min(count, size)`). Non-trainable, saved and
    checkpointed with the model, but a buffer rather than parameters (see `count_params`).
    """

    def __init__(self, size, dim, top_k=1, store_labels=True, write_mode="auto",
                 max_similarity_bytes=DEFAULT_MAX_SIMILARITY_BYTES, name="support_set", **kwargs):
        # Retrieval compares cosines of near-identical rows: keep it float32 under mixed precision.
        kwargs.setdefault("dtype", "float32")
        super().__init__(name=name, **kwargs)
        if int(size) < 1:
            raise ValueError(f"SupportSet size={size} is not positive; pass the number of rows "
                             "the queue should hold, e.g. 98304.")
        if int(dim) < 1:
            raise ValueError(f"SupportSet dim={dim} is not positive; pass the embedding width.")
        if not 1 <= int(top_k) <= int(size):
            raise ValueError(f"SupportSet top_k={top_k} must lie in [1, size={size}]; "
                             "use top_k=1 for the paper's nearest neighbour.")
        if write_mode not in WRITE_MODES:
            raise ValueError(f"SupportSet write_mode={write_mode!r} is not one of {WRITE_MODES}; "
                             "'auto' picks the one that suits the platform.")
        if max_similarity_bytes is not None and int(max_similarity_bytes) < 1:
            raise ValueError(f"SupportSet max_similarity_bytes={max_similarity_bytes} is not "
                             "positive; pass a bound in bytes (e.g. 2**26) or None to never chunk.")
        self.size = int(size)
        self.dim = int(dim)
        self.top_k = int(top_k)
        self.store_labels = bool(store_labels)
        self.write_mode = write_mode
        self.max_similarity_bytes = (None if max_similarity_bytes is None
                                     else int(max_similarity_bytes))
        # Every shape is known now: build at once, so enqueue and nearest_neighbour work on a
        # fresh SupportSet (a layer otherwise builds on its first __call__ only).
        self.build()

    def build(self, input_shape=None):
        if input_shape is not None and input_shape[-1] not in (None, self.dim):
            raise ValueError(f"SupportSet(dim={self.dim}) was given rows of shape "
                             f"{tuple(input_shape)}; pass [batch, {self.dim}] embeddings.")
        if getattr(self, "count", None) is not None:
            return  # built by the constructor; Keras may call build again with a shape
        # aggregation="none": each replica writes its own copy in place. "only_first_replica"
        # would send replica 0's update to every copy each step (a merge_call and a broadcast:
        # the whole buffer in "assign" mode), although every replica writes the same rows.
        common = dict(trainable=False, aggregation="none", autocast=False)
        self.embeddings = self.add_weight(name="embeddings", shape=(self.size, self.dim),
                                          dtype="float32", initializer="zeros", **common)
        if self.store_labels:
            self.labels = self.add_weight(name="labels", shape=(self.size,), dtype="int32",
                                          initializer=keras.initializers.Constant(-1), **common)
        self.count = self.add_weight(name="count", shape=(), dtype="int64",
                                     initializer="zeros", **common)

    def count_params(self):
        """0: the queue is a buffer of past embeddings, not parameters (see `buffer_size`)."""
        return 0

    def buffer_size(self):
        """Values the queue stores (embeddings, labels and the counter): what Keras would count."""
        return sum(math.prod(w.shape) for w in self.weights)

    def _checked_rows(self, z, what):
        """z as a tensor [batch, dim]; one sentence when its shape cannot be that."""
        z = tf.convert_to_tensor(z)
        shape = z.shape
        if shape.rank is not None and (shape.rank != 2 or shape[-1] not in (None, self.dim)):
            raise ValueError(f"SupportSet.{what} got rows of shape {tuple(shape.as_list())}; "
                             f"expected [batch, {self.dim}] (dim={self.dim}): pass the projections, "
                             "or build the SupportSet with their width.")
        if shape.rank is None or shape[-1] is None:  # checked when the graph runs
            z = tf.ensure_shape(z, [None, self.dim])
        return z

    def filled(self):
        """Number of valid rows, scalar int64: min(count, size)."""
        return tf.minimum(tf.convert_to_tensor(self.count), self.size)

    def ordered(self):
        """Valid rows oldest-to-newest, [filled, dim]."""
        count = tf.convert_to_tensor(self.count)
        filled = self.filled()
        start = (count - filled) % self.size
        indices = (start + tf.range(filled, dtype=tf.int64)) % self.size
        return tf.gather(tf.convert_to_tensor(self.embeddings), indices)

    def nearest_neighbour(self, z, return_labels=False, seed=None):
        """Nearest stored row by cosine similarity, without gradient.

        The [batch, size] similarities are computed chunk by chunk, each at most
        `max_similarity_bytes` (see `nearest_indices`).

        Args:
          z: [batch, dim] queries (any float dtype; normalised here).
          return_labels: also return the neighbours' labels.
          seed: with top_k > 1, an int [2] seed for a stateless draw (the same seed, the same
            picks: a resumed run samples what an uninterrupted one did); None draws from
            TensorFlow's stateful generator.

        Returns:
          [batch, dim] float32 L2-normalised neighbours (and [batch] int32 labels, -1 where
          unknown). Unfilled slots are never returned. While the queue is empty the query
          itself, stop_gradient(l2_normalize(z)), stands in for its neighbour.
        """
        z = tf.math.l2_normalize(tf.cast(self._checked_rows(z, "nearest_neighbour"), tf.float32),
                                 axis=-1)
        bank = tf.convert_to_tensor(self.embeddings)
        filled = self.filled()
        if self.top_k == 1:
            index = self.nearest_indices(z, bank, filled, 1)[:, 0]
        else:
            candidates = self.nearest_indices(z, bank, filled, self.top_k)  # [batch, top_k]
            # Sample only among valid candidates: fewer than top_k rows may be filled yet.
            num_valid = tf.cast(tf.clip_by_value(filled, 1, self.top_k), tf.float32)
            shape = [tf.shape(z)[0]]
            draw = (tf.random.uniform(shape, dtype=tf.float32) if seed is None else
                    tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32))
            pick = tf.minimum(tf.cast(draw * num_valid, tf.int32), self.top_k - 1)
            index = tf.gather(candidates, pick, batch_dims=1)
        empty = tf.equal(filled, 0)
        neighbours = tf.where(empty, z, tf.gather(bank, index))
        neighbours = tf.stop_gradient(neighbours)
        if not return_labels:
            return neighbours
        if self.store_labels:
            labels = tf.gather(tf.convert_to_tensor(self.labels), index)
            labels = tf.where(empty, -1, labels)
        else:
            labels = tf.fill(tf.shape(index), -1)
        return neighbours, labels

    def chunk_rows(self, batch):
        """Queue rows per similarity chunk for `batch` queries (int or None); `size` = one chunk."""
        if self.max_similarity_bytes is None:
            return self.size
        batch = UNKNOWN_BATCH if batch is None else max(1, int(batch))
        rows = self.max_similarity_bytes // (4 * batch)
        return min(self.size, max(rows, self.top_k))

    def nearest_indices(self, z, bank, filled, k):
        """Indices of the k most similar valid rows, most similar first, [batch, k] int32.

        Args:
          z: [batch, dim] float32 L2-normalised queries.
          bank: [size, dim] float32 rows; rows at index >= `filled` come last (-inf).
          filled: scalar int64, the number of valid rows.
          k: static number of candidates.

        The queue is scanned in chunks of `chunk_rows(batch)` rows, keeping a running top-k.
        Equal similarities rank the lower index first, as in `tf.argmax` and `tf.math.top_k`
        over the whole row, so chunking never changes the result.
        """
        rows = self.chunk_rows(z.shape[0])
        # A bias of -inf on unfilled slots: bias_add fuses into the matmul on CPU.
        mask = tf.where(tf.range(self.size, dtype=tf.int64) < filled, 0.0, float("-inf"))
        best_values = best_indices = None
        for start in range(0, self.size, rows):  # a static loop: XLA compiles it as it is
            stop = min(start + rows, self.size)
            similarities = tf.nn.bias_add(  # [batch, stop - start], float32 precision
                similarity.float32_matmul(z, bank[start:stop], transpose_b=True),
                mask[start:stop])
            if k == 1:
                index = tf.argmax(similarities, axis=-1, output_type=tf.int32)[:, None]
                values = tf.gather(similarities, index, batch_dims=1)
            else:
                values, index = tf.math.top_k(similarities, k=min(k, stop - start))
            index += start
            if best_indices is None:
                best_values, best_indices = values, index
            elif k == 1:
                # Strictly greater: on a tie the earlier chunk (lower index) keeps its place.
                better = values > best_values
                best_values = tf.where(better, values, best_values)
                best_indices = tf.where(better, index, best_indices)
            else:
                # Earlier chunks first: top_k ranks equal values by position, i.e. by index.
                values = tf.concat([best_values, values], axis=1)
                index = tf.concat([best_indices, index], axis=1)
                best_values, position = tf.math.top_k(values, k=k)
                best_indices = tf.gather(index, position, batch_dims=1)
        return best_indices

    def enqueue(self, z, labels=None):
        """Writes rows newest-over-oldest (FIFO), replacing the oldest once full.

        Args:
          z: [batch, dim] rows, already all-gathered across replicas when distributed.
          labels: optional [batch] int labels (-1 is stored when omitted).
        """
        z = self._checked_rows(z, "enqueue")
        rows = tf.math.l2_normalize(tf.cast(tf.stop_gradient(z), tf.float32), axis=-1)
        batch = tf.shape(rows, out_type=tf.int64)[0]
        # Only the last `size` rows survive a batch larger than the queue; dropping the rest
        # keeps the written indices unique, so the write order is well defined.
        kept = tf.minimum(batch, self.size)
        rows = rows[batch - kept:]
        count = tf.convert_to_tensor(self.count)
        indices = (count + batch - kept + tf.range(kept, dtype=tf.int64)) % self.size
        self._write(self.embeddings, indices, rows)
        if self.store_labels:
            if labels is None:
                new_labels = tf.fill([kept], -1)
            else:
                new_labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)
                rows_known, labels_known = z.shape[0], new_labels.shape[0]
                if rows_known is not None and labels_known is not None:
                    if rows_known != labels_known:
                        raise ValueError(f"SupportSet.enqueue got {rows_known} rows but "
                                         f"{labels_known} labels; pass one label per row.")
                else:
                    tf.debugging.assert_equal(
                        tf.size(new_labels, out_type=tf.int64), batch,
                        message="SupportSet.enqueue got a different number of rows and labels")
                new_labels = new_labels[batch - kept:]
            self._write(self.labels, indices, new_labels)
        self.count.assign(count + batch)

    def _write(self, variable, indices, updates):
        mode = self.write_mode
        if mode == "auto":
            # TPU variables have no scatter_update; TPU steps always run under XLA.
            on_tpu = isinstance(tf.distribute.get_strategy(), (
                tf.distribute.TPUStrategy, tf.distribute.experimental.TPUStrategy))
            mode = "assign" if on_tpu else "scatter"
        if mode == "scatter":
            # `.value` is the tf.Variable (or DistributedVariable) behind the Keras variable.
            variable.value.scatter_update(tf.IndexedSlices(updates, indices))
        else:
            variable.assign(tf.tensor_scatter_nd_update(
                tf.convert_to_tensor(variable), indices[:, None], updates))

    def call(self, z):
        """[batch, dim] -> [batch, dim] nearest neighbours (see `nearest_neighbour`)."""
        return self.nearest_neighbour(z)

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.dim,)

    def get_config(self):
        config = super().get_config()
        config.update(size=self.size, dim=self.dim, top_k=self.top_k,
                      store_labels=self.store_labels, write_mode=self.write_mode,
                      max_similarity_bytes=self.max_similarity_bytes)
        return config
