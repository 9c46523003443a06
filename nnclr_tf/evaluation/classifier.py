"""Training a classifier on an encoder, shared by linear evaluation and fine-tuning: the data
(`training_data`: datasets or arrays, no odd training batch), SGD with a cosine schedule
(`compile_classifier`) and the test scores with their example count (`evaluate_classifier`)."""

import keras
import tensorflow as tf

from nnclr_tf.evaluation.features import as_dataset, check_finite, even_batches


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


class ExampleCount(keras.metrics.Metric):
    """The number of examples evaluated (rows of y_true), so results state their test size."""

    def __init__(self, name="examples", **kwargs):
        super().__init__(name=name, **kwargs)
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        self.count.assign_add(tf.cast(tf.shape(y_pred)[0], "float32"))

    def result(self):
        return self.count


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
    metrics.append(ExampleCount())
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=metrics,
    )


def evaluate_classifier(model, test_ds, num_classes):
    """dict(top1, top5 (num_classes >= 5), num_test) of a compiled classifier on a finite dataset."""
    check_finite(test_ds, "test_ds")
    logs = model.evaluate(test_ds, verbose=0, return_dict=True)
    keys = ("top1", "top5") if num_classes >= 5 else ("top1",)
    return {**{key: float(logs[key]) for key in keys}, "num_test": int(logs["examples"])}


def training_data(train_ds, test_ds, batch_size, seed, replicas=1):
    """(train, test) datasets of (images, labels) from datasets or arrays; training batches are
    repeated until each of `replicas` gets an even part (`even_batches`), so no training step
    meets TensorFlow's odd-batch crash."""
    train_ds = as_dataset(train_ds, "train_ds", batch_size, shuffle=True, seed=seed)
    train_ds = even_batches(train_ds, multiple=2 * max(1, int(replicas)))
    test_ds = as_dataset(test_ds, "test_ds", batch_size)
    check_finite(test_ds, "test_ds")
    return train_ds, test_ds
