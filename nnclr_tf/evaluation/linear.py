"""Linear evaluation of frozen features: a fast L-BFGS probe and the paper's SGD protocol.

# Fast path (transfer suite, quick checks): L2-regularised logistic regression on features.
linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes)  # {"top1", "top5", "l2", ...}
linear_probe_evaluate(encoder, train_ds, test_ds, num_classes)        # the same from an encoder
# The paper's protocol: a Dense head on a frozen encoder, SGD + cosine on augmented images.
linear_evaluation(encoder, augmented_train_ds, test_ds, num_classes)   # 90 epochs, lr 0.1
linear_evaluation(encoder, (x_train, y_train), (x_test, y_test), num_classes, epochs=10)
"""

import keras
import numpy as np
import tensorflow as tf

from nnclr_tf.config import EvalConfig
from nnclr_tf.evaluation.classifier import (
    compile_classifier,
    evaluate_classifier,
    steps_in,
    training_data,
)
from nnclr_tf.evaluation.features import (
    accuracy_metrics,
    extract_features,
    mean_per_class_accuracy,
)

# Weights of the mean cross-entropy + 0.5 * l2 * ||W||^2 objective on standardised features.
DEFAULT_L2_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


class _LogisticObjective:
    """Mean cross-entropy + 0.5 * l2 * ||W||^2 and its gradient; flat parameters [dim * C + C]."""

    def __init__(self, features, labels, num_classes, chunk_rows=65536):
        self.dim = features.shape[1]
        self.num_classes = num_classes
        self.count = len(features)
        # Row chunks bound the logits to [chunk_rows, C] (ImageNet: 1.28M x 1000 would not fit).
        self.chunks = [
            (tf.constant(features[s : s + chunk_rows]), tf.constant(labels[s : s + chunk_rows]))
            for s in range(0, len(features), chunk_rows)
        ]

    @tf.function(reduce_retracing=True)
    def _chunk(self, weights, bias, features, labels):
        with tf.GradientTape() as tape:
            tape.watch([weights, bias])
            logits = tf.matmul(features, weights) + bias
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
            )
        return loss, tape.gradient(loss, [weights, bias])

    def __call__(self, params, l2):
        weights = tf.constant(
            params[: -self.num_classes].reshape(self.dim, self.num_classes), tf.float32
        )
        bias = tf.constant(params[-self.num_classes :], tf.float32)
        loss, grad_w, grad_b = 0.0, 0.0, 0.0
        for features, labels in self.chunks:
            chunk_loss, (chunk_w, chunk_b) = self._chunk(weights, bias, features, labels)
            loss, grad_w, grad_b = loss + chunk_loss, grad_w + chunk_w, grad_b + chunk_b
        flat_w = params[: -self.num_classes]
        loss = float(loss) / self.count + 0.5 * l2 * float(flat_w @ flat_w)
        grad_w = np.asarray(grad_w, np.float64).reshape(-1) / self.count + l2 * flat_w
        return loss, np.concatenate([grad_w, np.asarray(grad_b, np.float64) / self.count])


def _lbfgs(objective, params, max_iterations=500, memory=10, tolerance=1e-7):
    """Minimises a smooth convex objective(params) -> (loss, grad): L-BFGS, Armijo backtracking."""
    loss, grad = objective(params)
    history = []
    for _ in range(max_iterations):
        # Two-loop recursion: direction = -H grad with H from the last `memory` curvature pairs.
        direction, alphas = grad.copy(), []
        for s, y, rho in reversed(history):
            alpha = rho * (s @ direction)
            direction -= alpha * y
            alphas.append(alpha)
        scale = (
            (history[-1][0] @ history[-1][1]) / (history[-1][1] @ history[-1][1])
            if history
            else (1.0 / max(np.linalg.norm(grad), 1e-12))
        )
        direction *= scale
        for (s, y, rho), alpha in zip(history, reversed(alphas)):
            direction += s * (alpha - rho * (y @ direction))
        direction = -direction
        slope = grad @ direction
        if slope >= 0:  # not a descent direction (numerical trouble): restart from steepest descent
            history, direction, slope = [], -grad, -(grad @ grad)
        step = 1.0
        while True:
            new_params = params + step * direction
            new_loss, new_grad = objective(new_params)
            if new_loss <= loss + 1e-4 * step * slope or step < 1e-10:
                break
            step *= 0.5
        s, y = new_params - params, new_grad - grad
        if s @ y > 1e-12:
            history = (history + [(s, y, 1.0 / (s @ y))])[-memory:]
        converged = abs(loss - new_loss) <= tolerance * max(1.0, abs(loss))
        params, loss, grad = new_params, new_loss, new_grad
        if converged or np.max(np.abs(grad)) < tolerance:
            break
    return params


def _predict_scores(params, features, num_classes):
    weights = params[:-num_classes].reshape(features.shape[1], num_classes)
    return features @ weights + params[-num_classes:]


def _cross_entropy(scores, labels):
    scores = scores - scores.max(axis=1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(labels)), labels]))


def linear_probe_accuracy(
    train_x,
    train_y,
    test_x,
    test_y,
    num_classes,
    l2_grid=DEFAULT_L2_GRID,
    validation_fraction=0.2,
    max_iterations=500,
    seed=0,
    return_predictions=False,
):
    """Multinomial logistic regression on precomputed features, L2 chosen on a validation split.

    Features are standardised with the training statistics. Each `l2_grid` value is fitted on
    (1 - validation_fraction) of the training rows and scored on the rest (accuracy, then
    validation cross-entropy to break ties); the best is refitted on all training rows.

    Args:
      train_x, test_x: [N, D] features; train_y, test_y: [N] labels in [0, num_classes).

    Returns:
      dict(top1, top5 (num_classes >= 5), mean_per_class, l2, val_top1) on the test rows, and with
      `return_predictions` "predictions": the [N] top-1 classes of the test rows (int64).
    """
    train_x = np.asarray(train_x, np.float32)
    test_x = np.asarray(test_x, np.float32)
    train_y = np.asarray(train_y).reshape(-1).astype(np.int64)
    test_y = np.asarray(test_y).reshape(-1).astype(np.int64)
    if train_x.ndim != 2 or test_x.ndim != 2 or train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"Linear probe features must be [N, D] with the same D; got train {train_x.shape} and "
            f"test {test_x.shape}."
        )
    for name, y in (("train", train_y), ("test", test_y)):
        if len(y) == 0 or y.min() < 0 or y.max() >= num_classes:
            raise ValueError(
                f"The {name} labels are empty or outside [0, {num_classes}); pass labels in "
                "[0, num_classes) and the right num_classes."
            )
    if not l2_grid or not 0 < validation_fraction < 1:
        raise ValueError(
            f"l2_grid={l2_grid} must be non-empty and validation_fraction={validation_fraction} "
            "in (0, 1)."
        )
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)  # constant features stay constant instead of blowing up
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std

    order = np.random.default_rng(seed).permutation(len(train_x))
    num_val = min(max(1, int(round(validation_fraction * len(train_x)))), len(train_x) - 1)
    val_rows, fit_rows = order[:num_val], order[num_val:]
    objective = _LogisticObjective(train_x[fit_rows], train_y[fit_rows], num_classes)
    params = np.zeros(train_x.shape[1] * num_classes + num_classes)
    best = None
    # Strongest regularisation first: each fit warm-starts the next, weaker one.
    for l2 in sorted(l2_grid, reverse=True):
        params = _lbfgs(lambda p: objective(p, l2), params, max_iterations)
        scores = _predict_scores(params, train_x[val_rows], num_classes)
        val_top1 = float(np.mean(np.argmax(scores, axis=1) == train_y[val_rows]))
        key = (val_top1, -_cross_entropy(scores, train_y[val_rows]))
        if best is None or key > best[0]:
            best = (key, l2, params.copy())
    (val_top1, _), l2, params = best

    objective = _LogisticObjective(train_x, train_y, num_classes)
    params = _lbfgs(lambda p: objective(p, l2), params, max_iterations)
    scores = _predict_scores(params, test_x, num_classes)
    results = accuracy_metrics(scores, test_y, num_classes)
    results["mean_per_class"] = mean_per_class_accuracy(np.argmax(scores, axis=1), test_y)
    results.update(l2=float(l2), val_top1=val_top1)
    if return_predictions:
        results["predictions"] = np.argmax(scores, axis=1).astype(np.int64)
    return results


def linear_probe_evaluate(encoder, train_ds, test_ds, num_classes, **kwargs):
    """The fast linear protocol on an encoder: frozen features, then `linear_probe_accuracy`.

    Args:
      encoder: images [batch, H, W, C] float in [0, 1] -> features [batch, D].
      train_ds, test_ds: finite (images, labels) batches, or (images, labels) arrays.
      kwargs: those of `linear_probe_accuracy` (l2_grid, validation_fraction, ...).

    Returns:
      dict(top1, top5 (num_classes >= 5), mean_per_class, l2, val_top1, num_train, num_test).
    """
    train_x, train_y = extract_features(encoder, train_ds)
    test_x, test_y = extract_features(encoder, test_ds)
    results = linear_probe_accuracy(train_x, train_y, test_x, test_y, num_classes, **kwargs)
    return {**results, "num_train": len(train_y), "num_test": len(test_y)}


def linear_evaluation(
    encoder,
    train_ds,
    test_ds,
    num_classes,
    epochs=EvalConfig.linear_epochs,
    learning_rate=EvalConfig.linear_learning_rate,
    momentum=0.9,
    weight_decay=0.0,
    steps_per_epoch=None,
    verbose=0,
    batch_size=256,
    seed=0,
    strategy=None,
    callbacks=None,
):
    """The paper's linear evaluation: a Dense head trained on a frozen encoder.

    The encoder is called with `training=False` and is not trainable during the fit (its
    `trainable` flag is restored afterwards), so its weights and batch-norm statistics never
    change. The head is batch norm without scale (SimCLR's linear-evaluation head) then Dense: it
    sees standardised features whatever their scale, so one learning rate serves every encoder.
    SGD with momentum follows a cosine decay to 0. The head computes in float32 under any policy.

    Args:
      encoder: keras.Model, images [batch, H, W, C] float in [0, 1] -> features [batch, D].
      train_ds: (images, labels) batches, already augmented by the caller (may repeat when
        `steps_per_epoch` is given), or (images, labels) arrays (shuffled every epoch);
        test_ds: finite, un-augmented, or arrays. Datasets may yield {"image", "label"} dicts.
      epochs, learning_rate, momentum, weight_decay: the head's SGD schedule (defaults: the
        paper's 90 epochs at 0.1, as `nnclr linear_eval`).
      batch_size: batch size for arrays.
      callbacks: Keras callbacks for the fit (e.g. `EpochLog`, as the `nnclr` modes pass).
      strategy: a tf.distribute strategy to train under (default: the current one). Batches are
        global: Keras splits each over the replicas; the head's batch norm uses the global batch.
        Build the encoder in its scope.

    Returns:
      dict(top1, top5 (num_classes >= 5), num_test, epochs, learning_rate) on test_ds.
    """
    strategy = strategy or tf.distribute.get_strategy()
    train_ds, test_ds = training_data(train_ds, test_ds, batch_size, seed,
                                      strategy.num_replicas_in_sync)
    steps = steps_in(train_ds, steps_per_epoch)
    image_spec = train_ds.element_spec[0]
    was_trainable = encoder.trainable
    encoder.trainable = False
    try:
        with strategy.scope():
            inputs = keras.Input(shape=tuple(image_spec.shape[1:]), name="images")
            features = encoder(inputs, training=False)
            # Momentum 0.9 (SimCLR's): short protocols still end with settled moving statistics.
            features = keras.layers.BatchNormalization(
                scale=False, momentum=0.9, synchronized=True, dtype="float32",
                name="feature_norm")(features)
            logits = keras.layers.Dense(num_classes, dtype="float32", name="linear_head")(features)
            classifier = keras.Model(inputs, logits, name="linear_evaluation")
            compile_classifier(
                classifier, learning_rate, epochs * steps, momentum, weight_decay, num_classes
            )
        classifier.fit(
            train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose,
            shuffle=False, callbacks=callbacks,
        )
        results = evaluate_classifier(classifier, test_ds, num_classes)
        return {**results, "epochs": int(epochs), "learning_rate": float(learning_rate)}
    finally:
        encoder.trainable = was_trainable
