"""Evaluation sized for large runs, in process: the report's training sample on large datasets and
the batches that every replica can train on. The runs under a strategy of several replicas or
workers are in test_distribute_eval.py (slow: a process each)."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from nnclr_tf import config as cfg
from nnclr_tf import report
from nnclr_tf.evaluation import even_batches


@pytest.fixture(name="whole_splits")
def whole_splits_config(embedded_data_dir):
    """The tiny preset on the embedded data (10,000 train, 2,000 test), scored on whole splits."""
    config = cfg.get_preset("tiny")
    return cfg.override(config, {"data.data_dir": embedded_data_dir, "eval.max_eval_examples": 0})


def sample_labels(config, cap):
    dataset, count = report._train_images(config, cap)  # pylint: disable=protected-access
    labels = np.concatenate([np.asarray(y) for _, y in dataset])
    return labels, count


def test_small_datasets_are_scored_whole(whole_splits):
    # 10,000 embedded images (and Fashion-MNIST's 60,000) are below the default cap.
    assert report.train_sample_size(whole_splits) == (10_000, 10_000, False)
    assert report.REPORT_MAX_TRAIN_EXAMPLES >= 60_000
    first = cfg.override(whole_splits, {"eval.max_eval_examples": 64})
    assert report.train_sample_size(first) == (64, 10_000, False)


def test_a_large_split_is_sampled_class_balanced_and_stated(whole_splits):
    cap = 100
    assert report.train_sample_size(whole_splits, cap) == (100, 10_000, True)
    labels, count = sample_labels(whole_splits, cap)
    assert count == len(labels) == 100
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), [10] * 10)
    # The sample is drawn with run.seed: the same seed gives it again, another seed another one.
    again, _ = sample_labels(whole_splits, cap)
    other, _ = sample_labels(
        dataclasses.replace(whole_splits, run=dataclasses.replace(whole_splits.run, seed=1)), cap)
    np.testing.assert_array_equal(again, labels)
    assert len(other) == 100 and not np.array_equal(other, labels)

    scores = report.raw_pixel_scores(whole_splits, 10, max_train_examples=cap)
    assert (scores["num_train"], scores["num_test"]) == (100, 2_000)
    assert scores["knn_top1"] > 0.3  # raw Fashion-MNIST pixels, 10 per class: far above chance
    protocol = report.protocol(whole_splits, scores, cap)
    assert protocol["max_train_examples"] == 100 and protocol["num_train"] == 100
    assert "100 of the 10000 images of the 'train' split" in protocol["train_sample"]
    text = report.format_report({
        "dataset": "embedded", "steps": 4, "protocol": protocol, "trained": scores,
        "verdict": "-", "pictures": [], "tensorboard": "logs"})
    assert f"({protocol['train_sample']})" in text
    assert "train_sample" not in report.protocol(whole_splits, scores)  # under the default cap


@pytest.mark.parametrize("multiple, sizes, copies", [
    (2, [8, 5], [1, 2]),
    (4, [8, 10, 5, 3], [1, 2, 4, 4]),   # two replicas: every replica's part is even
    (8, [16, 12, 6], [1, 2, 4]),
])
def test_even_batches_repeat_a_batch_until_every_replica_gets_an_even_part(multiple, sizes, copies):
    rows = np.arange(sum(sizes), dtype=np.float32)
    batches = np.split(rows, np.cumsum(sizes)[:-1])
    dataset = tf.data.Dataset.from_generator(
        lambda: ((b, b.astype(np.int64)) for b in batches),
        output_signature=(tf.TensorSpec([None], tf.float32), tf.TensorSpec([None], tf.int64)))
    for (images, labels), batch, times in zip(even_batches(dataset, multiple), batches, copies):
        images = images.numpy()
        np.testing.assert_array_equal(images, np.tile(batch, times))
        np.testing.assert_array_equal(labels.numpy(), np.tile(batch, times).astype(np.int64))
        assert len(images) % multiple == 0
        assert images.mean() == pytest.approx(batch.mean())  # the mean loss is unchanged
