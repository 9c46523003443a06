"""Weighted k-nearest-neighbour classification on frozen features (InstDisc / lightly protocol).

Each query votes with its k most cosine-similar bank rows, each neighbour weighted by
exp(similarity / temperature); the class with the largest summed weight wins.

    knn_evaluate(encoder, train_ds, test_ds, num_classes=10)   # {"top1", "top5", "k", ...}
    # the same from features (knn_accuracy takes features, every other protocol an encoder):
    bank_x, bank_y = extract_features(encoder, train_ds)
    query_x, query_y = extract_features(encoder, test_ds)
    knn_accuracy(bank_x, bank_y, query_x, query_y, num_classes=10)   # {"top1": ..., "top5": ...}
    model.fit(..., callbacks=[KNNMonitor(train_ds, test_ds, num_classes=10, every=5)])
"""

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf.config import EvalConfig
from nnclr_tf.evaluation.features import accuracy_metrics, extract_features


@tf.function(reduce_retracing=True)
def _chunk_top_k(queries, bank, bank_labels, k):
    """Top-k cosines [q, k] and neighbour labels [q, k] of query rows within one bank chunk."""
    similarities = tf.matmul(queries, tf.math.l2_normalize(bank, axis=-1), transpose_b=True)
    values, indices = tf.math.top_k(similarities, k=tf.minimum(k, tf.shape(bank)[0]))
    return values, tf.gather(bank_labels, indices)


@tf.function(reduce_retracing=True)
def _merge_top_k(values, labels, new_values, new_labels, k):
    """Running top-k; earlier chunks first, so ties keep the lower bank index like one top_k."""
    values = tf.concat([values, new_values], axis=1)
    labels = tf.concat([labels, new_labels], axis=1)
    values, order = tf.math.top_k(values, k=tf.minimum(k, tf.shape(values)[1]))
    return values, tf.gather(labels, order, batch_dims=1)


def _weighted_votes(values, labels, num_classes, temperature):
    """Class scores [q, num_classes] = per class, the sum over neighbours of exp(similarity / t)."""
    weights = tf.exp(values / temperature)
    rows = tf.shape(values)[0]
    # A segment sum keeps memory at [q, k] where a one-hot einsum would need [q, k, num_classes].
    segments = tf.range(rows, dtype=tf.int64)[:, None] * num_classes + tf.cast(labels, tf.int64)
    scores = tf.math.unsorted_segment_sum(
        tf.reshape(weights, [-1]), tf.reshape(segments, [-1]), tf.cast(rows, tf.int64) * num_classes
    )
    return tf.reshape(scores, [rows, num_classes])


def _check_knn_arguments(bank_features, bank_labels, query_features, num_classes, k, temperature):
    if bank_features.ndim != 2 or query_features.ndim != 2:
        raise ValueError(
            f"kNN features must be rank 2 [examples, dim]; got bank {bank_features.shape} and "
            f"queries {query_features.shape}."
        )
    if bank_features.shape[1] != query_features.shape[1]:
        raise ValueError(
            f"Bank features have dim {bank_features.shape[1]} but queries have dim "
            f"{query_features.shape[1]}; extract both with the same encoder."
        )
    if len(bank_labels) != len(bank_features) or len(bank_features) == 0:
        raise ValueError(
            f"The bank has {len(bank_features)} feature rows and {len(bank_labels)} labels; "
            "expected the same non-zero number of each."
        )
    if int(k) < 1 or not temperature > 0:
        raise ValueError(
            f"kNN needs k >= 1 and temperature > 0; got k={k}, temperature={temperature}."
        )
    if bank_labels.min() < 0 or bank_labels.max() >= num_classes:
        raise ValueError(
            f"Bank labels span [{bank_labels.min()}, {bank_labels.max()}] but num_classes="
            f"{num_classes}; labels must lie in [0, num_classes)."
        )


def knn_predict(
    bank_features,
    bank_labels,
    query_features,
    num_classes,
    k=200,
    temperature=0.1,
    batch_size=1024,
    bank_batch_size=16384,
    return_scores=False,
):
    """Weighted kNN over a feature bank, batched over queries and over the bank.

    The bank is streamed in chunks of `bank_batch_size` rows (each chunk is normalised and sent
    to the device once) and every query chunk of `batch_size` keeps a running top-k, so memory
    stays at [batch_size, bank_batch_size] similarities however large the bank (ImageNet: 1.28M).

    Args:
      bank_features: [bank, dim] features (need not be normalised).
      bank_labels: [bank] integer labels in [0, num_classes).
      query_features: [queries, dim] features.
      num_classes: number of classes.
      k: neighbours per query (at most the bank size is used).
      temperature: vote weight exp(cosine / temperature).
      return_scores: return the class scores instead of the predictions.

    Returns:
      predictions int64 [queries], or scores float32 [queries, num_classes] with `return_scores`.
    """
    bank_features = np.asarray(bank_features, np.float32)
    bank_labels = np.asarray(bank_labels).reshape(-1).astype(np.int64)
    query_features = np.asarray(query_features, np.float32)
    _check_knn_arguments(bank_features, bank_labels, query_features, num_classes, k, temperature)
    k = tf.constant(int(k), tf.int32)
    queries = [
        tf.math.l2_normalize(tf.constant(query_features[start : start + batch_size]), axis=-1)
        for start in range(0, len(query_features), batch_size)
    ]
    running = [None] * len(queries)
    for start in range(0, len(bank_features), bank_batch_size):
        bank = tf.constant(bank_features[start : start + bank_batch_size])
        labels = tf.constant(bank_labels[start : start + bank_batch_size])
        for i, query in enumerate(queries):
            values, neighbour_labels = _chunk_top_k(query, bank, labels, k)
            if running[i] is not None:
                values, neighbour_labels = _merge_top_k(*running[i], values, neighbour_labels, k)
            running[i] = (values, neighbour_labels)
    scores = [
        _weighted_votes(values, labels, num_classes, float(temperature)).numpy()
        for values, labels in running
    ]
    scores = np.concatenate(scores, axis=0) if scores else np.zeros((0, num_classes), np.float32)
    return scores if return_scores else np.argmax(scores, axis=1).astype(np.int64)


def knn_accuracy(bank_features, bank_labels, query_features, query_labels, num_classes,
                 return_predictions=False, **kwargs):
    """kNN accuracy: {"top1": float, "top5": float (only when num_classes >= 5)}, and with
    `return_predictions` "predictions": the [N] top-1 classes (int64).

    `kwargs` are those of `knn_predict` (k, temperature, batch_size, bank_batch_size).
    """
    kwargs.pop("return_scores", None)
    scores = knn_predict(
        bank_features, bank_labels, query_features, num_classes, return_scores=True, **kwargs
    )
    results = accuracy_metrics(scores, query_labels, num_classes)
    if return_predictions:
        results["predictions"] = np.argmax(scores, axis=1).astype(np.int64)
    return results


def knn_evaluate(
    encoder,
    bank_ds,
    query_ds,
    num_classes,
    k=EvalConfig.knn_k,
    temperature=EvalConfig.knn_temperature,
    **kwargs,
):
    """The kNN protocol on an encoder: features of both datasets, then `knn_accuracy`.

    Args:
      encoder: images [batch, H, W, C] float in [0, 1] -> features [batch, D].
      bank_ds, query_ds: finite (images, labels) batches, or (images, labels) arrays.
      k, temperature: as `nnclr knn` (200 neighbours, exp(cosine / 0.1) votes).

    Returns:
      dict(top1, top5 (num_classes >= 5), k (used: at most the bank size), temperature,
      num_bank, num_queries).
    """
    bank_features, bank_labels = extract_features(encoder, bank_ds)
    query_features, query_labels = extract_features(encoder, query_ds)
    k = min(int(k), len(bank_features))
    results = knn_accuracy(
        bank_features,
        bank_labels,
        query_features,
        query_labels,
        num_classes,
        k=k,
        temperature=temperature,
        **kwargs,
    )
    return {**results, "k": k, "temperature": float(temperature),
            "num_bank": len(bank_labels), "num_queries": len(query_labels)}


class KNNMonitor(keras.callbacks.Callback):
    """Writes the kNN top-1 of the encoder into the epoch logs as "knn_top1" every `every` epochs.

    Place it before CSVLogger / TensorBoard in `callbacks` so they see the key (the progress bar and
    History always do); CSVLogger fixes its columns at the first epoch of every `fit` call, so with
    `every` > 1 use `first_epoch=True` to have the column from the start (also in a resumed run).

    Args:
      bank_ds, query_ds: finite tf.data of (images, labels) batches, un-augmented.
      num_classes: number of classes.
      every: evaluate after every `every`-th epoch.
      encoder: the encoder to evaluate; defaults to `self.model.encoder` (the NNCLR model's).
      first_epoch: also evaluate after the first epoch of every `fit` call.
    """

    def __init__(
        self,
        bank_ds,
        query_ds,
        num_classes,
        every=1,
        k=200,
        temperature=0.1,
        encoder=None,
        first_epoch=False,
        batch_size=1024,
    ):
        super().__init__()
        if int(every) < 1:
            raise ValueError(f"KNNMonitor every={every} must be >= 1 (epochs between evaluations).")
        self.bank_ds = bank_ds
        self.query_ds = query_ds
        self.num_classes = int(num_classes)
        self.every = int(every)
        self.k = int(k)
        self.temperature = float(temperature)
        self.encoder = encoder
        self.first_epoch = bool(first_epoch)
        self.batch_size = int(batch_size)
        self.history = []
        self._first_of_fit = False

    def on_train_begin(self, logs=None):
        self._first_of_fit = self.first_epoch

    def _encoder(self):
        if self.encoder is not None:
            return self.encoder
        encoder = getattr(self.model, "encoder", None)
        if encoder is None:
            raise ValueError(
                f"KNNMonitor found no `encoder` attribute on {type(self.model).__name__}; pass "
                "encoder=... to KNNMonitor."
            )
        return encoder

    def on_epoch_end(self, epoch, logs=None):
        first, self._first_of_fit = self._first_of_fit, False
        if (epoch + 1) % self.every != 0 and not first:
            return
        results = knn_evaluate(
            self._encoder(),
            self.bank_ds,
            self.query_ds,
            self.num_classes,
            k=self.k,
            temperature=self.temperature,
            batch_size=self.batch_size,
        )
        self.history.append((epoch, results["top1"]))
        if logs is not None:
            logs["knn_top1"] = results["top1"]
