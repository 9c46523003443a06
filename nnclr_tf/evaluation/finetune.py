"""Semi-supervised fine-tuning (the paper's 1 % / 10 % ImageNet protocol) of a copy of the encoder.

results, classifier = fine_tune(encoder, labelled_train_ds, test_ds, num_classes=1000)
results, classifier = fine_tune(encoder, (x_train, y_train), (x_test, y_test), num_classes=10)
"""

import keras
import tensorflow as tf

from nnclr_tf.config import EvalConfig
from nnclr_tf.evaluation.classifier import (
    compile_classifier,
    evaluate_classifier,
    steps_in,
    training_data,
)


def copy_encoder(encoder):
    """A trainable copy of `encoder` with the same weights (the caller's model is never touched)."""
    try:
        copy = keras.models.clone_model(encoder)
    except Exception as error:  # clone_model raises several types for models it cannot rebuild
        raise ValueError(
            f"Cannot copy encoder {encoder.name!r} with keras.models.clone_model ({error}); pass a "
            "functional or serializable keras.Model."
        ) from error
    copy.set_weights(encoder.get_weights())
    copy.trainable = True
    return copy


def fine_tune(
    encoder,
    train_ds,
    test_ds,
    num_classes,
    epochs=EvalConfig.finetune_epochs,
    learning_rate=EvalConfig.finetune_learning_rate,
    momentum=0.9,
    weight_decay=0.0,
    steps_per_epoch=None,
    verbose=0,
    batch_size=256,
    seed=0,
    strategy=None,
    callbacks=None,
):
    """Fine-tunes a copy of the encoder plus a linear head end to end on labelled data.

    Args:
      encoder: keras.Model, images [batch, H, W, C] float in [0, 1] -> features [batch, D]; copied
        with clone_model + set_weights, so its own weights stay as they were.
      train_ds: (images, labels) batches (e.g. the 1 % or 10 % subset, augmented by the caller),
        or (images, labels) arrays (shuffled every epoch); test_ds: finite, un-augmented, or
        arrays. Datasets may yield {"image", "label"} dicts.
      epochs, learning_rate, momentum, weight_decay: SGD with momentum, cosine decay to 0
        (defaults: 30 epochs at 0.01, as `nnclr finetune`).
      batch_size: batch size for arrays.
      callbacks: Keras callbacks for the fit (e.g. `EpochLog`, as the `nnclr` modes pass).
      strategy: a tf.distribute strategy to train under (default: the current one); the copy
        and its head are built in its scope, and batches are global (Keras splits each over the
        replicas). The head's logits are float32 under any policy.

    Returns:
      (dict(top1, top5 (num_classes >= 5), num_test, epochs, learning_rate) on test_ds, the
      fine-tuned classifier keras.Model mapping images to logits [batch, num_classes]).
    """
    strategy = strategy or tf.distribute.get_strategy()
    train_ds, test_ds = training_data(train_ds, test_ds, batch_size, seed,
                                      strategy.num_replicas_in_sync)
    steps = steps_in(train_ds, steps_per_epoch)
    with strategy.scope():
        backbone = copy_encoder(encoder)
        inputs = keras.Input(shape=tuple(train_ds.element_spec[0].shape[1:]), name="images")
        logits = keras.layers.Dense(num_classes, dtype="float32", name="classifier_head")(
            backbone(inputs)
        )
        classifier = keras.Model(inputs, logits, name="fine_tuned")
        compile_classifier(
            classifier, learning_rate, epochs * steps, momentum, weight_decay, num_classes
        )
    classifier.fit(
        train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose, shuffle=False,
        callbacks=callbacks,
    )
    results = evaluate_classifier(classifier, test_ds, num_classes)
    return {**results, "epochs": int(epochs), "learning_rate": float(learning_rate)}, classifier
