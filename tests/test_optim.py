"""Tests for nnclr_tf.optim: LARS against a NumPy reference, the schedule, serialization."""

import math
import os
import tempfile

import keras
import numpy as np
import tensorflow as tf
from absl.testing import absltest, parameterized

from nnclr_tf import optim

LR, MOMENTUM, WD, ETA = 0.5, 0.9, 1e-2, 0.001  # a large decay so that its effect is visible


def reference_lars(weights, grads_per_step, adapted, lr=LR, momentum=MOMENTUM, wd=WD, eta=ETA,
                   eps=0.0, nesterov=False):
    """Independent NumPy LARS (SimCLR form). weights: list of arrays; adapted: list of bools."""
    weights = [w.astype(np.float64).copy() for w in weights]
    velocities = [np.zeros_like(w) for w in weights]
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(weights, grads)):
            g = g.astype(np.float64)
            ratio = 1.0
            if adapted[i]:
                g = g + wd * w
                w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
                if w_norm > 0 and g_norm > 0:
                    ratio = eta * w_norm / (g_norm + eps)
            velocities[i] = momentum * velocities[i] + lr * ratio * g
            update = momentum * velocities[i] + lr * ratio * g if nesterov else velocities[i]
            weights[i] = w - update
    return weights


def make_problem(seed=0, steps=3, zero_kernel=False):
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(3, 4)).astype(np.float32)
    if zero_kernel:
        kernel[:] = 0
    bias = rng.normal(size=(4,)).astype(np.float32)
    gamma = (1.0 + 0.1 * rng.normal(size=(4,))).astype(np.float32)
    initial = [kernel, bias, gamma]
    grads = [[rng.normal(size=w.shape).astype(np.float32) for w in initial] for _ in range(steps)]
    return initial, grads


def run_keras(optimizer, initial, grads_per_step, exclude=()):
    variables = [keras.Variable(w) for w in initial]
    if exclude:
        optimizer.exclude_from_adaptation([variables[i] for i in exclude])
    for grads in grads_per_step:
        optimizer.apply([tf.constant(g) for g in grads], variables)
    return [v.numpy() for v in variables]


class LARSTest(parameterized.TestCase):

    @parameterized.named_parameters(
        ("default", False, True, ()),
        ("nesterov", True, True, ()),
        ("rank_1_adapted", False, False, ()),
        ("kernel_excluded", False, True, (0,)),
        ("gamma_excluded_nesterov", True, False, (2,)),
    )
    def test_matches_numpy_reference(self, nesterov, exclude_rank_1, exclude):
        initial, grads = make_problem()
        optimizer = optim.LARS(LR, momentum=MOMENTUM, weight_decay=WD, trust_coefficient=ETA,
                               nesterov=nesterov, exclude_rank_1=exclude_rank_1)
        got = run_keras(optimizer, initial, grads, exclude)
        adapted = [i not in exclude and (w.ndim > 1 or not exclude_rank_1)
                   for i, w in enumerate(initial)]
        want = reference_lars(initial, grads, adapted, nesterov=nesterov)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-5, atol=1e-7)
        # The adapted kernel must move much less than the raw learning rate would move it.
        self.assertNotAlmostEqual(float(np.abs(got[0] - initial[0]).max()), 0.0)

    def test_epsilon(self):
        initial, grads = make_problem(seed=1)
        got = run_keras(optim.LARS(LR, weight_decay=WD, epsilon=0.5), initial, grads)
        want = reference_lars(initial, grads, [True, False, False], eps=0.5)
        np.testing.assert_allclose(got[0], want[0], rtol=2e-5)

    def test_zero_weights_use_trust_ratio_one(self):
        initial, grads = make_problem(zero_kernel=True, steps=1)
        got = run_keras(optim.LARS(LR, weight_decay=WD), initial, grads)
        # ||w|| = 0: the first step is plain SGD with the raw learning rate.
        np.testing.assert_allclose(got[0], -LR * grads[0][0], rtol=1e-6)

    def test_zero_gradient_and_decay_leave_weights(self):
        initial, _ = make_problem()
        zeros = [[np.zeros_like(w) for w in initial]]
        got = run_keras(optim.LARS(LR, weight_decay=0.0), initial, zeros)
        for g, w in zip(got, initial):
            np.testing.assert_array_equal(g, w)

    def test_weight_decay_is_coupled_not_decoupled(self):
        # With a zero gradient only the L2 term acts, scaled by the trust ratio (= eta here:
        # ||w|| / ||wd * w|| = 1 / wd), so the kernel shrinks by lr * eta * ||w|| in norm.
        initial, _ = make_problem()
        zeros = [[np.zeros_like(w) for w in initial]]
        got = run_keras(optim.LARS(LR, weight_decay=WD), initial, zeros)
        norm = np.linalg.norm(initial[0])
        np.testing.assert_allclose(np.linalg.norm(got[0]), norm - LR * ETA * norm, rtol=1e-5)
        np.testing.assert_array_equal(got[1], initial[1])  # the bias gets no decay

    def test_mirrored_strategy_exclusion(self):
        initial, grads = make_problem(seed=2)
        strategy = tf.distribute.MirroredStrategy()
        with strategy.scope():
            optimizer = optim.LARS(LR, weight_decay=WD)
            variables = [keras.Variable(w) for w in initial]
            optimizer.exclude_from_adaptation(variables[:1])
            optimizer.build(variables)  # slots must be created in cross-replica context

        @tf.function
        def step(gs):
            # tf.identity places the gradients on the replica's device, as a real step would.
            strategy.run(lambda: optimizer.apply([tf.identity(g) for g in gs], variables))

        for g in grads:
            step([tf.constant(x) for x in g])
        want = reference_lars(initial, grads, [False, False, False])
        for v, w in zip(variables, want):
            np.testing.assert_allclose(v.numpy(), w, rtol=2e-5)

    def test_exclusion_after_build_raises(self):
        optimizer = optim.LARS(LR)
        variable = keras.Variable(np.ones((2, 2), np.float32))
        optimizer.build([variable])
        with self.assertRaisesRegex(ValueError, "before the first training step"):
            optimizer.exclude_from_adaptation([variable])
        with self.assertRaisesRegex(ValueError, "exclude_from_adaptation"):
            optimizer.exclude_from_weight_decay(var_names=["bias"])

    @parameterized.parameters(
        dict(momentum=1.5), dict(weight_decay=-1.0), dict(trust_coefficient=0.0), dict(epsilon=-1.0)
    )
    def test_invalid_arguments(self, **kwargs):
        with self.assertRaisesRegex(ValueError, "LARS"):
            optim.LARS(0.1, **kwargs)

    def test_serialization_round_trip(self):
        schedule = optim.WarmupCosine(0.3, 512, total_steps=100, warmup_steps=10, scaling="sqrt")
        optimizer = optim.LARS(schedule, momentum=0.8, weight_decay=1e-5, trust_coefficient=0.02,
                               epsilon=1e-9, nesterov=True, exclude_rank_1=False)
        restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
        self.assertIsInstance(restored, optim.LARS)
        self.assertEqual(restored.get_config(), optimizer.get_config())
        self.assertIsNone(restored.weight_decay)  # Keras' decoupled decay stays off
        self.assertEqual(restored.lars_weight_decay, 1e-5)
        self.assertIsInstance(restored._learning_rate, optim.WarmupCosine)
        self.assertEqual(restored._learning_rate.get_config(), schedule.get_config())

    def test_fit_decreases_regression_loss(self):
        keras.utils.set_random_seed(0)
        x = np.random.default_rng(0).normal(size=(256, 8)).astype(np.float32)
        y = x @ np.linspace(-1, 1, 8, dtype=np.float32)[:, None] + 0.5
        model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                                  keras.layers.Dense(1)])
        # Biases are excluded (raw learning rate); the kernels move by ~lr * trust * ||w|| per step.
        optimizer = optim.LARS(0.05, trust_coefficient=0.1, weight_decay=1e-6)
        model.compile(optimizer=optimizer, loss="mse")
        history = model.fit(x, y, batch_size=32, epochs=4, verbose=0)
        losses = history.history["loss"]
        self.assertLess(losses[-1], 0.25 * losses[0])

        # The compiled optimizer and its momentum slots survive a `.keras` round trip.
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "model.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertIsInstance(restored.optimizer, optim.LARS)
        self.assertEqual(restored.optimizer.get_config(), optimizer.get_config())
        for a, b in zip(restored.optimizer.momentums, optimizer.momentums):
            np.testing.assert_array_equal(a.numpy(), b.numpy())


class WarmupCosineTest(parameterized.TestCase):

    @parameterized.parameters(("linear", 0.3, 512), ("sqrt", 0.075, 512), ("none", 0.1, 64))
    def test_values_match_numpy(self, scaling, base, batch):
        total, warmup = 1000, 100
        schedule = optim.WarmupCosine(base, batch, total_steps=total, warmup_steps=warmup,
                                      scaling=scaling)
        peak = {"linear": base * batch / 256, "sqrt": base * math.sqrt(batch), "none": base}[scaling]
        self.assertAlmostEqual(schedule.peak_learning_rate, peak, places=6)
        mid_cosine = warmup + (total - warmup) // 2
        expected = {
            0: 0.0,
            warmup // 2: peak * 0.5,
            warmup: peak,
            mid_cosine: peak * 0.5 * (1 + np.cos(np.pi * (mid_cosine - warmup) / (total - warmup))),
            total: 0.0,
            total + 50: 0.0,
        }
        for step, want in expected.items():
            got = float(schedule(step))
            self.assertAlmostEqual(got, want, places=5, msg=f"step {step}")
        np.testing.assert_allclose(float(schedule(mid_cosine)), peak * 0.5, rtol=1e-5)

    def test_no_warmup_starts_at_peak(self):
        schedule = optim.WarmupCosine(0.1, 256, total_steps=10, warmup_steps=0)
        self.assertAlmostEqual(float(schedule(0)), 0.1, places=6)

    def test_works_with_tensor_steps_in_graph(self):
        schedule = optim.WarmupCosine(0.1, 256, total_steps=10, warmup_steps=2)
        values = tf.function(lambda s: schedule(s))(tf.constant(1, tf.int64))
        self.assertAlmostEqual(float(values), 0.05, places=6)

    def test_serialization_round_trip(self):
        schedule = optim.WarmupCosine(0.3, 4096, total_steps=500, warmup_steps=50)
        restored = keras.optimizers.schedules.deserialize(
            keras.optimizers.schedules.serialize(schedule))
        self.assertEqual(restored.get_config(), schedule.get_config())
        for step in (0, 25, 50, 300):
            self.assertEqual(float(restored(step)), float(schedule(step)))

    @parameterized.parameters(
        dict(scaling="cubic"), dict(total_steps=0), dict(warmup_steps=20), dict(batch_size=0)
    )
    def test_invalid_arguments(self, **kwargs):
        args = dict(base_learning_rate=0.1, batch_size=256, total_steps=10, warmup_steps=1)
        args.update(kwargs)
        with self.assertRaises(ValueError):
            optim.WarmupCosine(**args)


class BuildOptimizerTest(parameterized.TestCase):

    @parameterized.parameters(("lars", optim.LARS), ("sgd", keras.optimizers.SGD),
                              ("adamw", keras.optimizers.AdamW))
    def test_names(self, name, cls):
        optimizer = optim.build_optimizer(name, 1, weight_decay=1e-4, momentum=0.9)
        self.assertIsInstance(optimizer, cls)
        self.assertAlmostEqual(float(optimizer.learning_rate), 1.0)

    def test_unknown_name(self):
        with self.assertRaisesRegex(ValueError, "Unknown optimizer name='adam'"):
            optim.build_optimizer("adam", 0.1)


if __name__ == "__main__":
    absltest.main()
