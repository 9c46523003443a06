"""Frozen-encoder feature extraction shared by every evaluation protocol.

features, labels = extract_features(encoder, dataset)    # [N, D] float32, [N] int64
knn_accuracy(bank_features, bank_labels, features, labels, num_classes)
"""

import keras
import numpy as np
import tensorflow as tf


def split_batch(batch):
    """Returns (images, labels) from a `(images, labels)` tuple or an `{"image", "label"}` dict."""
    if isinstance(batch, dict):
        images = batch.get("image", batch.get("images"))
        labels = batch.get("label", batch.get("labels"))
    elif isinstance(batch, (tuple, list)) and len(batch) >= 2:
        images, labels = batch[0], batch[1]
    else:
        images, labels = None, None
    if images is None or labels is None:
        raise ValueError(
            f"Evaluation batch {type(batch).__name__} has no (images, labels) pair; expected a "
            "tf.data.Dataset of (images, labels) tuples or {'image', 'label'} dicts."
        )
    return images, labels


def check_finite(dataset, argument):
    """Raises ValueError if `dataset` is known to repeat forever (iterating it would never end)."""
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"{argument} repeats forever; pass a finite tf.data.Dataset (drop .repeat()) so that "
            "every example is seen exactly once."
        )


def extract_features(encoder, dataset, normalize=False):
    """Runs a frozen encoder over a finite dataset.

    Args:
      encoder: a callable / keras.Model mapping images [batch, H, W, C] to features [batch, D];
        it is called with `training=False` (batch norm uses its moving statistics).
      dataset: finite tf.data.Dataset of (images, labels) batches.
      normalize: L2-normalise each feature row.

    Returns:
      (features float32 [N, D], labels int64 [N]) as NumPy arrays, in dataset order.
    """
    check_finite(dataset, "dataset")
    if isinstance(encoder, keras.Model):
        # Keras caches the traced inference step on the model, so repeated calls do not retrace.
        encode = encoder.predict_on_batch
    else:
        encode = tf.function(lambda images: encoder(images, training=False), reduce_retracing=True)
    features, labels = [], []
    for batch in dataset:
        images, batch_labels = split_batch(batch)
        batch_features = tf.cast(encode(images), tf.float32)
        if normalize:
            batch_features = tf.math.l2_normalize(batch_features, axis=-1)
        features.append(batch_features.numpy())
        labels.append(np.asarray(batch_labels).reshape(-1).astype(np.int64))
    if not features:
        raise ValueError("dataset is empty; expected at least one (images, labels) batch.")
    return np.concatenate(features, axis=0), np.concatenate(labels, axis=0)


def accuracy_metrics(scores, labels, num_classes):
    """Top-1 (and top-5 when num_classes >= 5) of class scores [N, C] against labels [N]."""
    scores = np.asarray(scores)
    labels = np.asarray(labels).reshape(-1)
    # A stable descending sort: on tied scores the lower class index ranks first, like argmax.
    ranked = np.argsort(-scores, axis=1, kind="stable")
    results = {"top1": float(np.mean(ranked[:, 0] == labels))}
    if num_classes >= 5:
        results["top5"] = float(np.mean(np.any(ranked[:, :5] == labels[:, None], axis=1)))
    return results


def mean_per_class_accuracy(predictions, labels):
    """Mean over the classes present in `labels` of each class's top-1 accuracy."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    classes = np.unique(labels)
    return float(np.mean([np.mean(predictions[labels == c] == c) for c in classes]))
