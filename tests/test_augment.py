"""Tests for nnclr_tf.augment: per-image randomness, ranges, rates, NumPy references, saving."""

import itertools
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized
from matplotlib.colors import hsv_to_rgb, rgb_to_hsv

from nnclr_tf import augment
from nnclr_tf.augment import (VIEW_PRESETS, ColorJitter, GaussianBlur, HorizontalFlip, RandomApply,
                              RandomResizedCrop, Solarize, view_augmenter)

N = 2000  # samples for rates: 4 binomial sigmas at p=0.5 are 0.045


def within_sigmas(count, n, p, sigmas=4.0):
    return abs(count - n * p) <= sigmas * np.sqrt(n * p * (1 - p)) + 1e-9


def map_single_images(layer, images):
    """Runs `layer` on each image alone in a parallel tf.data.map; returns the stacked outputs."""
    ds = tf.data.Dataset.from_tensor_slices(images).map(layer, num_parallel_calls=tf.data.AUTOTUNE)
    return np.stack(list(ds.as_numpy_iterator()))


def distinct(images):
    return len({np.asarray(x).round(5).tobytes() for x in images})


def coordinate_images(batch, size):
    """[batch, size, size, 2]: channel 0 is the row, channel 1 the column, both scaled to [0, 1]."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    grid = np.stack(np.meshgrid(ramp, ramp, indexing="ij"), axis=-1)
    return np.repeat(grid[None], batch, axis=0)


class CountingIdentity(keras.layers.Layer):
    """Identity that counts the images passed through it (to measure how often a stage runs)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        with tf.init_scope():
            self.count = tf.Variable(0, dtype=tf.int64, trainable=False)

    def call(self, images):
        self.count.assign_add(tf.cast(tf.shape(images)[0], tf.int64))
        return tf.identity(images)


class ViewPipelineTest(parameterized.TestCase):

    @parameterized.parameters(itertools.product(sorted(VIEW_PRESETS), (1, 2), (1, 3)))
    def test_shapes_dtype_range(self, preset, view, channels):
        layer = view_augmenter(view, 12, preset=preset, channels=channels, seed=view)
        images = np.random.default_rng(0).random((16, 20, 20, channels), dtype=np.float32)
        batch = layer(images)
        single = layer(images[0])
        self.assertEqual(tuple(batch.shape), (16, 12, 12, channels))
        self.assertEqual(tuple(single.shape), (12, 12, channels))
        for out in (batch, single):
            self.assertEqual(out.dtype, tf.float32)
            self.assertGreaterEqual(float(tf.reduce_min(out)), 0.0)
            self.assertLessEqual(float(tf.reduce_max(out)), 1.0)
        self.assertEqual(layer.compute_output_shape((None, 20, 20, channels)),
                         (None, 12, 12, channels))

    @parameterized.parameters(itertools.product(sorted(VIEW_PRESETS), (1, 2)))
    def test_identical_images_give_different_views(self, preset, view):
        layer = view_augmenter(view, 12, preset=preset)
        image = np.random.default_rng(1).random((16, 16, 3), dtype=np.float32)
        images = np.repeat(image[None], 16, axis=0)
        self.assertEqual(distinct(layer(images)), 16)
        self.assertEqual(distinct(map_single_images(layer, images)), 16)

    def test_presets_are_the_papers(self):
        common = {"flip": 0.5, "color_jitter": 0.8, "grayscale": 0.2}
        self.assertEqual(VIEW_PRESETS["byol"][1], {**common, "blur": 1.0, "solarize": 0.0})
        self.assertEqual(VIEW_PRESETS["byol"][2], {**common, "blur": 0.1, "solarize": 0.2})
        self.assertEqual(VIEW_PRESETS["cifar"][1], {**common, "blur": 0.0, "solarize": 0.0})
        self.assertEqual(VIEW_PRESETS["cifar"][2], {**common, "blur": 0.0, "solarize": 0.2})
        self.assertEqual(VIEW_PRESETS["crops"], {1: {"flip": 0.5}, 2: {"flip": 0.5}})
        self.assertEqual(augment.JITTER,
                         {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1})
        blur = view_augmenter(1, 224).stage("blur").layer
        self.assertEqual((blur.kernel_size, blur.sigma), (23, (0.1, 2.0)))  # ~10 % of 224
        self.assertEqual(view_augmenter(1, 32).stage("blur").layer.kernel_size, 3)
        self.assertEqual(view_augmenter(2, 32).stage("solarize").layer.threshold, 0.5)

    @parameterized.parameters(itertools.product(sorted(VIEW_PRESETS), (1, 2), (1, 3)))
    def test_stage_probabilities_follow_preset(self, preset, view, channels):
        layer = view_augmenter(view, 12, preset=preset, channels=channels)
        for name in ("flip", "color_jitter", "grayscale", "blur", "solarize"):
            expected = VIEW_PRESETS[preset][view].get(name, 0.0)
            if channels == 1 and name == "grayscale":
                expected = 0.0  # no colour to remove
            stage = layer.stage(name)
            self.assertEqual(0.0 if stage is None else stage.probability, expected, name)

    @parameterized.parameters(("byol", 1, False), ("byol", 2, False), ("byol", 2, True),
                              ("cifar", 2, True))
    def test_composed_pipeline_stage_rates(self, preset, view, single_images):
        # Each random stage's layer is swapped for a counting identity: the count is how many
        # images that stage was applied to, measured through the whole composed pipeline.
        layer = view_augmenter(view, 8, preset=preset, seed=11)  # seeded: no flaky rates
        counters = {}
        for stage in layer.stages[1:]:
            stage.layer = counters[stage.name] = CountingIdentity()
        n = N if not single_images else 800
        images = np.full((n, 8, 8, 3), 0.5, np.float32)
        if single_images:
            map_single_images(layer, images)
        else:
            layer(images)
        for name, counter in counters.items():
            p = VIEW_PRESETS[preset][view][name]
            self.assertTrue(within_sigmas(int(counter.count.numpy()), n, p),
                            f"{name}: {int(counter.count.numpy())} of {n}, expected p={p}")

    @parameterized.parameters(False, True)
    def test_grayscale_rate_end_to_end(self, single_images):
        # A constant colour keeps its channels apart under crop, flip, jitter (saturation >= 0.8)
        # and blur; only the grayscale stage makes them equal.
        layer = view_augmenter(1, 8, preset="byol", seed=12)
        n = N if not single_images else 800
        images = np.tile(np.float32([0.2, 0.5, 0.8]), (n, 8, 8, 1))
        out = map_single_images(layer, images) if single_images else layer(images).numpy()
        grey = np.all(np.ptp(out, axis=-1) < 1e-5, axis=(1, 2))
        self.assertTrue(within_sigmas(grey.sum(), n, 0.2), f"{grey.sum()} of {n} grey")

    @parameterized.parameters(1, 2)
    def test_crops_preset_keeps_colours(self, view):
        layer = view_augmenter(view, 8, preset="crops")
        colour = np.float32([0.2, 0.5, 0.8])
        images = np.tile(colour, (32, 10, 10, 1))
        for out in (layer(images).numpy(), map_single_images(layer, images[:8])):
            np.testing.assert_allclose(out, np.broadcast_to(colour, out.shape), atol=1e-6)

    def test_same_seed_for_both_views_gives_different_views(self):
        images = np.random.default_rng(2).random((4, 16, 16, 3), dtype=np.float32)
        view_1 = view_augmenter(1, 8, preset="crops", seed=3)(images)
        view_2 = view_augmenter(2, 8, preset="crops", seed=3)(images)
        again = view_augmenter(1, 8, preset="crops", seed=3)(images)
        self.assertFalse(np.allclose(view_1, view_2))
        np.testing.assert_array_equal(view_1, again)

    def test_inference_resizes_without_augmenting(self):
        images = np.random.default_rng(3).random((2, 8, 8, 3), dtype=np.float32)
        out = view_augmenter(2, 8, preset="byol")(images, training=False)
        np.testing.assert_allclose(out, images, atol=1e-6)

    @parameterized.named_parameters(
        ("preset", dict(preset="simclr"), "simclr"),
        ("view", dict(view=3), "view=3"),
        ("size", dict(image_size=0), "image_size=0"),
        ("size_type", dict(image_size=32.5), "image_size=32.5"),
        ("channels", dict(channels=2), "channels=2"),
        ("scale", dict(crop_scale=(0.5, 0.1)), "(0.5, 0.1)"),
        ("strength", dict(color_strength=-1.0), "color_strength=-1.0"))
    def test_bad_arguments(self, override, fragment):
        kwargs = {"view": 1, "image_size": 32, **override}
        with self.assertRaisesRegex(ValueError, fragment.replace("(", r"\(").replace(")", r"\)")):
            view_augmenter(**kwargs)

    def test_channel_mismatch(self):
        with self.assertRaisesRegex(ValueError, "channels=3"):
            view_augmenter(1, 8)(np.zeros((2, 8, 8, 1), np.float32))


class LayersTest(parameterized.TestCase):

    @parameterized.parameters(0.1, 0.2, 0.5, 0.8)
    def test_random_apply_rate_per_image(self, probability):
        for single_images in (False, True):
            counter = CountingIdentity()
            layer = RandomApply(counter, probability, seed=13)
            n = N if not single_images else 800
            images = np.zeros((n, 2, 2, 1), np.float32)
            out = map_single_images(layer, images) if single_images else layer(images)
            count = int(counter.count.numpy())
            self.assertTrue(within_sigmas(count, n, probability), f"{count} of {n}")
            np.testing.assert_array_equal(out, images)  # stitched back in order

    def test_random_apply_selects_per_image_in_order(self):
        images = np.arange(64, dtype=np.float32).reshape(64, 1, 1, 1) / 64
        out = RandomApply(Solarize(0.0), 0.5)(images).numpy()  # threshold 0: every pixel inverts
        applied = np.isclose(out, 1 - images)[:, 0, 0, 0]
        self.assertTrue(np.all(applied | np.isclose(out, images)[:, 0, 0, 0]))
        self.assertTrue(0 < applied.sum() < 64)

    def test_resized_crop_boxes_within_bounds(self):
        scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
        layer = RandomResizedCrop(8, scale, ratio)
        boxes = layer.sample_boxes(tf.zeros([4000, 32, 48, 1])).numpy()
        heights, widths = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        area, aspect = heights * widths, widths * 48 / (heights * 32)
        self.assertTrue(np.all(boxes >= -1e-6) and np.all(boxes <= 1 + 1e-6))
        self.assertTrue(np.all((area >= scale[0] - 1e-5) & (area <= scale[1] + 1e-5)))
        self.assertTrue(np.all((aspect >= ratio[0] - 1e-4) & (aspect <= ratio[1] + 1e-4)))
        # Spread over the range (not one box per batch): small and large crops, many offsets.
        self.assertLess(area.min(), 0.1)
        self.assertGreater(area.max(), 0.85)  # at most 8/9 at aspect <= 4/3 in a 3:2 image
        self.assertGreater(len(np.unique(boxes[:, 1].round(6))), 3900)
        # Log-aspect is uniform and symmetric on a square image; a 3:2 image rejects more tall
        # boxes, so it is checked only there. The median of 4000 draws has a std of ~0.007.
        square = RandomResizedCrop(8, scale, ratio, seed=3).sample_boxes(tf.zeros([4000, 32, 32, 1]))
        square = square.numpy()
        square_aspect = (square[:, 3] - square[:, 1]) / (square[:, 2] - square[:, 0])
        self.assertLess(abs(np.median(np.log(square_aspect))), 0.04)

    def test_resized_crop_fallback_is_centre_crop(self):
        # At scale 1 no box of aspect within 3/4..4/3 fits a 32x48 image: centre crop at 4/3.
        boxes = RandomResizedCrop(8, (1.0, 1.0)).sample_boxes(tf.zeros([3, 32, 48, 1])).numpy()
        width = (4 / 3) * 32 / 48
        np.testing.assert_allclose(boxes, np.tile([0, (1 - width) / 2, 1, (1 + width) / 2],
                                                  (3, 1)), atol=1e-6)

    @parameterized.parameters(False, True)
    def test_resized_crop_call_areas(self, single_images):
        # On coordinate images a crop's corners read back its box, through the real call path.
        scale = (0.2, 0.6)
        layer = RandomResizedCrop(6, scale)
        images = coordinate_images(N if not single_images else 300, 16)
        out = map_single_images(layer, images) if single_images else layer(images).numpy()
        heights = out[:, -1, 0, 0] - out[:, 0, 0, 0]
        widths = out[:, 0, -1, 1] - out[:, 0, 0, 1]
        area = heights * widths
        self.assertTrue(np.all((area >= scale[0] - 1e-4) & (area <= scale[1] + 1e-4)))
        aspect = widths / heights
        self.assertTrue(np.all((aspect >= 0.75 - 1e-3) & (aspect <= 4 / 3 + 1e-3)))
        self.assertGreater(distinct(out), 0.95 * len(out))

    def test_gaussian_blur_matches_numpy(self):
        sigma, kernel_size = 1.3, 5
        images = np.random.default_rng(4).random((3, 9, 7, 2), dtype=np.float32)
        out = GaussianBlur(kernel_size, (sigma, sigma))(images).numpy()
        taps = np.arange(kernel_size) - kernel_size // 2
        kernel = np.exp(-taps ** 2 / (2 * sigma ** 2))
        kernel /= kernel.sum()
        padded = np.pad(images, [(0, 0), (2, 2), (2, 2), (0, 0)], mode="symmetric")
        rows = sum(kernel[k] * padded[:, k:k + 9] for k in range(kernel_size))
        expected = sum(kernel[k] * rows[:, :, k:k + 7] for k in range(kernel_size))
        np.testing.assert_allclose(out, expected, atol=1e-5)

    def test_gaussian_blur_sigma_per_image(self):
        images = np.tile(np.float32([0.0, 1.0] * 4), (64, 8, 1))[..., None]  # stripes
        out = GaussianBlur(5, (0.5, 2.0))(images).numpy()
        self.assertGreater(len(np.unique(out[:, 0, 0, 0].round(5))), 60)

    @parameterized.parameters((1, 224), (2, 224), (1, 32))
    def test_view_blur_sigma_is_uniform_in_byol_range(self, view, image_size):
        # The views' blur stage on impulses: each output is kernel x kernel^T, so the ratio of the
        # centre to its neighbour gives the image's sigma (k0 / k1 = exp(1 / (2 sigma^2))). The
        # sigmas must fill BYOL's [0.1, 2.0] uniformly (Kolmogorov-Smirnov at p = 1e-4), and
        # each output must equal NumPy's normalised Gaussian of that sigma.
        blur = view_augmenter(view, image_size, seed=21).stage("blur").layer
        radius, n, side = blur.kernel_size // 2, 2000, 2 * blur.kernel_size + 1
        centre = side // 2
        impulses = np.zeros((n, side, side, 1), np.float32)
        impulses[:, centre, centre] = 1.0
        out = blur(impulses).numpy()[..., 0].astype(np.float64)
        sigma = np.sqrt(0.5 / np.log(out[:, centre, centre] / out[:, centre, centre + 1]))

        low, high = 0.1, 2.0
        self.assertTrue(np.all((sigma > low - 1e-3) & (sigma < high + 1e-3)),
                        (sigma.min(), sigma.max()))
        uniform = np.sort((sigma - low) / (high - low))
        ks = np.max(np.maximum(np.arange(1, n + 1) / n - uniform, uniform - np.arange(n) / n))
        self.assertLess(ks, np.sqrt(np.log(2 / 1e-4) / 2) / np.sqrt(n), (sigma.min(), sigma.max()))

        taps = np.arange(-radius, radius + 1)
        for i in range(0, n, 97):
            kernel = np.exp(-taps ** 2 / (2 * sigma[i] ** 2))
            kernel /= kernel.sum()
            expected = np.zeros((side, side))
            expected[centre - radius:centre + radius + 1, centre - radius:centre + radius + 1] = (
                np.outer(kernel, kernel))
            np.testing.assert_allclose(out[i], expected, atol=1e-6, err_msg=f"sigma {sigma[i]}")

    def test_solarize_and_flip(self):
        images = np.random.default_rng(5).random((2, 4, 5, 3), dtype=np.float32)
        np.testing.assert_allclose(Solarize(0.5)(images),
                                   np.where(images < 0.5, images, 1 - images))
        np.testing.assert_array_equal(HorizontalFlip()(images), images[:, :, ::-1])

    def test_color_jitter_orders_are_per_image_permutations(self):
        jitter = ColorJitter(seed=14)
        self.assertEqual(jitter.active_ops(3), ["brightness", "contrast", "saturation", "hue"])
        self.assertEqual(jitter.active_ops(1), ["brightness", "contrast"])
        factors, order = jitter.sample(tf.zeros([N, 2, 2, 3]))
        order = order.numpy()
        np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (N, 1)))
        counts = np.unique(order, axis=0, return_counts=True)[1]
        self.assertEqual(len(counts), 24)
        self.assertGreater(counts.min(), N / 24 / 2)
        for f, (low, high) in zip(factors, [(-0.4, 0.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1)]):
            f = f.numpy().ravel()
            self.assertTrue(low <= f.min() < low + 0.05 and high - 0.05 < f.max() <= high)

    @parameterized.parameters(1, 5)
    def test_color_jitter_matches_numpy(self, batch):
        # batch=1 takes the single-image (switch_case) path, batch=5 the partitioned one.
        jitter = ColorJitter()
        images = np.random.default_rng(6).random((batch, 4, 4, 3), dtype=np.float32)
        factors, order = jitter.sample(tf.constant(images))
        out = jitter.apply(tf.constant(images), factors, order).numpy()
        factors = [f.numpy().reshape(-1) for f in factors]
        for b in range(batch):
            x = images[b].astype(np.float64)
            for op in order[b].numpy():
                f = factors[op][b]
                if op == 0:
                    x = x + f
                elif op == 1:
                    x = (x - x.mean((0, 1))) * f + x.mean((0, 1))
                elif op == 2:
                    grey = (x @ np.array([0.2989, 0.587, 0.114]))[..., None]
                    x = grey + (x - grey) * f
                else:
                    hsv = rgb_to_hsv(x)
                    hsv[..., 0] = (hsv[..., 0] + f) % 1.0
                    x = hsv_to_rgb(hsv)
                x = np.clip(x, 0, 1)
            np.testing.assert_allclose(out[b], x, atol=2e-5)

    def test_color_jitter_grayscale_images(self):
        images = np.random.default_rng(7).random((16, 4, 4, 1), dtype=np.float32)
        out = ColorJitter()(images).numpy()
        self.assertEqual(out.shape, images.shape)
        self.assertTrue(np.all((out >= 0) & (out <= 1)))
        self.assertEqual(distinct(out), 16)


class SerializationTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("crop", lambda: RandomResizedCrop(6, (0.3, 0.9), seed=1)),
        ("apply", lambda: RandomApply(GaussianBlur(3, seed=2), 0.4, seed=3)),
        ("apply_keras", lambda: RandomApply(keras.layers.RandomGrayscale(1.0), 0.5, seed=4)),
        ("flip", lambda: HorizontalFlip(seed=5)),
        ("solarize", lambda: Solarize(0.4, seed=6)),
        ("blur", lambda: GaussianBlur(5, (0.2, 1.5), seed=7)),
        ("jitter", lambda: ColorJitter(0.2, 0.3, 0.1, 0.05, seed=8)),
        ("view", lambda: view_augmenter(2, 6, preset="byol", crop_scale=(0.2, 1.0), seed=9)))
    def test_round_trip(self, make):
        layer = make()
        restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
        self.assertIs(type(restored), type(layer))
        self.assertEqual(restored.get_config(), layer.get_config())
        images = np.random.default_rng(8).random((4, 8, 8, 3), dtype=np.float32)
        # Same seed, fresh generators: the restored layer draws the same views.
        np.testing.assert_allclose(restored(images), make()(images), atol=1e-6)

    def test_keras_file_round_trip(self):
        model = keras.Sequential([keras.Input((10, 10, 3)),
                                  view_augmenter(1, 6, preset="cifar", seed=1)])
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "augmenter.keras")
            model.save(path)
            restored = keras.saving.load_model(path)  # safe_mode: registered classes only
        self.assertIsInstance(restored.layers[0], augment.ViewAugmenter)
        self.assertEqual(restored.layers[0].get_config(), model.layers[0].get_config())
        self.assertEqual(tuple(restored(np.zeros((2, 10, 10, 3), np.float32)).shape), (2, 6, 6, 3))


if __name__ == "__main__":
    absltest.main()
