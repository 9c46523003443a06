"""Tests for nnclr_tf.export: SavedModel serving of the encoder and .keras round trips."""

import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from nnclr_tf import export

IMAGE_SIZE = 16
# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale uses.
LUMA = np.array([0.2989, 0.5870, 0.1140], np.float32)


def tiny_encoder(channels=3, seed=0):
    """[batch, 16, 16, channels] float [0, 1] -> [batch, 6]."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((IMAGE_SIZE, IMAGE_SIZE, channels))
    x = keras.layers.Conv2D(4, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(6)(x)
    return keras.Model(inputs, outputs)


def tiny_projection():
    """[batch, 6] -> [batch, 5]; left unbuilt so the export has to build it."""
    return keras.Sequential([keras.layers.Dense(8, activation="relu"), keras.layers.Dense(5)])


def make_tempdir(test):
    """A fresh directory removed after `test` (absl's create_tempdir needs parsed flags)."""
    path = tempfile.mkdtemp()
    test.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def reference(encoder, images, head=None, channels=None):
    """In-memory: preprocess_for_eval -> (NumPy channel conversion) -> encoder -> l2norm."""
    x = export.preprocess_for_eval(images, IMAGE_SIZE).numpy()
    if channels == 3 and x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif channels == 1 and x.shape[-1] == 3:
        x = (x @ LUMA)[..., None]
    features = encoder(x, training=False).numpy()
    embeddings = features if head is None else head(features, training=False).numpy()
    embeddings = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    return features, embeddings


class ExportEncoderTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.dir = make_tempdir(self)
        self.path = os.path.join(self.dir, "encoder")

    @parameterized.named_parameters(("no_head", False), ("with_head", True))
    def test_serving_matches_in_memory_encoder(self, with_head):
        encoder = tiny_encoder()
        head = tiny_projection() if with_head else None
        export.export_encoder(encoder, self.path, IMAGE_SIZE, 3, projection_head=head)
        loaded = tf.saved_model.load(self.path)
        layer = keras.layers.TFSMLayer(self.path, call_endpoint="serving_default")
        wrapped = export.load_encoder(self.path)
        self.assertEqual((wrapped.image_size, wrapped.channels), (IMAGE_SIZE, 3))
        for size in [(20, 20), (40, 30), (9, 33)]:
            images = random_images((3, *size, 3), seed=sum(size))
            features, embeddings = reference(encoder, images, head)
            outputs = [
                loaded.signatures["serving_default"](images=tf.constant(images)),
                layer(images),
                wrapped(images),
                wrapped.predict(images, batch_size=2),
            ]
            for out in outputs:
                np.testing.assert_allclose(np.asarray(out["features"]), features, atol=1e-5)
                np.testing.assert_allclose(np.asarray(out["embeddings"]), embeddings, atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)
        self.assertEqual(embeddings.shape[1], 5 if with_head else 6)

    def test_embed_float_signature_skips_preprocessing(self):
        encoder = tiny_encoder()
        export.export_encoder(encoder, self.path, IMAGE_SIZE, 3)
        wrapped = export.load_encoder(self.path)
        images = np.random.default_rng(1).random((4, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        out = wrapped.embed_float(images)
        np.testing.assert_allclose(out["features"].numpy(), encoder(images).numpy(), atol=1e-5)
        with self.assertRaisesRegex(ValueError, "embed_float expects"):
            wrapped.embed_float(images[:, :8])

    @parameterized.named_parameters(("gray_to_rgb", 3, 1), ("rgb_to_gray", 1, 3))
    def test_channel_conversion(self, encoder_channels, input_channels):
        encoder = tiny_encoder(encoder_channels)
        export.export_encoder(encoder, self.path, IMAGE_SIZE, encoder_channels)
        wrapped = export.load_encoder(self.path)
        images = random_images((2, 24, 20, input_channels))
        features, embeddings = reference(encoder, images, channels=encoder_channels)
        out = wrapped(images)
        np.testing.assert_allclose(out["features"].numpy(), features, atol=1e-5)
        np.testing.assert_allclose(out["embeddings"].numpy(), embeddings, atol=1e-5)
        # The raw signature has no eager check: the in-graph assertion must fire.
        with self.assertRaisesRegex(tf.errors.InvalidArgumentError, "1 \\(grayscale\\) or 3"):
            wrapped.signatures["serving_default"](images=tf.zeros([1, 20, 20, 2], tf.uint8))

    def test_wrong_dtype_rank_and_channels_rejected(self):
        export.export_encoder(tiny_encoder(), self.path, IMAGE_SIZE, 3)
        wrapped = export.load_encoder(self.path)
        images = random_images((2, 20, 20, 3))
        with self.assertRaisesRegex(ValueError, "must be uint8"):
            wrapped(images.astype(np.float32) / 255)
        with self.assertRaisesRegex(ValueError, "shape \\[N, height, width, 1 or 3\\]"):
            wrapped(images[0])
        with self.assertRaisesRegex(ValueError, "shape \\[N, height, width, 1 or 3\\]"):
            wrapped.predict(images[..., :2])
        # The signature's TensorSpec itself refuses other dtypes and ranks.
        serve = wrapped.signatures["serving_default"]
        with self.assertRaises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
            serve(images=tf.constant(images, tf.float32))
        with self.assertRaises((TypeError, ValueError, tf.errors.InvalidArgumentError)):
            serve(images=tf.constant(images[0]))

    def test_bad_export_arguments(self):
        with self.assertRaisesRegex(ValueError, "does not match"):
            export.export_encoder(tiny_encoder(), self.path, 32, 3)
        with self.assertRaisesRegex(ValueError, "channels=2"):
            export.export_encoder(tiny_encoder(), self.path, IMAGE_SIZE, 2)
        self.assertFalse(os.path.exists(self.path))

    def test_overwrite_protection_keeps_existing_export(self):
        first, second = tiny_encoder(seed=1), tiny_encoder(seed=2)
        images = random_images((2, 20, 20, 3))
        os.makedirs(self.path)  # An existing empty directory may be used.
        export.export_encoder(first, self.path, IMAGE_SIZE, 3)
        with self.assertRaisesRegex(ValueError, "overwrite=True"):
            export.export_encoder(second, self.path, IMAGE_SIZE, 3)
        np.testing.assert_allclose(
            export.load_encoder(self.path)(images)["features"].numpy(),
            reference(first, images)[0], atol=1e-5)
        export.export_encoder(second, self.path, IMAGE_SIZE, 3, overwrite=True)
        np.testing.assert_allclose(
            export.load_encoder(self.path)(images)["features"].numpy(),
            reference(second, images)[0], atol=1e-5)
        # No temporary or backup directories are left beside the export.
        self.assertEqual(os.listdir(self.dir), ["encoder"])

    def test_corrupted_or_missing_savedmodel_gives_clear_error(self):
        export.export_encoder(tiny_encoder(), self.path, IMAGE_SIZE, 3)
        pb = os.path.join(self.path, "saved_model.pb")
        with open(pb, "r+b") as handle:
            handle.truncate(os.path.getsize(pb) // 3)
        with self.assertRaisesRegex(ValueError, "not a readable encoder SavedModel") as caught:
            export.load_encoder(self.path)
        self.assertIn(self.path, str(caught.exception))
        with self.assertRaisesRegex(ValueError, "does not exist"):
            export.load_encoder(os.path.join(self.dir, "missing"))
        empty = make_tempdir(self)
        with self.assertRaisesRegex(ValueError, "not a readable encoder SavedModel"):
            export.load_encoder(empty)


def mixed_precision_pair(seed=0):
    """(encoder, head) built under mixed_bfloat16 and their float32 twins holding the same weights.

    The head is the package's ProjectionHead, whose hidden layers are made in its __init__.
    """
    from nnclr_tf.heads import ProjectionHead
    models = []
    for policy in ("mixed_bfloat16", "float32"):
        keras.mixed_precision.set_dtype_policy(policy)
        try:
            encoder = tiny_encoder(seed=seed)
            head = ProjectionHead(hidden_dims=(16,), output_dim=5)
            head(encoder(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)))
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        models.append((encoder, head))
    (mixed, mixed_head), (plain, plain_head) = models
    plain.set_weights(mixed.get_weights())
    plain_head.set_weights(mixed_head.get_weights())
    return mixed, mixed_head, plain, plain_head


class ExportPrecisionTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.path = os.path.join(make_tempdir(self), "encoder")
        self.images = random_images((4, 20, 24, 3), seed=3)

    def test_mixed_precision_model_serves_in_float32_by_default(self):
        mixed, mixed_head, plain, plain_head = mixed_precision_pair()
        export.export_encoder(mixed, self.path, IMAGE_SIZE, 3, projection_head=mixed_head,
                              info={"model_dir": "runs/x"})
        wrapped = export.load_encoder(self.path)
        features, embeddings = reference(plain, self.images, plain_head)
        out = wrapped(self.images)
        np.testing.assert_allclose(out["features"].numpy(), features, atol=1e-5)
        np.testing.assert_allclose(out["embeddings"].numpy(), embeddings, atol=1e-5)
        with open(os.path.join(self.path, "export.json")) as handle:
            info = json.load(handle)
        self.assertEqual(info, wrapped.info)
        self.assertEqual(info["precision"], "float32")
        self.assertEqual((info["image_size"], info["channels"], info["embeddings_dim"]), (16, 3, 5))
        self.assertEqual(info["model_dir"], "runs/x")
        # The model being exported is left as it was trained.
        self.assertEqual(mixed.dtype_policy.name, "mixed_bfloat16")

    def test_as_trained_keeps_the_mixed_policy_and_records_it(self):
        mixed, mixed_head, plain, plain_head = mixed_precision_pair()
        export.export_encoder(mixed, self.path, IMAGE_SIZE, 3, projection_head=mixed_head,
                              precision="as_trained")
        wrapped = export.load_encoder(self.path)
        self.assertEqual(wrapped.info["precision"], "mixed_bfloat16")
        # bfloat16 keeps 8 bits of mantissa: the served features move well beyond float32 round-off.
        features, _ = reference(plain, self.images, plain_head)
        self.assertGreater(np.abs(wrapped(self.images)["features"].numpy() - features).max(), 1e-3)

    def test_unknown_precision_is_refused(self):
        with self.assertRaisesRegex(ValueError, "precision='bf16'"):
            export.export_encoder(tiny_encoder(), self.path, IMAGE_SIZE, 3, precision="bf16")


class PreprocessTest(parameterized.TestCase):
    def test_identity_scale_is_a_centre_crop(self):
        # Shorter side already IMAGE_SIZE: resizing is the identity, only the crop remains.
        images = random_images((2, IMAGE_SIZE, 24, 3))
        out = export.preprocess_for_eval(images, IMAGE_SIZE).numpy()
        np.testing.assert_allclose(out, images[:, :, 4:20].astype(np.float32) / 255, atol=1e-6)

    @parameterized.parameters((40, 30), (30, 40), (8, 8), (17, 100))
    def test_output_shape_and_range(self, height, width):
        out = export.preprocess_for_eval(random_images((2, height, width, 1)), IMAGE_SIZE, 3)
        self.assertEqual(out.shape, (2, IMAGE_SIZE, IMAGE_SIZE, 3))
        self.assertGreaterEqual(float(tf.reduce_min(out)), 0.0)
        self.assertLessEqual(float(tf.reduce_max(out)), 1.0)

    def test_single_image_in_tf_data_map(self):
        images = random_images((3, 30, 20, 1))
        dataset = tf.data.Dataset.from_tensor_slices(images).map(
            lambda image: export.preprocess_for_eval(image, IMAGE_SIZE, channels=3))
        mapped = np.stack([x.numpy() for x in dataset])
        batched = export.preprocess_for_eval(images, IMAGE_SIZE).numpy()
        np.testing.assert_allclose(mapped, np.repeat(batched, 3, axis=-1), atol=1e-6)

    def test_constant_image_stays_constant(self):
        images = np.full((1, 37, 23, 3), 128, np.uint8)
        out = export.preprocess_for_eval(images, IMAGE_SIZE).numpy()
        np.testing.assert_allclose(out, 128 / 255, atol=1e-6)


class FullModelTest(parameterized.TestCase):
    def test_keras_round_trip_in_safe_mode(self):
        model = keras.Sequential([tiny_encoder(), keras.layers.Dense(3)])
        path = os.path.join(make_tempdir(self), "sub", "model.keras")
        export.save_full_model(model, path)
        restored = export.load_full_model(path)
        x = np.random.default_rng(0).random((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
        np.testing.assert_allclose(restored(x).numpy(), model(x).numpy(), atol=1e-6)
        with self.assertRaisesRegex(ValueError, "already exists"):
            export.save_full_model(model, path, overwrite=False)

    def test_safe_mode_refuses_lambda(self):
        inputs = keras.Input((4,))
        model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
        path = os.path.join(make_tempdir(self), "lambda.keras")
        export.save_full_model(model, path)
        with self.assertRaisesRegex(ValueError, "safe_mode=True"):
            export.load_full_model(path)

    def test_bad_files_give_clear_errors(self):
        folder = make_tempdir(self)
        with self.assertRaisesRegex(ValueError, "does not exist"):
            export.load_full_model(os.path.join(folder, "missing.keras"))
        corrupted = os.path.join(folder, "bad.keras")
        with open(corrupted, "wb") as handle:
            handle.write(b"not a zip archive")
        with self.assertRaisesRegex(ValueError, "Could not load the Keras model"):
            export.load_full_model(corrupted)
        with self.assertRaisesRegex(ValueError, "must end with '.keras'"):
            export.save_full_model(tiny_encoder(), os.path.join(folder, "model.h5"))


if __name__ == "__main__":
    tf.test.main()
