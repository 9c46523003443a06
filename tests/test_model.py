"""NNCLR model: training steps, data forms, gradients, saving, mixed precision."""

import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from conftest import assert_weights_equal, tiny_encoder
from nnclr_tf.losses import nnclr_loss
from nnclr_tf.model import NNCLR
from nnclr_tf.support_set import SupportSet

SIZE = 16


def structured_views(n=64, seed=0):
    """Four classes of patterns (stripes, stripes, checker, blob) with two noisy flipped views."""
    rng = np.random.default_rng(seed)
    grid = np.arange(SIZE)
    rows, cols = np.meshgrid(grid, grid, indexing="ij")
    patterns = [np.sin(rows * 0.9), np.sin(cols * 0.9),
                np.sign(np.sin(rows * 0.8) * np.sin(cols * 0.8)),
                np.exp(-((rows - 7.5) ** 2 + (cols - 7.5) ** 2) / 20.0)]
    labels = np.arange(n) % 4
    colours = rng.uniform(0.3, 1.0, size=(n, 1, 1, 3))
    images = np.stack([patterns[c] for c in labels])[..., None] * 0.5 * colours + 0.5

    def view():
        noisy = images + rng.normal(scale=0.1, size=images.shape)
        flip = rng.uniform(size=n) < 0.5
        noisy[flip] = noisy[flip, :, ::-1]
        return np.clip(noisy, 0, 1).astype(np.float32)

    return view(), view(), labels.astype(np.int32)


def small_model(num_classes=4, **kwargs):
    keras.utils.set_random_seed(0)
    return NNCLR(tiny_encoder((SIZE, SIZE, 3)), projection_hidden_dims=(32,), projection_dim=16,
                 prediction_hidden_dims=(32,), queue_size=48, num_classes=num_classes, **kwargs)


def dataset(structure, n=64, batch=16):
    view_1, view_2, labels = structured_views(n)
    forms = {
        "dict_labels": {"view_1": view_1, "view_2": view_2, "label": labels},
        "dict": {"view_1": view_1, "view_2": view_2},
        "tuple_labels": (view_1, view_2, labels),
        "tuple": (view_1, view_2),
    }
    return tf.data.Dataset.from_tensor_slices(forms[structure]).batch(batch)


class NNCLRTest(parameterized.TestCase):

    def test_fit_lowers_loss_and_keras_round_trip(self):
        model = small_model()
        model.compile(optimizer=keras.optimizers.Adam(3e-3))
        history = model.fit(dataset("dict_labels"), epochs=4, shuffle=False, verbose=0).history
        self.assertEqual(set(history),
                         {"loss", "contrastive_acc", "nn_acc", "probe_loss", "probe_acc", "z_std"})
        self.assertLess(history["loss"][-1], history["loss"][0] - 0.2, history["loss"])
        self.assertEqual(int(model.support_set.count.numpy()), 4 * 64)

        view_1, _, labels = structured_views(32, seed=1)
        evaluation = tf.data.Dataset.from_tensor_slices((view_1, labels)).batch(16)
        expected = model.evaluate(evaluation, return_dict=True, verbose=0)
        self.assertEqual(set(expected), {"probe_loss", "probe_acc"})
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "nnclr.keras")
            model.save(path)
            loaded = keras.saving.load_model(path, safe_mode=True)
        self.assertIsInstance(loaded, NNCLR)
        assert_weights_equal(model.weights, loaded.weights)
        for name in ("embeddings", "labels", "count"):
            np.testing.assert_array_equal(getattr(loaded.support_set, name).numpy(),
                                          getattr(model.support_set, name).numpy())
        np.testing.assert_array_equal(loaded.encode(view_1).numpy(), model.encode(view_1).numpy())
        got = loaded.evaluate(evaluation, return_dict=True, verbose=0)
        self.assertAlmostEqual(got["probe_acc"], expected["probe_acc"], places=6)

    @parameterized.parameters("tuple", "tuple_labels", "dict")
    def test_fit_data_forms(self, structure):
        model = small_model(transposed_loss=structure == "tuple_labels")
        model.compile(optimizer=keras.optimizers.SGD(0.01))
        history = model.fit(dataset(structure, n=32), epochs=1, shuffle=False, verbose=0).history
        with_labels = structure.endswith("labels")
        expected = {"loss", "contrastive_acc", "z_std"}
        if with_labels:
            expected |= {"nn_acc", "probe_loss", "probe_acc"}
        self.assertEqual(set(history), expected)
        self.assertTrue(np.isfinite(history["loss"][0]))
        self.assertEqual(int(model.support_set.count.numpy()), 32)
        stored = model.support_set.labels.numpy()[:32]
        np.testing.assert_array_equal(stored, structured_views(32)[2] if with_labels else -1)

    def test_probe_never_changes_the_encoder(self):
        """One step with the probe trained alongside leaves the same encoder as one without."""
        batch = {k: v[:8] for k, v in zip(("view_1", "view_2", "label"), structured_views(8))}
        models = [small_model(num_classes=4), small_model(num_classes=0)]
        models[1].set_weights(models[0].get_weights()[:len(models[1].weights)])
        for model in models:
            model.compile(optimizer=keras.optimizers.SGD(0.5))
            model.train_on_batch(batch)
        self.assertFalse(np.array_equal(models[0].encoder.weights[0].numpy(),
                                        small_model().encoder.weights[0].numpy()))
        for with_probe, without in zip(models[0].encoder.weights, models[1].encoder.weights):
            np.testing.assert_allclose(with_probe.numpy(), without.numpy(), atol=1e-6)
        # And directly: the probe loss has no gradient path into the encoder.
        with tf.GradientTape() as tape:
            logits = models[0].probe(models[0].encoder(batch["view_1"], training=True))
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                batch["label"], logits, from_logits=True))
        grads = tape.gradient(loss, models[0].encoder.trainable_weights
                              + models[0].probe.trainable_weights)
        n_encoder = len(models[0].encoder.trainable_weights)
        self.assertTrue(all(g is None for g in grads[:n_encoder]))
        self.assertTrue(all(g is not None for g in grads[n_encoder:]))

    @parameterized.parameters(False, True)
    def test_no_gradient_through_nearest_neighbour(self, transposed):
        support_set = SupportSet(32, 8)
        support_set.build((None, 8))
        rng = np.random.default_rng(0)
        support_set.enqueue(rng.normal(size=(20, 8)).astype(np.float32))
        z = [tf.Variable(rng.normal(size=(6, 8)).astype(np.float32)) for _ in range(2)]
        p = [tf.Variable(rng.normal(size=(6, 8)).astype(np.float32)) for _ in range(2)]
        with tf.GradientTape() as tape:
            nn = [support_set.nearest_neighbour(z_i) for z_i in z]
            loss = nnclr_loss(nn[0], nn[1], p[0], p[1], 0.1, transposed=transposed)
        grads = tape.gradient(loss, z + p)
        self.assertIsNone(grads[0])
        self.assertIsNone(grads[1])
        self.assertGreater(float(tf.reduce_max(tf.abs(grads[2]))), 1e-4)
        self.assertGreater(float(tf.reduce_max(tf.abs(grads[3]))), 1e-4)

    def test_mixed_bfloat16_fit(self):
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        try:
            model = small_model(top_k=2)
            model.compile(optimizer=keras.optimizers.Adam(1e-3))
            history = model.fit(dataset("dict_labels", n=32), epochs=1, shuffle=False,
                                verbose=0).history
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        self.assertEqual(model.encoder.layers[1].compute_dtype, "bfloat16")
        self.assertEqual(model.support_set.embeddings.dtype, "float32")
        self.assertTrue(np.isfinite(history["loss"][0]))
        norms = np.linalg.norm(model.support_set.ordered().numpy(), axis=1)
        np.testing.assert_allclose(norms, 1.0, atol=1e-5)  # float32 rows, not bfloat16-rounded
        self.assertEqual(model.encode(structured_views(4)[0]).dtype, tf.float32)

    def test_config_round_trip_and_evaluate_without_probe(self):
        model = small_model(num_classes=0, positive="self", top_k=3, queue_write_mode="assign")
        clone = NNCLR.from_config(model.get_config())
        self.assertEqual(clone.get_config(), model.get_config())
        self.assertIsNone(clone.probe)
        self.assertEqual(len(clone.weights), len(model.weights))
        view_1, _, labels = structured_views(16)
        clone.compile(optimizer="sgd")
        with self.assertRaisesRegex(ValueError, "num_classes=0"):
            clone.evaluate(view_1, labels, batch_size=8, verbose=0)

    @parameterized.parameters(dict(positive="other"), dict(temperature=0.0),
                              dict(num_classes=-1))
    def test_bad_arguments(self, **kwargs):
        with self.assertRaises(ValueError):
            small_model(**kwargs)

    def test_bad_batch(self):
        model = small_model()
        with self.assertRaisesRegex(ValueError, "'view_1', 'view_2'"):
            model.train_step({"image": np.zeros((2, SIZE, SIZE, 3), np.float32)})


if __name__ == "__main__":
    absltest.main()
