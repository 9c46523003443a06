"""Evaluation protocols against NumPy references and invariants, on tiny synthetic data."""

import inspect
import json
import math
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import parameterized

from conftest import tiny_encoder as shared_tiny_encoder
from nnclr_tf import evaluate
from nnclr_tf.evaluation import knn as knn_module
from nnclr_tf.evaluation import linear as linear_module


def tiny_encoder(seed=0, size=8):
    """Images [batch, size, size, 3] -> features [batch, 8]: conv, batch norm, a strided conv."""
    keras.utils.set_random_seed(seed)
    return shared_tiny_encoder((size, size, 3), width=4)


@keras.saving.register_keras_serializable(package="nnclr_tf_tests")
class OddBatchCounter(keras.layers.Layer):
    """Identity layer counting the odd-sized batches it is called on (TF 2.21's oneDNN crash)."""

    def build(self, input_shape):
        self.odd_batches = self.add_weight(
            shape=(), initializer="zeros", trainable=False, name="odd_batches"
        )

    def call(self, images):
        self.odd_batches.assign_add(tf.cast(tf.shape(images)[0] % 2, "float32"))
        return images


def counting_encoder(seed=0, size=8):
    """No batch norm (its moving statistics would need many steps), a strided conv, a counter."""
    keras.utils.set_random_seed(seed)
    images = keras.Input((size, size, 3))
    x = OddBatchCounter(name="odd_batch_counter")(images)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", activation="relu")(x)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(x), name="counting_encoder")


def colour_images(count, num_classes, seed=0, size=8):
    """Images whose mean colour depends on the class, so a tiny encoder can separate them."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, count)
    colours = np.linspace(0.1, 0.9, num_classes)[labels]
    images = rng.uniform(0, 0.1, (count, size, size, 3)) + colours[:, None, None, None] * [
        1,
        0.5,
        0.2,
    ]
    return np.clip(images, 0, 1).astype(np.float32), labels.astype(np.int32)


def batches(images, labels, batch_size=8):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


def numpy_knn_scores(bank, bank_labels, queries, num_classes, k, temperature):
    """Independent reference: full similarity matrix, argsort, weighted one-hot votes."""
    bank = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    similarities = queries @ bank.T
    scores = np.zeros((len(queries), num_classes))
    for i, row in enumerate(similarities):
        for j in np.argsort(-row, kind="stable")[:k]:
            scores[i, bank_labels[j]] += np.exp(row[j] / temperature)
    return scores


class KNNTest(parameterized.TestCase):
    @parameterized.parameters(20, 200)
    def test_well_separated_clusters_are_classified_exactly(self, k):
        rng = np.random.default_rng(0)
        centres = np.eye(5, 16) * 10.0
        bank_labels = rng.integers(0, 5, 300)
        query_labels = rng.integers(0, 5, 50)
        bank = centres[bank_labels] + rng.normal(size=(300, 16))
        queries = centres[query_labels] + rng.normal(size=(50, 16))
        results = evaluate.knn_accuracy(bank, bank_labels, queries, query_labels, 5, k=k)
        self.assertEqual(results, {"top1": 1.0, "top5": 1.0})

    def test_batched_equals_unbatched(self):
        rng = np.random.default_rng(1)
        bank, bank_labels = rng.normal(size=(301, 12)), rng.integers(0, 7, 301)
        queries = rng.normal(size=(45, 12))
        kwargs = dict(num_classes=7, k=20, temperature=0.1, return_scores=True)
        whole = evaluate.knn_predict(
            bank, bank_labels, queries, batch_size=1000, bank_batch_size=1000, **kwargs
        )
        chunked = evaluate.knn_predict(
            bank, bank_labels, queries, batch_size=8, bank_batch_size=13, **kwargs
        )
        np.testing.assert_allclose(chunked, whole, rtol=1e-5)
        np.testing.assert_array_equal(chunked.argmax(1), whole.argmax(1))
        # Bank chunks smaller than k: the running top-k must still hold k neighbours.
        tiny_chunks = evaluate.knn_predict(
            bank, bank_labels, queries, batch_size=8, bank_batch_size=5, **kwargs
        )
        np.testing.assert_allclose(tiny_chunks, whole, rtol=1e-5)

    @parameterized.parameters((3, 0.1), (5, 0.5), (50, 0.07))
    def test_weighted_vote_matches_numpy(self, k, temperature):
        rng = np.random.default_rng(2)
        bank, bank_labels = rng.normal(size=(30, 6)), rng.integers(0, 4, 30)
        queries = rng.normal(size=(9, 6))
        scores = evaluate.knn_predict(
            bank,
            bank_labels,
            queries,
            4,
            k=k,
            temperature=temperature,
            bank_batch_size=7,
            return_scores=True,
        )
        reference = numpy_knn_scores(bank, bank_labels, queries, 4, min(k, 30), temperature)
        np.testing.assert_allclose(scores, reference, rtol=1e-5)
        predictions = evaluate.knn_predict(
            bank, bank_labels, queries, 4, k=k, temperature=temperature
        )
        np.testing.assert_array_equal(predictions, reference.argmax(1))

    def test_top5_only_with_five_classes_and_bad_labels_raise(self):
        rng = np.random.default_rng(3)
        bank, queries = rng.normal(size=(20, 4)), rng.normal(size=(5, 4))
        results = evaluate.knn_accuracy(bank, rng.integers(0, 3, 20), queries, np.zeros(5), 3, k=5)
        self.assertEqual(set(results), {"top1"})
        with self.assertRaisesRegex(ValueError, "num_classes"):
            evaluate.knn_predict(bank, np.full(20, 3), queries, 3)
        with self.assertRaisesRegex(ValueError, "dim"):
            evaluate.knn_predict(bank, np.zeros(20), rng.normal(size=(5, 3)), 3)


class FeatureTest(parameterized.TestCase):
    def test_extract_features_matches_encoder(self):
        encoder = tiny_encoder()
        images, labels = colour_images(21, 3)
        features, got_labels = evaluate.extract_features(encoder, batches(images, labels))
        np.testing.assert_allclose(
            features, encoder.predict(images, verbose=0), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_array_equal(got_labels, labels)
        self.assertEqual((features.dtype, got_labels.dtype), (np.float32, np.int64))
        normalised, _ = evaluate.extract_features(encoder, batches(images, labels), normalize=True)
        np.testing.assert_allclose(np.linalg.norm(normalised, axis=1), 1.0, rtol=1e-5)
        with self.assertRaisesRegex(ValueError, "repeats forever"):
            evaluate.extract_features(encoder, batches(images, labels).repeat())


class LinearProbeTest(parameterized.TestCase):
    def test_separable_three_class_problem(self):
        rng = np.random.default_rng(0)
        centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])
        labels = rng.integers(0, 3, 400)
        features = centres[labels] + rng.normal(size=(400, 2))
        results = evaluate.linear_probe_accuracy(
            features[:200], labels[:200], features[200:], labels[200:], 3
        )
        self.assertGreaterEqual(results["top1"], 0.95)
        self.assertGreaterEqual(results["val_top1"], 0.95)
        self.assertEqual(set(results), {"top1", "mean_per_class", "l2", "val_top1"})

    def test_noisy_high_dimensional_problem_picks_stronger_regularisation(self):
        rng = np.random.default_rng(0)
        # 150 weakly informative dims, 200 training rows, 20% flipped training labels: an
        # unregularised fit memorises the noise, a strong L2 penalty averages it out.
        labels = rng.integers(0, 2, 400)
        features = rng.normal(size=(400, 150)) + 0.1 * (2 * labels[:, None] - 1)
        train_labels = np.where(rng.random(200) < 0.2, 1 - labels[:200], labels[:200])
        chosen = evaluate.linear_probe_accuracy(
            features[:200], train_labels, features[200:], labels[200:], 2
        )
        weak = evaluate.linear_probe_accuracy(
            features[:200], train_labels, features[200:], labels[200:], 2, l2_grid=(1e-5,)
        )
        self.assertGreaterEqual(chosen["l2"], 0.1)
        self.assertGreater(chosen["top1"], weak["top1"] + 0.03)
        # On a clean, low-dimensional separable problem, the weakest penalty wins instead.
        centres = np.array([[0.0, 0.0], [6.0, 0.0]])
        clean_x = centres[labels] + rng.normal(size=(400, 2))
        clean = evaluate.linear_probe_accuracy(
            clean_x[:200], labels[:200], clean_x[200:], labels[200:], 2
        )
        self.assertLess(clean["l2"], chosen["l2"])

    def test_lbfgs_reaches_the_regularised_optimum(self):
        rng = np.random.default_rng(4)
        features = rng.normal(size=(90, 5)).astype(np.float32)
        labels = rng.integers(0, 3, 90)
        l2 = 0.05
        objective = linear_module._LogisticObjective(features, labels, 3, chunk_rows=32)

        def numpy_objective(params):  # independent reference: softmax cross-entropy by hand
            weights, bias = params[:-3].reshape(5, 3), params[-3:]
            logits = features @ weights + bias
            logits -= logits.max(axis=1, keepdims=True)
            probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
            loss = -np.mean(np.log(probs[np.arange(90), labels])) + 0.5 * l2 * np.sum(weights**2)
            residual = (probs - np.eye(3)[labels]) / 90
            grad = np.concatenate([(features.T @ residual + l2 * weights).ravel(), residual.sum(0)])
            return loss, grad

        start = rng.normal(size=18)
        loss, grad = objective(start, l2)
        reference_loss, reference_grad = numpy_objective(start)
        self.assertAlmostEqual(loss, reference_loss, places=5)
        np.testing.assert_allclose(grad, reference_grad, rtol=1e-4, atol=1e-6)
        solution = linear_module._lbfgs(lambda p: objective(p, l2), np.zeros(18))
        self.assertLess(np.max(np.abs(numpy_objective(solution)[1])), 1e-4)

    def test_reaches_the_bayes_accuracy_of_two_gaussians(self):
        # Classes N(-mu e1, I) and N(+mu e1, I) in 5 dims, equal priors: the best possible
        # classifier is linear and its accuracy is Phi(mu) = 0.8413 for mu = 1.
        rng = np.random.default_rng(5)
        mu = 1.0

        def sample(count):
            labels = rng.integers(0, 2, count)
            features = rng.normal(size=(count, 5))
            features[:, 0] += mu * (2 * labels - 1)
            return features, labels

        (train_x, train_y), (test_x, test_y) = sample(4000), sample(40000)
        results = evaluate.linear_probe_accuracy(train_x, train_y, test_x, test_y, 2)
        bayes = 0.5 * (1 + math.erf(mu / math.sqrt(2)))
        # 40,000 test rows: one standard error of the accuracy is 0.0018.
        self.assertAlmostEqual(results["top1"], bayes, delta=0.008)

    def test_bad_labels_raise(self):
        with self.assertRaisesRegex(ValueError, "labels"):
            evaluate.linear_probe_accuracy(
                np.zeros((4, 2)), [0, 1, 2, 5], np.zeros((2, 2)), [0, 1], 3
            )


class ProtocolTest(parameterized.TestCase):
    def test_linear_evaluation_keeps_encoder_frozen(self):
        encoder = tiny_encoder()
        before = [w.copy() for w in encoder.get_weights()]
        images, labels = colour_images(64, 5)
        results = evaluate.linear_evaluation(
            encoder,
            batches(images, labels),
            batches(images, labels),
            5,
            epochs=2,
            learning_rate=0.5,
        )
        self.assertEqual(
            set(results), {"top1", "top5", "num_test", "epochs", "learning_rate"}
        )
        self.assertEqual((results["num_test"], results["epochs"]), (64, 2))
        self.assertTrue(encoder.trainable)  # the caller's flag is restored
        for old, new in zip(before, encoder.get_weights()):  # includes batch-norm moving statistics
            np.testing.assert_array_equal(old, new)

    def test_fine_tune_changes_copy_not_original(self):
        encoder = tiny_encoder()
        before = [w.copy() for w in encoder.get_weights()]
        images, labels = colour_images(64, 3)
        results, classifier = evaluate.fine_tune(
            encoder,
            batches(images, labels),
            batches(images, labels),
            3,
            epochs=2,
            learning_rate=0.1,
        )
        self.assertEqual(set(results), {"top1", "num_test", "epochs", "learning_rate"})
        for old, new in zip(before, encoder.get_weights()):
            np.testing.assert_array_equal(old, new)
        copy = classifier.layers[1]
        self.assertIsNot(copy, encoder)
        changed = [not np.array_equal(a, b) for a, b in zip(before, copy.get_weights())]
        self.assertTrue(
            all(changed), "every encoder weight (kernel, BN) should be fine-tuned"
        )
        self.assertEqual(classifier.output_shape, (None, 3))

    @parameterized.parameters(("linear_evaluation", 0.1), ("fine_tune", 0.1))
    def test_accuracy_rises_far_above_chance_on_a_separable_problem(self, protocol, learning_rate):
        # Three colours, chance 1/3: the head starts random, so only training gets it near 1.
        train = colour_images(96, 3, seed=0)
        test = colour_images(60, 3, seed=1)
        results = getattr(evaluate, protocol)(
            counting_encoder(), batches(*train), batches(*test), 3, epochs=4,
            learning_rate=learning_rate,
        )
        results = results[0] if protocol == "fine_tune" else results
        self.assertGreaterEqual(results["top1"], 0.9)
        self.assertEqual(results["num_test"], 60)

    @parameterized.parameters("linear_evaluation", "fine_tune")
    def test_no_training_step_sees_an_odd_batch(self, protocol):
        # 17 training images in batches of 8 end with a batch of 1: it must reach the model
        # doubled (TensorFlow 2.21's oneDNN kernels can crash the process on odd batches).
        encoder = counting_encoder()
        images, labels = colour_images(17, 3)
        test = colour_images(16, 3, seed=1)  # even batches: only training could count
        results = getattr(evaluate, protocol)(
            encoder, batches(images, labels), batches(*test), 3, epochs=2, learning_rate=0.1
        )
        if protocol == "fine_tune":
            results, classifier = results
            encoder = classifier.layers[1]  # the trained copy
        self.assertEqual(float(encoder.get_layer("odd_batch_counter").odd_batches.numpy()), 0.0)
        self.assertEqual(results["num_test"], 16)

    def test_doubling_an_odd_batch_leaves_the_gradient_and_batch_statistics_unchanged(self):
        images, labels = colour_images(7, 3)
        (doubled_images, doubled_labels), = list(
            evaluate.even_batches(batches(images, labels, batch_size=7))
        )
        self.assertEqual(doubled_images.shape[0], 14)
        encoder = tiny_encoder()
        head = keras.layers.Dense(3)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

        def gradients(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, head(encoder(x, training=True)))
            return tape.gradient(loss, encoder.trainable_variables + head.trainable_variables)

        for single, double in zip(gradients(images, labels), gradients(doubled_images, doubled_labels)):
            np.testing.assert_allclose(double, single, rtol=1e-4, atol=1e-6)

    def test_transfer_suite_skips_unprepared_and_writes_table(self):
        encoder = tiny_encoder()
        sizes = {"cifar10": 4, "dtd": 6}
        calls = []

        def load_fn(name, split):
            calls.append((name, split))
            if name not in sizes:
                raise ValueError(
                    f"Dataset {name!r} is not prepared in data_dir; run `nnclr prepare`."
                )
            images, labels = colour_images(48, sizes[name], seed=len(calls))
            return batches(images, labels, batch_size=16)

        rows = evaluate.transfer_suite(
            encoder, ["cifar10", "sun397", "dtd"], load_fn=load_fn, l2_grid=(1e-3, 1e-1)
        )
        self.assertEqual([r["status"] for r in rows], ["ok", "skipped", "ok"])
        self.assertIn(("dtd", "train+validation"), calls)
        self.assertEqual(rows[0]["num_classes"], 4)
        self.assertEqual(rows[2]["paper"], 75.5)
        self.assertGreater(rows[0]["top1"], 0.5)
        model_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, model_dir)
        markdown = evaluate.write_results(rows, model_dir, "transfer")
        lines = markdown.strip().splitlines()
        self.assertLen(lines, 2 + 3)
        self.assertIn("paper (%)", lines[0])
        self.assertIn("not prepared", lines[3])
        self.assertIn("| sun397 | skipped |", lines[3])
        self.assertIn(f"| {100 * rows[0]['top1']:.1f} |", lines[2])
        with open(os.path.join(model_dir, "transfer.json")) as f:
            self.assertEqual(json.load(f)[1]["reason"], rows[1]["reason"])
        with open(os.path.join(model_dir, "transfer.md")) as f:
            self.assertEqual(f.read(), markdown)
        self.assertLen(evaluate.PAPER_TRANSFER, 12)


    def test_transfer_suite_defaults_to_the_papers_datasets_and_skips_unlabelled(self):
        encoder = tiny_encoder()

        def not_prepared(name, split):
            raise FileNotFoundError(f"{name} is not prepared")

        rows = evaluate.transfer_suite(encoder, None, load_fn=not_prepared)
        self.assertEqual([r["dataset"] for r in rows], list(evaluate.DEFAULT_TRANSFER_DATASETS))
        self.assertEqual({r["status"] for r in rows}, {"skipped"})
        self.assertEqual(rows[0]["reason"], "food101 is not prepared")

        def unlabelled(name, split):
            images, _ = colour_images(16, 2)
            return batches(images, np.full(16, -1, np.int32))

        (row,) = evaluate.transfer_suite(encoder, ["stl10"], load_fn=unlabelled)
        self.assertEqual(row["status"], "skipped")
        self.assertIn("unlabelled", row["reason"])


class InputTest(parameterized.TestCase):
    """What a notebook user has: arrays, (x, y) tuples, dict datasets; un-batched data is refused."""

    def test_arrays_and_dict_datasets_give_the_same_results_as_tuple_datasets(self):
        encoder = tiny_encoder()
        images, labels = colour_images(30, 3)
        expected, _ = evaluate.extract_features(encoder, batches(images, labels))
        dicts = tf.data.Dataset.from_tensor_slices({"image": images, "label": labels}).batch(7)
        uint8 = (np.round(images * 255).astype(np.uint8), labels)
        for data in ((images, labels), dicts, uint8):
            features, got_labels = evaluate.extract_features(encoder, data)
            np.testing.assert_allclose(features, expected, atol=2e-2 if data is uint8 else 1e-5)
            np.testing.assert_array_equal(got_labels, labels)
        knn = evaluate.knn_evaluate(encoder, (images, labels), dicts, 3, k=5)
        self.assertEqual((knn["k"], knn["num_bank"], knn["num_queries"]), (5, 30, 30))
        probe = evaluate.linear_probe_evaluate(encoder, (images, labels), dicts, 3)
        self.assertEqual((probe["num_train"], probe["num_test"]), (30, 30))
        reference = evaluate.linear_probe_accuracy(expected, labels, expected, labels, 3)
        self.assertAlmostEqual(probe["top1"], reference["top1"], delta=1 / 30)

    def test_linear_evaluation_takes_dict_datasets_and_arrays(self):
        train, test = colour_images(96, 3, seed=0), colour_images(60, 3, seed=1)
        dicts = tf.data.Dataset.from_tensor_slices({"image": train[0], "label": train[1]}).batch(8)
        results = evaluate.linear_evaluation(
            counting_encoder(), dicts, test, 3, epochs=4, learning_rate=0.1, batch_size=8
        )
        self.assertGreaterEqual(results["top1"], 0.9)
        self.assertEqual(results["num_test"], 60)

    def test_unbatched_data_is_one_clear_sentence(self):
        images, labels = colour_images(8, 2)
        unbatched = tf.data.Dataset.from_tensor_slices((images, labels))
        with self.assertRaisesRegex(ValueError, r"un-batched.*\.batch\(256\)"):
            evaluate.extract_features(tiny_encoder(), unbatched)
        with self.assertRaisesRegex(ValueError, r"train_ds .*un-batched"):
            evaluate.linear_evaluation(tiny_encoder(), unbatched, (images, labels), 2, epochs=1)
        with self.assertRaisesRegex(ValueError, "same N"):
            evaluate.extract_features(tiny_encoder(), (images, labels[:3]))

    def test_protocol_defaults_match_the_cli(self):
        from nnclr_tf.config import EvalConfig

        def default(function, name):
            return inspect.signature(function).parameters[name].default

        e = EvalConfig()
        self.assertEqual(default(evaluate.knn_evaluate, "k"), e.knn_k)
        self.assertEqual(default(evaluate.knn_evaluate, "temperature"), e.knn_temperature)
        self.assertEqual(default(evaluate.linear_evaluation, "epochs"), e.linear_epochs)
        self.assertEqual(
            default(evaluate.linear_evaluation, "learning_rate"), e.linear_learning_rate
        )
        self.assertEqual(default(evaluate.fine_tune, "epochs"), e.finetune_epochs)
        self.assertEqual(default(evaluate.fine_tune, "learning_rate"), e.finetune_learning_rate)


class TinyClassifier(keras.Model):
    """A classifier exposing `.encoder`, like NNCLR, for the monitor."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.head = keras.layers.Dense(num_classes)

    def call(self, images, training=False):
        return self.head(self.encoder(images, training=training))


class MonitorTest(parameterized.TestCase):
    def test_knn_monitor_writes_logs(self):
        images, labels = colour_images(32, 3)
        model = TinyClassifier(tiny_encoder(), 3)
        model.compile(
            optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        bank, query = batches(images[:24], labels[:24]), batches(images[24:], labels[24:])
        monitor = evaluate.KNNMonitor(bank, query, num_classes=3, every=2, k=5)
        history = model.fit(
            batches(images, labels), epochs=2, callbacks=[monitor], verbose=0, shuffle=False
        )
        self.assertLen(history.history["knn_top1"], 1)  # only after the second epoch
        expected = evaluate.knn_evaluate(model.encoder, bank, query, 3, k=5)["top1"]
        self.assertAlmostEqual(history.history["knn_top1"][0], expected)
        self.assertEqual([epoch for epoch, _ in monitor.history], [1])

    def test_first_epoch_of_every_fit_call_is_evaluated(self):
        # A resumed run calls fit again from a later epoch; CSVLogger fixes its columns at the
        # first epoch of each call, so the monitor must report there too.
        images, labels = colour_images(32, 3)
        model = TinyClassifier(tiny_encoder(), 3)
        model.compile(
            optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        )
        data = batches(images, labels)
        monitor = evaluate.KNNMonitor(data, data, num_classes=3, every=4, k=5, first_epoch=True)
        for initial_epoch, epochs in ((0, 2), (2, 5)):
            model.fit(
                data,
                initial_epoch=initial_epoch,
                epochs=epochs,
                callbacks=[monitor],
                verbose=0,
                shuffle=False,
            )
        self.assertEqual([epoch for epoch, _ in monitor.history], [0, 2, 3])

    def test_missing_encoder_is_a_clear_error(self):
        images, labels = colour_images(8, 2)
        model = keras.Sequential(
            [keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)]
        )
        model.compile(optimizer="sgd", loss="mse")
        monitor = knn_module.KNNMonitor(batches(images, labels), batches(images, labels), 2)
        with self.assertRaisesRegex(ValueError, "encoder"):
            model.fit(
                images, np.zeros((8, 2)), epochs=1, callbacks=[monitor], verbose=0, shuffle=False
            )
