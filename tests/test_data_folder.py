"""Tests for image-folder datasets: mixed formats, sizes and modes, bad files, too few images."""

import io
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from PIL import Image

from nnclr_tf import data

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
            info = data.dataset_info(self.root)
        self.assertEqual(info.num_examples, len(self.valid))
        self.assertEqual(info.class_names, ("cat", "dog"))
        self.assertEqual(info.image_shape, (None, None, 3))
        skipped = {os.path.basename(path) for path, _ in info.skipped_files}
        self.assertEqual(skipped, {"truncated.jpg", "empty.png", "notes.txt"})
        self.assertIn("Skipped 3 of 9 files", "\n".join(logs.output))

    @parameterized.parameters(3, 1)
    def test_images_decode_to_the_requested_channels(self, channels):
        images, labels = data.load_arrays(self.root, "train", image_size=16, channels=channels)
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
        images, labels = next(iter(data.evaluation_dataset(self.root, "train", batch_size=8,
                                                           image_size=12)))
        self.assertEqual(images.shape, (len(self.valid), 12, 12, 3))
        self.assertBetween(float(tf.reduce_max(images)), 0.0, 1.0)

    def test_too_few_images_for_a_batch(self):
        with self.assertRaisesRegex(ValueError, "fewer than one global batch of 16"):
            data.pretraining_dataset(self.root, batch_size=16, image_size=16)
        empty = _tempdir(self)
        os.makedirs(os.path.join(empty, "only_class"))
        with self.assertRaisesRegex(ValueError, "has no images"):
            data.pretraining_dataset(empty, batch_size=4, image_size=16)

    def test_shards_split_the_files(self):
        seen = []
        for pipeline_id in range(2):
            context = tf.distribute.InputContext(2, pipeline_id, 2)
            _, labels = next(iter(data.evaluation_dataset(self.root, "train", batch_size=8,
                                                          image_size=8, input_context=context)))
            seen.append(len(labels))
        self.assertEqual(seen, [3, 3])

    def test_missing_folder_and_split(self):
        with self.assertRaisesRegex(ValueError, "does not exist"):
            data.dataset_info(os.path.join(self.root, "nope"))
        with self.assertRaisesRegex(ValueError, "no sub-folder 'test'"):
            data.dataset_info(self.root, "test")


if __name__ == "__main__":
    absltest.main()
