"""Tests for image-folder datasets: mixed formats, sizes and modes, bad files, too few images, the
held-out split of a folder without test/, unlabelled and one-class folders."""

import io
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from PIL import Image

from nnclr_tf import config, data
from nnclr_tf.data import folders, sources

_RNG = np.random.default_rng(0)


def _tempdir(test):
    """A fresh directory removed after `test` (absltest's create_tempdir needs parsed flags)."""
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path

def _image(mode, size):
    """A random PIL image of `mode` and (width, height) `size`."""
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    pixels = _RNG.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def _save(path, image, fmt):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image.save(path, fmt)


def _jpeg_bytes(size=(40, 30)):
    buffer = io.BytesIO()
    _image("RGB", size).save(buffer, "JPEG")
    return buffer.getvalue()


class FolderTest(parameterized.TestCase):

    def setUp(self):
        super().setUp()
        self.root = _tempdir(self)
        # 5 valid images over 2 classes: PNG (RGBA, L), JPEG (RGB, L), BMP, GIF; mixed sizes.
        self.valid = {
            "cat/a.png": ("RGBA", (16, 16), "PNG"), "cat/b.jpg": ("L", (33, 17), "JPEG"),
            "cat/sub/c.bmp": ("RGB", (20, 40), "BMP"), "dog/d.JPEG": ("RGB", (64, 48), "JPEG"),
            "dog/e.gif": ("L", (25, 25), "GIF"), "dog/f.png": ("L", (16, 16), "PNG"),
        }
        self.images = {}
        for name, (mode, size, fmt) in self.valid.items():
            self.images[name] = _image(mode, size)
            _save(os.path.join(self.root, name), self.images[name], fmt)
        with open(os.path.join(self.root, "dog", "truncated.jpg"), "wb") as f:
            f.write(_jpeg_bytes()[:300])
        open(os.path.join(self.root, "cat", "empty.png"), "wb").close()
        with open(os.path.join(self.root, "cat", "notes.txt"), "w") as f:
            f.write("not an image")

    def test_scan_skips_bad_files_and_reports_them(self):
        with self.assertLogs(level="WARNING") as logs:
            info = data.dataset_info(self.root, "all")
        self.assertEqual(info.num_examples, len(self.valid))
        self.assertEqual(info.class_names, ("cat", "dog"))
        self.assertEqual(info.image_shape, (None, None, 3))
        skipped = {os.path.basename(path) for path, _ in info.skipped_files}
        self.assertEqual(skipped, {"truncated.jpg", "empty.png", "notes.txt"})
        self.assertIn("Skipped 3 of 9 files", "\n".join(logs.output))

    @parameterized.parameters(3, 1)
    def test_images_decode_to_the_requested_channels(self, channels):
        images, labels = data.load_arrays(self.root, "all", image_size=16, channels=channels)
        self.assertEqual(images.shape, (len(self.valid), 16, 16, channels))
        np.testing.assert_array_equal(labels, [0, 0, 0, 1, 1, 1])
        # 16x16 PNGs pass unresized: compare with PIL's own conversion (alpha dropped, gray repeated).
        rgba = np.asarray(self.images["cat/a.png"])[..., :3]
        gray = np.asarray(self.images["dog/f.png"])
        expected = {3: (rgba, np.repeat(gray[..., None], 3, axis=-1)),
                    1: (np.asarray(self.images["cat/a.png"].convert("RGB").convert("L")),
                        gray)}[channels]
        a_index, f_index = 0, 5  # file order: cat/a.png, cat/b.jpg, cat/sub/c.bmp, dog/...
        np.testing.assert_allclose(images[a_index].reshape(expected[0].shape), expected[0],
                                   atol=1 if channels == 1 else 0)
        np.testing.assert_array_equal(images[f_index].reshape(expected[1].shape), expected[1])

    def test_pretraining_and_evaluation_on_mixed_sizes(self):
        batch = next(iter(data.pretraining_dataset(self.root, batch_size=4, image_size=16,
                                                   shuffle_buffer=8)))
        self.assertEqual(batch["view_1"].shape, (4, 16, 16, 3))
        self.assertEqual(batch["label"].dtype, tf.int32)
        images, labels = next(iter(data.evaluation_dataset(self.root, "all", batch_size=8,
                                                           image_size=12)))
        self.assertEqual(images.shape, (len(self.valid), 12, 12, 3))
        self.assertBetween(float(tf.reduce_max(images)), 0.0, 1.0)

    def test_too_few_images_for_a_batch(self):
        with self.assertRaisesRegex(ValueError, "fewer than one global batch of 16"):
            data.pretraining_dataset(self.root, batch_size=16, image_size=16)

    def test_a_folder_without_images_says_what_it_needs(self):
        empty = _tempdir(self)
        os.makedirs(os.path.join(empty, "only_class"))
        with open(os.path.join(empty, "only_class", "notes.txt"), "w") as f:
            f.write("not an image")
        for split in ("train", "test"):
            with self.assertRaises(ValueError) as caught:
                data.dataset_info(empty, split)
            message = str(caught.exception)
            self.assertIn("has no readable images (only 1 other files", message)
            self.assertIn(".jpg, .jpeg, .png, .bmp, .gif", message)
            self.assertNotIn("batch", message)

    def test_shards_split_the_files(self):
        seen = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(2, pipeline_id, 2)
            _, labels = next(iter(data.evaluation_dataset(self.root, "all", batch_size=8,
                                                          image_size=8, input_context=context)))
            seen.append(len(labels))
        self.assertEqual(seen, [3, 3])

    def test_missing_folder_and_split(self):
        with self.assertRaisesRegex(ValueError, "does not exist; pass --dataset="):
            data.dataset_info(os.path.join(self.root, "nope"))
        with self.assertRaises(ValueError) as caught:
            data.dataset_info(self.root, "unlabelled")
        self.assertIn("has no split 'unlabelled' (no sub-folder unlabelled/)", str(caught.exception))
        self.assertIn("--set data.eval_split=test", str(caught.exception))

    def test_the_bad_files_warning_comes_once_per_folder(self):
        with self.assertLogs(level="WARNING") as logs:
            for split in ("train", "test", "train", "all"):
                data.dataset_info(self.root, split)
            data.evaluation_dataset(self.root, "test", image_size=8)
        self.assertLen([line for line in logs.output if "Skipped" in line], 1)


def _colour_folder(root, counts, flat=False):
    """Writes PNG / JPEG images of mixed sizes: class c is mostly colour channel c.

    counts: {class name: number of images}; flat=True writes them all into `root` itself.
    Returns {class name: [relative paths]}.
    """
    written = {}
    for index, (name, count) in enumerate(sorted(counts.items())):
        for i in range(count):
            height, width = _RNG.integers(12, 40, 2)
            pixels = _RNG.integers(0, 60, (height, width, 3), dtype=np.uint8)
            pixels[..., index % 3] += 180
            relative = f"{name}_{i}.png" if flat else f"{name}/{i:03d}.{'png' if i % 2 else 'jpg'}"
            _save(os.path.join(root, relative), Image.fromarray(pixels), "PNG" if i % 2 or flat
                  else "JPEG")
            written.setdefault(name, []).append(relative)
    return written


class HeldOutSplitTest(parameterized.TestCase):
    """A folder of class sub-folders without test/: a per-class held-out part is its "test"."""

    def setUp(self):
        super().setUp()
        self.root = _tempdir(self)
        self.counts = {"a": 20, "b": 11, "c": 1}
        _colour_folder(self.root, self.counts)

    def _files(self, split, **kwargs):
        source = sources.resolve(self.root, split, **kwargs)
        labels = source.labels()
        scan = folders.scan_folder(self.root, split, **kwargs)
        return {os.path.relpath(p, self.root) for p in scan.paths}, labels, source.info

    @parameterized.parameters((0.1, {0: 2, 1: 1}), (0.3, {0: 6, 1: 3}))
    def test_each_class_holds_out_its_fraction_and_train_keeps_the_rest(self, fraction, held):
        test, test_labels, info = self._files("test", holdout_fraction=fraction)
        train, train_labels, _ = self._files("train", holdout_fraction=fraction)
        everything, _, _ = self._files("all", holdout_fraction=fraction)
        # Per class: round(fraction * n), at least one; the one-image class is never held out.
        self.assertEqual(dict(zip(*np.unique(test_labels, return_counts=True))), held)
        self.assertEqual(np.bincount(train_labels).tolist(),
                         [20 - held[0], 11 - held[1], 1])
        self.assertEmpty(test & train)
        self.assertEqual(test | train, everything)
        self.assertLen(everything, 32)
        self.assertEqual(info.class_names, ("a", "b", "c"))
        self.assertIn(f"{sum(held.values())} of its 32 images", info.description)
        self.assertIn(f"held out as its 'test' split and the other {32 - sum(held.values())} "
                      "are 'train'", info.description)

    def test_the_split_is_the_same_in_every_call_and_for_every_held_out_name(self):
        test, _, _ = self._files("test")
        for name in ("validation", "val", "test"):
            self.assertEqual(self._files(name)[0], test)
        # Neither the run's seed nor the folder's location matters: only file names do.
        moved = os.path.join(_tempdir(self), "moved")
        shutil.copytree(self.root, moved)
        scan = folders.scan_folder(moved, "test")
        self.assertEqual({os.path.relpath(p, moved) for p in scan.paths}, test)

    def test_a_test_sub_folder_is_used_whole(self):
        layout = _tempdir(self)
        _colour_folder(os.path.join(layout, "train"), {"a": 6, "b": 6})
        _colour_folder(os.path.join(layout, "val"), {"a": 2, "b": 3})
        self.assertEqual(data.dataset_info(layout, "train").num_examples, 12)
        for name in ("test", "validation", "val"):  # "test" finds val/
            self.assertEqual(data.dataset_info(layout, name).num_examples, 5)
        # Without val/, the held-out part comes out of train/.
        shutil.rmtree(os.path.join(layout, "val"))
        self.assertEqual((data.dataset_info(layout, "train").num_examples,
                          data.dataset_info(layout, "test").num_examples), (10, 2))

    def test_evaluation_datasets_know_their_length(self):
        for split, label_fraction, count in (("test", None, 3), ("train", None, 29),
                                             ("train", 0.5, 14)):
            ds = data.evaluation_dataset(self.root, split, batch_size=4, image_size=8,
                                         label_fraction=label_fraction)
            self.assertEqual(int(ds.cardinality()), -(-count // 4), (split, label_fraction))
            self.assertEqual(sum(len(labels) for _, labels in ds), count)

    def test_an_image_that_fails_to_decode_does_not_stop_an_evaluation(self):
        # Looks complete to the scan (signature and IEND) but holds no image.
        with open(os.path.join(self.root, "b", "zz.png"), "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\n" + b"\x07" * 64 + b"IEND\xaeB`\x82")
        train, labels, _ = self._files("train")
        self.assertIn("b/zz.png", train)
        ds = data.evaluation_dataset(self.root, "train", batch_size=8, image_size=8)
        self.assertEqual(int(ds.cardinality()), 4)
        seen = np.concatenate([batch.numpy() for _, batch in ds])
        self.assertLen(seen, len(labels))  # the length it states, one image read twice
        self.assertEqual(np.bincount(seen).tolist(), [19, 10, 1])  # 18 + 1 a again, 11 - 1 b, 1 c

    def test_a_small_label_fraction_keeps_one_image_per_class_and_says_so(self):
        with self.assertLogs(level="WARNING") as logs:
            ds = data.evaluation_dataset(self.root, "train", batch_size=8, image_size=8,
                                         label_fraction=0.01)
        labels = np.concatenate([batch.numpy() for _, batch in ds])
        self.assertEqual(sorted(labels.tolist()), [0, 1, 2])
        self.assertIn("eval.label_fraction=0.01 of 29 labelled images selects 0, fewer than one per "
                      "class: using one image of each of the 3 classes", "\n".join(logs.output))

    def test_a_flat_folder_is_unlabelled_and_has_no_test_split(self):
        flat = _tempdir(self)
        _colour_folder(flat, {"x": 6, "y": 4}, flat=True)
        info = data.dataset_info(flat, "train")
        self.assertEqual((info.num_examples, info.num_classes, info.has_labels), (10, 0, False))
        self.assertIn("no class sub-folders: its 10 images are unlabelled, so there are no kNN or "
                      "linear-probe scores", info.description)
        batch = next(iter(data.pretraining_dataset(flat, batch_size=4, image_size=8)))
        self.assertEqual(set(batch), {"view_1", "view_2"})
        with self.assertRaisesRegex(ValueError, "has no class sub-folders, so its images are "
                                                "unlabelled and it has no labelled split 'test'"):
            data.dataset_info(flat, "test")

    def test_one_class_warns_once_that_scores_mean_nothing(self):
        single = _tempdir(self)
        _colour_folder(single, {"cats": 8})
        with self.assertLogs(level="WARNING") as logs:
            for split in ("train", "test", "train"):
                info = data.dataset_info(single, split)
        warnings = [line for line in logs.output if "one class only ('cats')" in line]
        self.assertLen(warnings, 1)
        self.assertIn("meaningless", warnings[0])
        self.assertIn("one class only", info.description)

    def test_the_holdout_fraction_is_checked_and_the_config_default_matches(self):
        with self.assertRaisesRegex(ValueError, "holdout_fraction must be in \\(0, 1\\)"):
            data.dataset_info(self.root, "test", holdout_fraction=1.0)
        self.assertEqual(config.DataConfig().holdout_fraction, folders.DEFAULT_HOLDOUT_FRACTION)
        with self.assertRaisesRegex(config.ConfigError, "--set data.holdout_fraction=0.1"):
            config.override(config.get_preset("tiny"), {"data.holdout_fraction": "0"})


if __name__ == "__main__":
    absltest.main()
