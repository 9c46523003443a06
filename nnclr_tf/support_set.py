"""The support set: a FIFO queue of past embeddings and nearest-neighbour lookup.

Usable on its own (lightly-style composition)::

    support_set = SupportSet(size=4096, dim=128)
    z_1, z_2 = projection(view_1), projection(view_2)      # [batch, dim]
    nn_1 = support_set.nearest_neighbour(z_1)               # no gradient
    loss = nnclr_loss(nn_1, nn_2, p_1, p_2, temperature=0.1)
    support_set.enqueue(z_1)                                # after the step

The queue lives in Keras variables (`add_weight`), so `.keras` saving, `save_weights`
and `BackupAndRestore` checkpoint it. Under `tf.distribute` every replica holds a copy:
callers must enqueue the rows all-gathered across replicas, and the variables use
`aggregation="only_first_replica"` so every copy receives the same write.
"""

import keras
import tensorflow as tf

WRITE_MODES = ("auto", "scatter", "assign")


@keras.saving.register_keras_serializable(package="nnclr_tf")
class SupportSet(keras.layers.Layer):
    """FIFO ring buffer of L2-normalised embeddings with top-k nearest-neighbour lookup.

    Args:
      size: number of rows the queue holds (the paper uses 98,304).
      dim: embedding width (the projection output, 256 in the paper).
      top_k: 1 returns the nearest neighbour; k > 1 samples uniformly among the k nearest.
      store_labels: also keep an int32 label per row (-1 where unknown), for `nn_acc`.
      write_mode: "scatter" writes only the new rows (O(batch), needs a platform whose
        variables support `scatter_update`: CPU and GPU); "assign" rewrites the whole
        buffer with `tensor_scatter_nd_update` (O(size), works on TPU); "auto" picks
        "assign" under a TPUStrategy and "scatter" otherwise.

    Weights: `embeddings` float32 [size, dim], `labels` int32 [size], `count` int64 scalar
    (rows ever enqueued; the write pointer is `count % size`, the fill level `min(count, size)`).
    """

    def __init__(self, size, dim, top_k=1, store_labels=True, write_mode="auto",
                 name="support_set", **kwargs):
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
        self.size = int(size)
        self.dim = int(dim)
        self.top_k = int(top_k)
        self.store_labels = bool(store_labels)
        self.write_mode = write_mode

    def build(self, input_shape=None):
        common = dict(trainable=False, aggregation="only_first_replica", autocast=False)
        self.embeddings = self.add_weight(name="embeddings", shape=(self.size, self.dim),
                                          dtype="float32", initializer="zeros", **common)
        if self.store_labels:
            self.labels = self.add_weight(name="labels", shape=(self.size,), dtype="int32",
                                          initializer=keras.initializers.Constant(-1), **common)
        self.count = self.add_weight(name="count", shape=(), dtype="int64",
                                     initializer="zeros", **common)

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

    def nearest_neighbour(self, z, return_labels=False):
        """Nearest stored row by cosine similarity, without gradient.

        Args:
          z: [batch, dim] queries (any float dtype; normalised here).
          return_labels: also return the neighbours' labels.

        Returns:
          [batch, dim] float32 L2-normalised neighbours (and [batch] int32 labels, -1 where
          unknown). Unfilled slots are never returned. While the queue is empty the query
          itself, stop_gradient(l2_normalize(z)), stands in for its neighbour.
        """
        z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
        bank = tf.convert_to_tensor(self.embeddings)
        filled = self.filled()
        similarities = tf.matmul(z, bank, transpose_b=True)  # [batch, size]
        valid = tf.range(self.size, dtype=tf.int64) < filled
        similarities = tf.where(valid[None, :], similarities, float("-inf"))
        if self.top_k == 1:
            index = tf.argmax(similarities, axis=-1, output_type=tf.int32)
        else:
            _, candidates = tf.math.top_k(similarities, k=self.top_k)  # [batch, top_k]
            # Sample only among valid candidates: fewer than top_k rows may be filled yet.
            num_valid = tf.cast(tf.clip_by_value(filled, 1, self.top_k), tf.float32)
            draw = tf.random.uniform([tf.shape(z)[0]], dtype=tf.float32)
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

    def enqueue(self, z, labels=None):
        """Writes rows newest-over-oldest (FIFO), replacing the oldest once full.

        Args:
          z: [batch, dim] rows, already all-gathered across replicas when distributed.
          labels: optional [batch] int labels (-1 is stored when omitted).
        """
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
                new_labels = tf.cast(tf.reshape(labels, [-1]), tf.int32)[batch - kept:]
            self._write(self.labels, indices, new_labels)
        self.count.assign(count + batch)

    def _write(self, variable, indices, updates):
        mode = self.write_mode
        if mode == "auto":
            # TPU variables have no scatter_update.
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
                      store_labels=self.store_labels, write_mode=self.write_mode)
        return config
