"""Tests for nnclr_tf.data with TFDS sources: the embedded builder, pipelines, subsets, sharding,
offline errors. Folder sources are in test_data_folder.py."""

import collections
import hashlib
import os
import shutil
import socket
import contextlib
import io
import logging
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from nnclr_tf import data, evaluate
from nnclr_tf.data import sources, subsets, tfds_builder


def _tempdir(test):
    """A fresh directory removed after `test` (absltest's create_tempdir needs parsed flags)."""
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path

def _no_network(*args, **kwargs):
    raise AssertionError("the data code tried to use the network")


def _digests(images, labels):
    """Multiset of (image bytes hash, label): order-free identity of examples."""
    return collections.Counter((hashlib.sha1(np.ascontiguousarray(x).tobytes()).hexdigest(), int(y))
                               for x, y in zip(images, labels))


def _collect(dataset):
    images, labels = zip(*[(x.numpy(), y.numpy()) for x, y in dataset])
    return np.concatenate(images), np.concatenate(labels)


class EmbeddedTest(parameterized.TestCase):
    """Shares one prepared embedded dataset (a few seconds to prepare)."""

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.data_dir = tempfile.mkdtemp()
        cls.printed, cls.logged = io.StringIO(), []
        handler = logging.Handler()
        handler.emit = lambda record: cls.logged.append(record.getMessage())
        logger = logging.getLogger("nnclr_tf")
        logger.addHandler(handler)
        level = logger.level
        logger.setLevel(logging.INFO)  # setLevel, not .level =: it clears the loggers' cached levels
        try:
            with mock.patch.object(socket, "getaddrinfo", _no_network), \
                    mock.patch.object(socket.socket, "connect", _no_network), \
                    contextlib.redirect_stdout(cls.printed):
                tfds.builder("nnclr_fashion_mnist/embedded",
                             data_dir=cls.data_dir).download_and_prepare()
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.data_dir, ignore_errors=True)
        super().tearDownClass()

    @parameterized.parameters(("train", 10_000, 1_000), ("test", 2_000, 200))
    def test_tfds_builder_holds_the_balanced_subset(self, split, total, per_class):
        builder = tfds.builder("nnclr_fashion_mnist/embedded", data_dir=self.data_dir)
        self.assertTrue(builder.is_prepared())
        self.assertEqual(builder.info.features["label"].names, list(tfds_builder.CLASS_NAMES))
        ds = builder.as_dataset(split=split, batch_size=-1)
        images, labels = tfds.as_numpy(ds)["image"], tfds.as_numpy(ds)["label"]
        self.assertEqual(images.shape, (total, 28, 28, 1))
        self.assertEqual(images.dtype, np.uint8)
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
        # Same examples as the shipped arrays (TFDS reorders them when writing).
        expected_images, expected_labels = tfds_builder.load_split_arrays("embedded", split)
        self.assertEqual(_digests(images[..., 0], labels),
                         _digests(expected_images, expected_labels))

    def test_preparing_says_what_and_where_in_one_line(self):
        self.assertNotIn("Downloading", self.printed.getvalue())
        self.assertNotIn("Unknown size", self.printed.getvalue())
        builder = tfds.builder("nnclr_fashion_mnist/embedded", data_dir=self.data_dir)
        self.assertEqual(self.logged, [
            "Preparing the embedded Fashion-MNIST subset (10,000 train / 2,000 test images) in "
            f"{builder.data_dir} (once; later runs read it from there)."])

    def test_a_missing_split_names_the_splits_and_the_flag(self):
        with self.assertRaises(ValueError) as caught:
            data.dataset_info("embedded", "validation", data_dir=self.data_dir)
        message = str(caught.exception)
        self.assertIn("has no split 'validation' (it has ", message)
        self.assertIn("--set data.eval_split=", message)

    def test_dataset_info_and_aliases(self):
        info = data.dataset_info("embedded", "train", data_dir=self.data_dir)
        self.assertEqual((info.num_examples, info.num_classes, info.image_shape),
                         (10_000, 10, (28, 28, 1)))
        self.assertTrue(info.has_labels)
        self.assertEqual(data.dataset_info("nnclr_fashion_mnist/embedded", "test",
                                           data_dir=self.data_dir).num_examples, 2_000)
        self.assertEqual(sources.ALIASES["fashion_mnist_full"], "nnclr_fashion_mnist/full")

    def test_full_config_names_the_debian_package_when_files_are_missing(self):
        with self.assertRaisesRegex(ValueError, "apt-get install dataset-fashion-mnist"):
            tfds_builder.debian_files(_tempdir(self))

    @parameterized.parameters((None, 1), (3, 3))
    def test_pretraining_batches(self, channels, expected_channels):
        ds = data.pretraining_dataset("embedded", data_dir=self.data_dir, batch_size=8,
                                      image_size=16, shuffle_buffer=64, channels=channels)
        batch = next(iter(ds))
        self.assertEqual(set(batch), {"view_1", "view_2", "label"})
        for key in ("view_1", "view_2"):
            self.assertEqual(batch[key].shape, (8, 16, 16, expected_channels))
            self.assertEqual(batch[key].dtype, tf.float32)
            self.assertBetween(float(tf.reduce_min(batch[key])), 0.0, 1.0)
            self.assertBetween(float(tf.reduce_max(batch[key])), 0.0, 1.0)
        self.assertEqual(batch["label"].dtype, tf.int32)
        self.assertTrue(np.all((batch["label"].numpy() >= 0) & (batch["label"].numpy() < 10)))
        difference = tf.reduce_max(tf.abs(batch["view_1"] - batch["view_2"]), axis=[1, 2, 3])
        self.assertTrue(np.all(difference.numpy() > 0), "the two views of an image are identical")

    def test_pretraining_without_labels(self):
        ds = data.pretraining_dataset("embedded", data_dir=self.data_dir, batch_size=4,
                                      image_size=16, shuffle_buffer=16, with_labels=False)
        self.assertEqual(set(ds.element_spec), {"view_1", "view_2"})

    def test_label_subsets_are_exact_balanced_and_seeded(self):
        def subset(fraction, seed):
            ds = data.evaluation_dataset("embedded", "train", data_dir=self.data_dir, batch_size=512,
                                         image_size=28, label_fraction=fraction, seed=seed)
            return _collect(ds)

        images, labels = subset(0.0133, seed=0)  # round(133.0) = 133 of 10,000
        self.assertLen(labels, 133)
        counts = np.bincount(labels, minlength=10)
        self.assertEqual(counts.max() - counts.min(), 1)
        images_again, labels_again = subset(0.0133, seed=0)
        np.testing.assert_array_equal(images, images_again)
        np.testing.assert_array_equal(labels, labels_again)
        other_images, other_labels = subset(0.0133, seed=1)
        self.assertNotEqual(_digests(images, labels), _digests(other_images, other_labels))

    def test_input_context_shards_are_disjoint_halves(self):
        reference = _collect(data.evaluation_dataset("embedded", "test", data_dir=self.data_dir,
                                                     batch_size=500, image_size=28))
        halves = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(num_input_pipelines=2,
                                                 input_pipeline_id=pipeline_id,
                                                 num_replicas_in_sync=2)
            halves.append(_digests(*_collect(data.evaluation_dataset(
                "embedded", "test", data_dir=self.data_dir, batch_size=500, image_size=28,
                input_context=context))))
            views = data.pretraining_dataset("embedded", data_dir=self.data_dir, batch_size=16,
                                             image_size=16, shuffle_buffer=16, input_context=context)
            self.assertEqual(views.element_spec["view_1"].shape, (8, 16, 16, 1))
        self.assertEqual([sum(h.values()) for h in halves], [1_000, 1_000])
        self.assertEqual(halves[0] + halves[1], _digests(*reference))

    def test_load_arrays_matches_the_evaluation_pipeline(self):
        images, labels = data.load_arrays("embedded", "test", data_dir=self.data_dir, limit=40)
        self.assertEqual((images.shape, images.dtype, labels.dtype),
                         ((40, 28, 28, 1), np.uint8, np.int32))
        batch, batch_labels = next(iter(data.evaluation_dataset(
            "embedded", "test", data_dir=self.data_dir, batch_size=40, image_size=28)))
        np.testing.assert_allclose(batch.numpy(), images / 255.0, atol=1e-6)
        np.testing.assert_array_equal(batch_labels.numpy(), labels)
        small, _ = data.load_arrays("embedded", "test", data_dir=self.data_dir, image_size=14,
                                    limit=3)
        self.assertEqual(small.shape, (3, 14, 14, 1))

    def test_crop_flip_evaluation_augmentation(self):
        ds = data.evaluation_dataset("embedded", "train", data_dir=self.data_dir, batch_size=8,
                                     image_size=20, augment="crop_flip", repeat=True, shuffle=True)
        images, labels = next(iter(ds))
        self.assertEqual(images.shape, (8, 20, 20, 1))
        with self.assertRaisesRegex(ValueError, "augment"):
            data.evaluation_dataset("embedded", "test", data_dir=self.data_dir, augment="byol")


class SubsetTest(parameterized.TestCase):

    @parameterized.parameters(
        ([10, 10, 10], 7), ([1, 50, 50], 30), ([0, 3, 100, 5], 60), ([4, 4], 8))
    def test_class_quotas_are_as_even_as_the_classes_allow(self, counts, total):
        quotas = subsets.class_quotas(counts, total, np.random.default_rng(0))
        counts = np.asarray(counts)
        self.assertEqual(quotas.sum(), total)
        self.assertTrue(np.all(quotas <= counts))
        # Classes below their count differ by at most one, and none is below a capped one's quota.
        open_classes = quotas < counts
        if open_classes.any():
            self.assertLessEqual(np.ptp(quotas[open_classes]), 1)
            self.assertTrue(np.all(quotas[~open_classes & (counts > 0)]
                                   <= quotas[open_classes].min()))

    def test_fraction_errors(self):
        with self.assertRaisesRegex(ValueError, "label_fraction must be in \\(0, 1\\], got 1.5"):
            subsets.balanced_subset(np.zeros([10], np.int64), 1.5)

    @parameterized.parameters((0.01, 0, 4), (0.2, 4, 4), (0.5, 10, 10))
    def test_a_subset_has_one_example_of_every_class_at_least(self, fraction, requested, size):
        labels = np.repeat([0, 1, 2, 5], 5)  # four classes present of six labels
        if requested < 4:
            with self.assertLogs(level="WARNING") as logs:
                chosen = subsets.balanced_subset(labels, fraction)
            self.assertIn(f"selects {requested}, fewer than one per class: using one image of each "
                          "of the 4 classes instead", logs.output[0])
            self.assertIn("--set eval.label_fraction=", logs.output[0])
        else:
            chosen = subsets.balanced_subset(labels, fraction)
        self.assertLen(chosen, size)
        self.assertEqual(set(labels[chosen]), {0, 1, 2, 5})

    def test_held_out_mask_takes_a_fixed_part_of_each_class(self):
        names = [f"class_{c}/img_{i}.png" for c in range(3) for i in range(40)]
        labels = np.repeat([0, 1, 2], 40)
        held = subsets.held_out_mask(names, labels, 0.1)
        self.assertEqual(np.bincount(labels[held]).tolist(), [4, 4, 4])
        np.testing.assert_array_equal(held, subsets.held_out_mask(names, labels, 0.1))
        # The names, not their order, decide: shuffled input holds out the same names.
        order = np.random.default_rng(0).permutation(len(names))
        shuffled = subsets.held_out_mask([names[i] for i in order], labels[order], 0.1)
        self.assertEqual({names[i] for i in order[shuffled]}, set(np.asarray(names)[held]))
        # Small classes: at least one held out when there are two, none when there is one.
        small = subsets.held_out_mask(["a", "b", "c"], [0, 0, 1], 0.1)
        self.assertEqual((int(small[:2].sum()), bool(small[2])), (1, False))


def _write_tfds_metadata(data_dir, name, num_examples):
    """dataset_info.json for `name` as if it were prepared, so mock_data can stand in for the files."""
    builder = tfds.builder(name, data_dir=data_dir)
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0,
                            filename_template=tfds.core.ShardedFileTemplate(
                                data_dir=builder.data_dir, dataset_name=name, split=split,
                                filetype_suffix="tfrecord"))
        for split in ("train", "test")]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


class TfdsSourceTest(parameterized.TestCase):

    def test_the_default_transfer_datasets_are_tfds_builders(self):
        known = set(tfds.list_builders(with_community_datasets=False))
        bases = [name.split("/")[0] for name in evaluate.DEFAULT_TRANSFER_DATASETS]
        self.assertEqual([b for b in bases if b not in known], [])
        self.assertNotIn("birdsnap", evaluate.DEFAULT_TRANSFER_DATASETS)
        self.assertLen(evaluate.DEFAULT_TRANSFER_DATASETS, 10)

    def test_cifar10_through_mock_data(self):
        data_dir = _tempdir(self)
        _write_tfds_metadata(data_dir, "cifar10", 32)
        with tfds.testing.mock_data(num_examples=32, data_dir=data_dir):
            info = data.dataset_info("cifar10", "train", data_dir=data_dir)
            self.assertEqual((info.num_examples, info.num_classes, info.image_shape),
                             (32, 10, (32, 32, 3)))
            batch = next(iter(data.pretraining_dataset("cifar10", data_dir=data_dir, batch_size=8,
                                                       image_size=16, shuffle_buffer=8)))
            self.assertEqual(batch["view_1"].shape, (8, 16, 16, 3))
            self.assertEqual(batch["label"].shape, (8,))
            images, labels = next(iter(data.evaluation_dataset("cifar10", "test", data_dir=data_dir,
                                                               batch_size=8, image_size=24)))
            self.assertEqual((images.shape, labels.dtype), ((8, 24, 24, 3), tf.int32))

    def test_unprepared_dataset_fails_fast_without_network(self):
        data_dir = _tempdir(self)
        with mock.patch.object(socket, "getaddrinfo", _no_network), \
                mock.patch.object(socket.socket, "connect", _no_network):
            with self.assertRaises(data.DatasetNotPreparedError) as caught:
                data.pretraining_dataset("cifar10", data_dir=data_dir, batch_size=8)
        self.assertIsInstance(caught.exception, ValueError)
        message = str(caught.exception)
        for expected in ("'cifar10'", data_dir, "tfds build cifar10", "or pass --download"):
            self.assertIn(expected, message)

    def test_unknown_name_lists_close_matches(self):
        with self.assertRaisesRegex(ValueError, "did you mean .*cifar10"):
            data.dataset_info("cifar1O")


if __name__ == "__main__":
    absltest.main()
