"""Training views of JPEG sources decode only their crops (tf.image.decode_and_crop_jpeg): the crops
equal the whole image's, the windows follow the random resized crop's distribution, the views equal
the whole-image path's, and other formats keep that path."""

import math
import os
import shutil
import tempfile

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl.testing import absltest, parameterized

from nnclr_tf import augment
from nnclr_tf.data import jpeg, pretraining_dataset, sources

_RNG = np.random.default_rng(0)


def _tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, True)
    return path


def _pixels(height, width, rng=_RNG):
    """A smooth random image with noise (JPEG-compressible, detail everywhere), uint8."""
    x = np.cumsum(np.cumsum(rng.normal(size=(height, width, 3)), 0), 1)
    x = (x - x.min()) / (x.max() - x.min()) * 230 + rng.normal(0, 8, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def _jpeg(pixels, chroma_downsampling=True, quality=90):
    return tf.io.encode_jpeg(pixels, quality=quality, chroma_downsampling=chroma_downsampling)


def _write_folder(root, extension, sizes):
    for index, (height, width) in enumerate(sizes):
        folder = os.path.join(root, "ab"[index % 2])
        os.makedirs(folder, exist_ok=True)
        image = _pixels(height, width)
        encoded = tf.io.encode_png(image) if extension == ".png" else _jpeg(image)
        tf.io.write_file(os.path.join(folder, f"{index}{extension}"), encoded)


def _ks_p_value(a, b):
    """Two-sample Kolmogorov-Smirnov test: (D, asymptotic p-value), as in Numerical Recipes."""
    a, b = np.sort(a), np.sort(b)
    both = np.concatenate([a, b])
    d = np.max(np.abs(np.searchsorted(a, both, side="right") / len(a)
                      - np.searchsorted(b, both, side="right") / len(b)))
    n = math.sqrt(len(a) * len(b) / (len(a) + len(b)))
    lam = (n + 0.12 + 0.11 / n) * d
    p = 2 * sum((-1) ** (k - 1) * math.exp(-2 * k * k * lam * lam) for k in range(1, 101))
    return d, min(max(p, 0.0), 1.0)


def _reference_boxes(count, height, width, scale, ratio, rng, attempts=10):
    """Inception-style random resized crop (torchvision's RandomResizedCrop.get_params, without
    rounding to pixels): (area fraction, width / height) of `count` crops."""
    areas, aspects = [], []
    for _ in range(count):
        for _ in range(attempts):
            area = rng.uniform(*scale)
            aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
            w, h = math.sqrt(area * aspect * height / width), math.sqrt(area / aspect * width / height)
            if w <= 1 and h <= 1:
                break
        else:  # centre crop, the aspect clamped to the ratio range
            w = min(1.0, ratio[1] * height / width)
            h = min(1.0, width / height / ratio[0])
        areas.append(w * h)
        aspects.append(w * width / (h * height))
    return np.array(areas), np.array(aspects)


class DecodeCropsTest(parameterized.TestCase):

    @parameterized.parameters(False, True)
    def test_crop_equals_whole_image_cut_to_the_window(self, union):
        """4:4:4 JPEGs: bit-identical. 4:2:0 (the usual): the chroma upsampling at a window's left
        and right edge sees no neighbour, so its first and last columns may differ (measured here:
        up to 11 of 255 levels, 0.2 % of a window's pixels); every other pixel is identical."""
        rng = np.random.default_rng(1)
        for subsampled in (False, True):
            for height, width in ((375, 500), (37, 61), (16, 16)):
                data = _jpeg(_pixels(height, width, rng), chroma_downsampling=subsampled)
                whole = tf.image.decode_jpeg(data, channels=3).numpy().astype(int)
                windows = []
                for _ in range(8):
                    h, w = rng.integers(1, height + 1), rng.integers(1, width + 1)
                    top, left = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
                    windows.append(tf.constant([top, left, h, w], tf.int32))
                for first, second in zip(windows[::2], windows[1::2]):
                    pairs = jpeg.decode_crops(data, lambda _: [(first, 1), (second, 2)],
                                              union=union)
                    self.assertEqual([extra for _, extra in pairs], [1, 2])
                    for (crop, _), window in zip(pairs, (first, second)):
                        top, left, h, w = window.numpy()
                        expected = whole[top:top + h, left:left + w]
                        crop = crop.numpy().astype(int)
                        self.assertEqual(crop.shape, expected.shape)
                        if subsampled:  # edge columns: only within JPEG's rounding of chroma
                            crop, expected = crop[:, 1:-1], expected[:, 1:-1]
                        np.testing.assert_array_equal(crop, expected)

    def test_png_bytes_are_decoded_whole_and_cut(self):
        image = _pixels(20, 30)
        window = tf.constant([3, 5, 10, 7])
        [(crop, _)] = jpeg.decode_crops(tf.io.encode_png(image), lambda _: [(window, None)])
        np.testing.assert_array_equal(crop.numpy(), image[3:13, 5:12])


class CropWindowTest(parameterized.TestCase):

    def test_window_holds_the_drawn_box_and_reproduces_its_view(self):
        """Cropping the returned box from the window's pixels gives the whole image's view."""
        view = augment.view_augmenter(2, 24, preset="byol")
        worst = 0.0
        for index in range(12):
            height, width = _RNG.integers(1, 90, 2)
            image = tf.constant(_pixels(height, width))
            seed = tf.constant([index, 3])
            window, box = view.crop_window(tf.shape(image), seed=seed)
            top, left, h, w = window.numpy()
            self.assertTrue(0 <= top and top + h <= height and 0 <= left and left + w <= width)
            part = image[top:top + h, left:left + w]
            got = view(part, seed=seed, crop_box=box)
            worst = max(worst, float(tf.reduce_max(tf.abs(got - view(image, seed=seed)))))
        self.assertLess(worst, 1e-4)

    def test_window_distribution_is_the_random_resized_crop(self):
        """Area fraction and aspect of the sampled region, against an independent NumPy
        Inception-style crop (KS test); the same test rejects the crop of other parameters."""
        height, width, count = 375, 500, 3000
        view = augment.view_augmenter(1, 224, preset="crops")

        def region(index):
            window, box = view.crop_window([height, width], seed=tf.stack([index, 7]))
            start = tf.cast(window[:2], tf.float32)
            span = tf.cast(window[2:] - 1, tf.float32)
            first, last = start + box[:2] * span, start + box[2:] * span  # pixel coordinates
            return tf.concat([first, last], 0), tf.cast(window, tf.float32)

        regions, windows = next(iter(tf.data.Dataset.range(count).map(region).batch(count)))
        regions, windows = regions.numpy(), windows.numpy()
        h = (regions[:, 2] - regions[:, 0]) / (height - 1)
        w = (regions[:, 3] - regions[:, 1]) / (width - 1)
        area, aspect = w * h, (w * width) / (h * height)
        # The decoded window is the region's pixels plus one each side.
        self.assertTrue(np.all(windows[:, 2] <= regions[:, 2] - regions[:, 0] + 5))
        self.assertTrue(np.all(windows[:, 3] <= regions[:, 3] - regions[:, 1] + 5))
        rng = np.random.default_rng(5)
        ref_area, ref_aspect = _reference_boxes(count, height, width, (0.08, 1.0), (3 / 4, 4 / 3),
                                                rng)
        for got, expected in ((area, ref_area), (np.log(aspect), np.log(ref_aspect))):
            _, p = _ks_p_value(got, expected)
            self.assertGreater(p, 1e-3)
        wrong_area, wrong_aspect = _reference_boxes(count, height, width, (0.2, 1.0), (0.6, 1.6),
                                                    rng)
        self.assertLess(_ks_p_value(area, wrong_area)[1], 1e-6)
        self.assertLess(_ks_p_value(np.log(aspect), np.log(wrong_aspect))[1], 1e-6)


class NnclrTestJpegImages(tfds.core.GeneratorBasedBuilder):
    """Eight JPEG-stored images of varying size, two classes: a TFDS dataset like imagenet2012."""
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(names=["a", "b"])}))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        rng = np.random.default_rng(2)
        for index in range(8):
            yield index, {"image": _pixels(*rng.integers(30, 70, 2), rng), "label": index % 2}


class PipelineTest(parameterized.TestCase):

    def _views(self, dataset, jpeg_decode, batches=3, **kwargs):
        # "crops" (crop and flip) is the cheapest preset to trace; the flip checks that the later
        # stages get the seeds they get on the whole image.
        ds = pretraining_dataset(dataset, batch_size=4, image_size=24, augment="crops",
                                 shuffle_buffer=4, jpeg_decode=jpeg_decode, **kwargs)
        return [batch for _, batch in zip(range(batches), ds)]

    def _assert_same_views(self, dataset, mode, **kwargs):
        full = self._views(dataset, "full", **kwargs)
        for got, expected in zip(self._views(dataset, mode, **kwargs), full):
            self.assertEqual(got["view_1"].shape, (4, 24, 24, 3))
            self.assertEqual(got["view_1"].dtype, tf.float32)
            np.testing.assert_array_equal(got["label"], expected["label"])
            for name in ("view_1", "view_2"):
                np.testing.assert_allclose(got[name], expected[name], atol=1e-5)
        # Not a test that passes on anything: the two views differ.
        self.assertGreater(float(tf.reduce_max(tf.abs(full[0]["view_1"] - full[0]["view_2"]))), 0.1)

    def test_jpeg_folder_views_equal_whole_image_views(self):
        root = _tempdir(self)
        _write_folder(root, ".jpg", [tuple(s) for s in _RNG.integers(30, 80, (8, 2))])
        self.assertIsNotNone(sources.resolve(root).decode_crops)
        self._assert_same_views(root, "crops")

    def test_a_resumed_stream_continues_the_uninterrupted_one(self):
        root = _tempdir(self)
        _write_folder(root, ".jpg", [tuple(s) for s in _RNG.integers(30, 80, (10, 2))])
        whole = self._views(root, "union", batches=4)
        resumed = self._views(root, "union", batches=2, initial_step=2)
        for got, expected in zip(resumed, whole[2:]):
            for name in ("view_1", "view_2", "label"):
                np.testing.assert_array_equal(got[name], expected[name])

    def test_tfds_jpeg_dataset_views_equal_whole_image_views(self):
        data_dir = _tempdir(self)
        NnclrTestJpegImages(data_dir=data_dir).download_and_prepare()
        self.assertIsNotNone(sources.resolve("nnclr_test_jpeg_images", data_dir=data_dir).decode_crops)
        self._assert_same_views("nnclr_test_jpeg_images", "union", data_dir=data_dir)

    @parameterized.parameters(".png", "mixed")
    def test_png_and_mixed_folders_keep_the_whole_image_path(self, kind):
        root = _tempdir(self)
        _write_folder(root, ".png", [tuple(s) for s in _RNG.integers(30, 60, (8, 2))])
        if kind == "mixed":
            _write_folder(os.path.join(root, "more"), ".jpg", [(40, 50), (45, 31)])
        self.assertIsNone(sources.resolve(root).decode_crops)
        [batch] = self._views(root, "union", batches=1)
        self.assertEqual(batch["view_1"].shape, (4, 24, 24, 3))
        self.assertBetween(float(tf.reduce_min(batch["view_1"])), 0.0, 1.0)
        self.assertBetween(float(tf.reduce_max(batch["view_1"])), 0.0, 1.0)
        self.assertGreater(float(tf.math.reduce_std(batch["view_1"])), 0.02)

    def test_jpeg_decode_is_checked(self):
        with self.assertRaisesRegex(ValueError, "jpeg_decode must be one of"):
            pretraining_dataset("embedded", jpeg_decode="crop")


if __name__ == "__main__":
    absltest.main()
