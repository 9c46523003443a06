"""Tests for nnclr_tf.pictures: PNGs are valid images and the neighbour search is exact."""

import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized
from PIL import Image

from conftest import tiny_encoder as shared_tiny_encoder
from nnclr_tf import pictures

CELL_PIXELS = int(pictures.GRID_CELL_INCHES * pictures.GRID_DPI)


def make_tempdir(test):
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def read_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def red_mask(pixels):
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    return (r > 180) & (g < 80) & (b < 80)


def tiny_encoder(channels=1):
    """[batch, 8, 8, channels] float [0, 1] -> [batch, 8]: the shared tiny encoder, seeded."""
    keras.utils.set_random_seed(0)
    return shared_tiny_encoder((8, 8, channels), width=4)


class TrainingCurvesTest(parameterized.TestCase):
    def test_one_subplot_per_metric(self):
        history = {
            "loss": [3.0, 2.5, 2.0, 1.8],
            "contrastive_acc": [0.1, 0.2, 0.3, 0.35],
            "nn_acc": [0.2, 0.3, 0.4, 0.5],
            "probe_acc": [0.3, 0.4, 0.5, 0.55],
            "val_probe_acc": [0.25, 0.35, 0.45, 0.5],
            "knn_top1": [0.3, 0.45, 0.5, 0.6],
        }
        path = os.path.join(make_tempdir(self), "plots", "curves.png")
        self.assertEqual(pictures.plot_training_curves(history, path), path)
        pixels = read_png(path)
        # 5 metrics (val_probe_acc shares probe_acc's subplot) -> 2 rows x 3 columns of 4x3 in.
        self.assertEqual(pixels.shape[:2], (2 * 300, 3 * 400))
        self.assertGreater(pixels.std(), 5.0)  # Not a blank canvas.

    def test_csv_logger_round_trip(self):
        folder = make_tempdir(self)
        log = os.path.join(folder, "log.csv")
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
        x = np.random.default_rng(0).random((8, 3), np.float32)
        fit = model.fit(x, x[:, :1], epochs=3, verbose=0,
                        callbacks=[keras.callbacks.CSVLogger(log)])
        history = pictures.read_csv_log(log)
        self.assertEqual(history["epoch"], [0.0, 1.0, 2.0])
        np.testing.assert_allclose(history["loss"], fit.history["loss"], rtol=1e-5)
        path = pictures.plot_training_curves(history, os.path.join(folder, "c.png"))
        self.assertEqual(read_png(path).shape[:2], (300, 400 * (len(history) - 1)))
        # A History object is accepted as is.
        pictures.plot_training_curves(fit, os.path.join(folder, "h.png"))
        self.assertEqual(read_png(os.path.join(folder, "h.png")).shape[:2], (300, 400))

    def test_errors(self):
        folder = make_tempdir(self)
        with self.assertRaisesRegex(ValueError, "no metric values"):
            pictures.plot_training_curves({"loss": []}, os.path.join(folder, "x.png"))
        with self.assertRaisesRegex(ValueError, "not in the history"):
            pictures.plot_training_curves({"loss": [1.0]}, os.path.join(folder, "x.png"),
                                          metrics=["nn_acc"])
        with self.assertRaisesRegex(ValueError, "does not exist"):
            pictures.read_csv_log(os.path.join(folder, "missing.csv"))
        self.assertEqual(os.listdir(folder), [])


class NeighbourGridTest(parameterized.TestCase):
    @parameterized.named_parameters(
        ("gray_uint8", np.uint8, 1, 3, 4),
        ("gray_no_channel_axis", np.uint8, 0, 2, 5),
        ("rgb_float", np.float32, 3, 4, 2),
    )
    def test_layout_is_queries_by_k_plus_one(self, dtype, channels, queries, k):
        rng = np.random.default_rng(0)
        shape = (12, 12) if channels == 0 else (12, 12, channels)
        q = rng.random((queries, *shape))
        n = rng.random((queries, k, *shape))
        if dtype == np.uint8:
            q, n = (q * 255).astype(np.uint8), (n * 255).astype(np.uint8)
        else:
            q, n = q.astype(np.float32), n.astype(np.float32)
        path = pictures.plot_neighbour_grid(q, n, os.path.join(make_tempdir(self), "g.png"))
        pixels = read_png(path)
        self.assertEqual(pixels.shape[:2], (queries * CELL_PIXELS, (k + 1) * CELL_PIXELS))
        if channels != 3:  # Random RGB pixels can be red themselves.
            self.assertFalse(red_mask(pixels).any())  # No labels: no frames.

    def test_wrong_neighbours_get_a_red_frame(self):
        queries, k = 3, 4
        rng = np.random.default_rng(1)
        q = rng.integers(0, 256, (queries, 10, 10, 1), dtype=np.uint8)  # Gray: never red.
        n = rng.integers(0, 256, (queries, k, 10, 10, 1), dtype=np.uint8)
        q_labels = np.array([0, 1, 2])
        n_labels = np.repeat(q_labels[:, None], k, axis=1)
        folder = make_tempdir(self)
        right = pictures.plot_neighbour_grid(q, n, os.path.join(folder, "right.png"), q_labels,
                                             n_labels, class_names=["a", "b", "c"])
        self.assertFalse(red_mask(read_png(right)).any())

        n_labels[1, 2] = 0  # Row 1, neighbour 3 (column 3 counting the query) is wrong.
        wrong = pictures.plot_neighbour_grid(q, n, os.path.join(folder, "wrong.png"), q_labels,
                                             n_labels, class_names=["a", "b", "c"])
        rows, cols = np.nonzero(red_mask(read_png(wrong)))
        self.assertGreater(len(rows), 20)
        self.assertEqual(int(rows.mean() // CELL_PIXELS), 1)
        self.assertEqual(int(cols.mean() // CELL_PIXELS), 3)

    def test_bad_inputs(self):
        path = os.path.join(make_tempdir(self), "g.png")
        q = np.zeros((2, 8, 8, 3), np.float32)
        with self.assertRaisesRegex(ValueError, "undo any normalisation"):
            pictures.plot_neighbour_grid(q - 0.5, np.zeros((2, 3, 8, 8, 3), np.float32), path)
        with self.assertRaisesRegex(ValueError, "neighbour_images \\[Q, k, H, W, C\\]"):
            pictures.plot_neighbour_grid(q, np.zeros((3, 3, 8, 8, 3), np.float32), path)
        self.assertFalse(os.path.exists(path))


def brute_force(query_embeddings, support_embeddings, k):
    q = query_embeddings / np.linalg.norm(query_embeddings, axis=1, keepdims=True)
    s = support_embeddings / np.linalg.norm(support_embeddings, axis=1, keepdims=True)
    similarity = q @ s.T
    return np.array([sorted(range(len(s)), key=lambda j: -row[j])[:k] for row in similarity])


class NearestNeighbourImagesTest(parameterized.TestCase):
    def test_plain_function_matches_numpy(self):
        rng = np.random.default_rng(0)
        queries = rng.random((7, 4, 4, 1), np.float32)
        support = rng.random((30, 4, 4, 1), np.float32)
        flatten = lambda x: x.reshape(len(x), -1) - 0.5  # Centred so cosine is informative.
        got = pictures.nearest_neighbour_images(flatten, queries, support, k=5, batch_size=4)
        self.assertEqual(got.shape, (7, 5))
        np.testing.assert_array_equal(
            got, brute_force(flatten(queries), flatten(support), 5))

    @parameterized.named_parameters(("features", False), ("projection", True))
    def test_keras_encoder_matches_numpy(self, with_head):
        encoder = tiny_encoder()
        head = keras.Sequential([keras.layers.Dense(4)]) if with_head else None
        rng = np.random.default_rng(2)
        queries = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
        support = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8)
        got = pictures.nearest_neighbour_images(
            encoder, queries, support, k=3, projection_head=head, batch_size=16)

        def embed(images):
            out = encoder(images.astype(np.float32) / 255).numpy()
            return out if head is None else head(out).numpy()

        np.testing.assert_array_equal(got, brute_force(embed(queries), embed(support), 3))

    def test_query_in_support_finds_itself(self):
        support = np.random.default_rng(3).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8)
        got = pictures.nearest_neighbour_images(tiny_encoder(), support[:6], support, k=2)
        np.testing.assert_array_equal(got[:, 0], np.arange(6))

    def test_k_larger_than_support(self):
        with self.assertRaisesRegex(ValueError, "k=9"):
            pictures.nearest_neighbour_images(
                tiny_encoder(), np.zeros((2, 8, 8, 1), np.uint8),
                np.zeros((8, 8, 8, 1), np.uint8), k=9)


if __name__ == "__main__":
    tf.test.main()
