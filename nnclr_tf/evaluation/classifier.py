"""Training a classifier on an encoder, shared by linear evaluation and fine-tuning: the data
(`training_data`: datasets or arrays, no odd training batch), SGD with a cosine schedule
(`compile_classifier`), one log line per epoch (`EpochLog`) and the test scores with their example
count (`evaluate_classifier`)."""

import logging
import time

import keras

from nnclr_tf.evaluation.features import (
    accuracy_metrics,
    as_dataset,
    check_finite,
    even_batches,
    extract_features,
)


log = logging.getLogger("nnclr_tf")


class EpochLog(keras.callbacks.Callback):
    """One INFO line per epoch on the "nnclr_tf" logger, for runs whose fit is silent (verbose=0):
    "linear_eval: epoch 3/30, loss 0.5123, train top-1 81.2 %, 0:01:04 so far"."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name
        self._start = None

    def on_train_begin(self, logs=None):
        self._start = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        parts = [f"{self.name}: epoch {epoch + 1}/{self.params.get('epochs', '?')}"]
        if "loss" in logs:
            parts.append(f"loss {float(logs['loss']):.4f}")
        if "top1" in logs:
            parts.append(f"train top-1 {100 * float(logs['top1']):.1f} %")
        seconds = int(time.monotonic() - self._start)
        parts.append(f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d} so far")
        log.info(", ".join(parts))


def steps_in(dataset, steps_per_epoch, argument="train_ds"):
    """Steps per epoch: `steps_per_epoch` if given, else the dataset's known cardinality."""
    if steps_per_epoch is not None:
        return int(steps_per_epoch)
    steps = int(dataset.cardinality())
    if steps <= 0:
        raise ValueError(
            f"{argument} has no known length (cardinality {steps}); pass steps_per_epoch so the "
            "cosine learning-rate schedule knows how many steps to decay over."
        )
    return steps


def compile_classifier(model, learning_rate, total_steps, momentum, weight_decay, num_classes):
    """SGD with momentum on a cosine-decayed learning rate, top-1 / top-5 metrics; the loss reads
    float32 logits (the heads are float32 under a mixed policy). Call it in the scope the model
    was built in: the optimizer's and metrics' variables then live on every replica."""
    schedule = keras.optimizers.schedules.CosineDecay(
        learning_rate, decay_steps=max(1, total_steps)
    )
    optimizer = keras.optimizers.SGD(
        learning_rate=schedule, momentum=momentum, weight_decay=weight_decay or None
    )
    metrics = [keras.metrics.SparseCategoricalAccuracy(name="top1")]
    if num_classes >= 5:
        metrics.append(keras.metrics.SparseTopKCategoricalAccuracy(k=5, name="top5"))
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
    )


def evaluate_classifier(model, test_ds, num_classes):
    """dict(top1, top5 (num_classes >= 5), num_test) of a classifier on a finite dataset.

    The classifier is called on this host, batch by batch (`extract_features`), never through
    Keras' evaluate: under MirroredStrategy on two CPU replicas its metrics counted 1,090 to 1,888
    of 2,000 test images, another number in every run.
    """
    check_finite(test_ds, "test_ds")
    logits, labels = extract_features(model, test_ds)
    return {**accuracy_metrics(logits, labels, num_classes), "num_test": int(len(labels))}


def training_data(train_ds, test_ds, batch_size, seed, replicas=1):
    """(train, test) datasets of (images, labels) from datasets or arrays; training batches are
    repeated until each of `replicas` gets an even part (`even_batches`), so no training step
    meets TensorFlow's odd-batch crash."""
    train_ds = as_dataset(train_ds, "train_ds", batch_size, shuffle=True, seed=seed)
    train_ds = even_batches(train_ds, multiple=2 * max(1, int(replicas)))
    test_ds = as_dataset(test_ds, "test_ds", batch_size)
    check_finite(test_ds, "test_ds")
    return train_ds, test_ds
