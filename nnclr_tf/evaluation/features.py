"""What every evaluation protocol shares: the data it accepts and frozen-encoder feature extraction.

    features, labels = extract_features(encoder, dataset)    # [N, D] float32, [N] int64
    features, labels = extract_features(encoder, (x_test, y_test))   # NumPy arrays work too
    knn_accuracy(bank_features, bank_labels, features, labels, num_classes)
"""

import weakref

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
            "tf.data.Dataset of (images, labels) tuples or {'image', 'label'} dicts, or an "
            "(images, labels) tuple of arrays."
        )
    return images, labels


def check_finite(dataset, argument):
    """Raises ValueError if `dataset` is known to repeat forever (iterating it would never end)."""
    if dataset.cardinality() == tf.data.INFINITE_CARDINALITY:
        raise ValueError(
            f"{argument} repeats forever; pass a finite tf.data.Dataset (drop .repeat()) so that "
            "every example is seen exactly once."
        )


def _as_float_images(images, labels):
    # uint8 pixels (keras.datasets, TFDS) become the encoders' float [0, 1]; floats pass unchanged.
    if images.dtype == tf.uint8:
        images = tf.cast(images, tf.float32) / 255.0
    if images.shape.rank == 3:  # [batch, H, W] grayscale (keras.datasets.fashion_mnist)
        images = images[..., None]
    return images, labels


def as_dataset(data, argument="dataset", batch_size=256, shuffle=False, seed=0):
    """(images [B, H, W, C] float, labels [B]) batches from what a Keras user has.

    Args:
      data: a batched tf.data.Dataset of (images, labels) tuples or {"image", "label"} dicts, or
        an (images, labels) tuple of NumPy arrays / tensors ([N, H, W, C] or [N, H, W]).
        uint8 images are scaled to [0, 1].
      argument: the argument's name, for error messages.
      batch_size: batch size for arrays (a dataset keeps its own batches).
      shuffle: reshuffle arrays every epoch (for training sets).

    Returns:
      a tf.data.Dataset of (images, labels) tuples with known element shapes.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], tf.data.Dataset):
        images, labels = np.asarray(data[0]), np.asarray(data[1]).reshape(-1)
        if images.ndim not in (3, 4) or len(images) != len(labels) or len(labels) == 0:
            raise ValueError(
                f"{argument} arrays have images {images.shape} and labels {labels.shape}; expected "
                "images [N, H, W, C] (or [N, H, W]) and labels [N] with the same N > 0."
            )
        dataset = tf.data.Dataset.from_tensor_slices((images, labels))
        if shuffle:
            dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
        return dataset.batch(int(batch_size)).map(_as_float_images)
    if not isinstance(data, tf.data.Dataset):
        raise ValueError(
            f"{argument} is a {type(data).__name__}; expected a batched tf.data.Dataset of "
            "(images, labels) or an (images, labels) tuple of arrays."
        )
    image_spec, _ = split_batch(data.element_spec)
    if image_spec.shape.rank is not None and image_spec.shape.rank < 4:
        raise ValueError(
            f"{argument} yields images of shape {tuple(image_spec.shape)}, which looks un-batched; "
            f"expected batches [batch, H, W, C]: call {argument}.batch(256) first."
        )
    if isinstance(data.element_spec, dict) or len(data.element_spec) != 2:
        data = data.map(lambda *batch: split_batch(batch[0] if len(batch) == 1 else batch))
    return data.map(_as_float_images)


def even_batches(dataset, multiple=2):
    """Repeats every batch whose size `multiple` does not divide until it does (an odd batch
    twice, for the default 2), so that no training step, on any replica, sees an odd batch.

    TensorFlow 2.21's oneDNN kernels (on CPUs with AVX-512 / AMX) can crash the process
    (segfault, double free) in the gradient of a strided convolution on an odd batch. A batch
    stacked on itself leaves a mean loss, its gradient and the batch-norm batch statistics exactly
    as they were, so training is unchanged; only that batch costs more. Under a strategy of N
    replicas pass multiple=2 * N: the strategy splits each batch into N equal, even parts. Works
    on any nest of tensors batched along axis 0.
    """
    multiple = int(multiple)
    if multiple < 1:
        raise ValueError(f"even_batches multiple={multiple} must be >= 1.")

    def even(*batch):
        batch = batch[0] if len(batch) == 1 else batch
        size = tf.shape(tf.nest.flatten(batch)[0])[0]
        # The fewest copies c (at most `multiple`) with c * size a multiple of `multiple`.
        candidates = tf.range(1, multiple + 1)
        copies = tf.reduce_min(tf.boolean_mask(candidates, (candidates * size) % multiple == 0))

        def tile(tensor):
            ones = tf.ones([tf.rank(tensor) - 1], tf.int32)
            return tf.tile(tensor, tf.concat([[copies], ones], axis=0))

        return tf.nest.map_structure(tile, batch)

    return dataset.map(even)


# One traced inference function per encoder (weakly held, so encoders can still be freed).
_INFERENCE = weakref.WeakKeyDictionary()


def inference_function(encoder):
    """`images -> encoder(images, training=False)` as a tf.function, cached per encoder.

    The encoder is called directly, never through `predict`: under a tf.distribute strategy Keras'
    predict splits the batch over the replicas and gathers the results (duplicating rows where the
    batch does not split, and, under MultiWorkerMirroredStrategy, starting a collective that the
    other workers never join). Called here, the model runs on the calling host with the replicas'
    shared weights, whatever strategy it was built under.
    """
    try:
        return _INFERENCE[encoder]
    except (KeyError, TypeError):
        pass
    reference = weakref.ref(encoder)
    function = tf.function(lambda images: reference()(images, training=False), reduce_retracing=True)
    try:
        _INFERENCE[encoder] = function
    except TypeError:  # not weakly referenceable: trace per call
        pass
    return function


def extract_features(encoder, dataset, normalize=False, batch_size=256):
    """Runs a frozen encoder over a finite dataset.

    Args:
      encoder: a callable / keras.Model mapping images [batch, H, W, C] to features [batch, D];
        it is called with `training=False` (batch norm uses its moving statistics).
      dataset: finite tf.data.Dataset of (images, labels) batches, or (images, labels) arrays.
      normalize: L2-normalise each feature row.
      batch_size: batch size for arrays.

    Returns:
      (features float32 [N, D], labels int64 [N]) as NumPy arrays, in dataset order.
    """
    dataset = as_dataset(dataset, "dataset", batch_size)
    check_finite(dataset, "dataset")
    encode = inference_function(encoder)
    features, labels = [], []
    for images, batch_labels in dataset:
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
