"""Tests for the ImageNet-scale recipe: evaluation preprocessing shared by the pipeline and the
export, step counting under a dynamic loss scale, steps_per_execution, float32 similarities."""

import os
import pathlib
import shutil
import tempfile
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from absl.testing import absltest, parameterized
from PIL import Image

from conftest import run_nnclr, tiny_encoder
from nnclr_tf import data, distribute, export, losses, preprocessing, similarity, train
from nnclr_tf.callbacks import CheckpointCallback
from nnclr_tf.model import NNCLR
from nnclr_tf.support_set import SupportSet
from test_train import tiny

_RNG = np.random.default_rng(0)


def _pil_resize_and_crop(image, size, crop):
    """Independent reference: PIL's float bilinear resize per channel to `size` (width, height),
    then the `crop` box (left, top, right, bottom); image uint8 [H, W, C] -> float32 in [0, 1]."""
    channels = []
    for c in range(image.shape[-1]):
        plane = Image.fromarray(image[..., c].astype(np.float32) / 255, "F")
        channels.append(np.asarray(plane.resize(size, Image.BILINEAR, reducing_gap=None)))
    left, top, right, bottom = crop
    return np.stack(channels, -1)[top:bottom, left:right]


class EvalPreprocessingTest(parameterized.TestCase):
    def setUp(self):
        super().setUp()
        self.root = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.root, True)

    def _pipeline_image(self, image, image_size):
        """The evaluation data pipeline's output for one PNG image in a folder dataset."""
        os.makedirs(os.path.join(self.root, "a"))
        Image.fromarray(image).save(os.path.join(self.root, "a", "x.png"))
        images, _ = next(iter(data.evaluation_dataset(self.root, "all", batch_size=1,
                                                      image_size=image_size)))
        return images[0].numpy()

    def test_photo_is_resized_to_256_and_centre_cropped_to_224(self):
        image = _RNG.integers(0, 256, (375, 500, 3), dtype=np.uint8)  # 500 wide, 375 high
        # Shorter side 375 -> 256 (224 / 0.875); longer 500 * 256 / 375 = 341.3 -> 341; the centre
        # 224 square starts (256 - 224) // 2 = 16 rows and (341 - 224) // 2 = 58 columns in.
        expected = _pil_resize_and_crop(image, (341, 256), (58, 16, 58 + 224, 16 + 224))
        from_pipeline = self._pipeline_image(image, 224)
        from_export = export.preprocess_for_eval(image, 224).numpy()
        self.assertEqual(from_pipeline.shape, (224, 224, 3))
        # PIL and TF resample the same triangle filter; they differ by float round-off only.
        np.testing.assert_allclose(from_pipeline, expected, atol=1e-4)
        np.testing.assert_allclose(from_export, from_pipeline, atol=1e-6)

    @parameterized.parameters(64, 160)
    def test_crop_fraction_is_0_875_at_any_size(self, image_size):
        image = _RNG.integers(0, 256, (300, 400, 3), dtype=np.uint8)
        shorter = round(image_size / 0.875)
        longer = round(400 * shorter / 300)
        top, left = (shorter - image_size) // 2, (longer - image_size) // 2
        expected = _pil_resize_and_crop(image, (longer, shorter),
                                        (left, top, left + image_size, top + image_size))
        out = preprocessing.resize_and_centre_crop(tf.constant(image, tf.float32) / 255,
                                                   image_size)
        np.testing.assert_allclose(out.numpy(), expected, atol=1e-4)

    def test_small_images_keep_their_whole_frame(self):
        # Fashion-MNIST upsampled 28 -> 56 (the fmnist_cpu preset): resized whole, no margin cut.
        image = _RNG.integers(0, 256, (28, 28, 1), dtype=np.uint8)
        expected = _pil_resize_and_crop(image, (56, 56), (0, 0, 56, 56))
        np.testing.assert_allclose(self._pipeline_image(image[..., 0], 56)[..., :1], expected,
                                   atol=1e-4)

    def test_image_at_the_target_size_is_untouched(self):
        image = _RNG.random((2, 32, 32, 3)).astype(np.float32)
        out = preprocessing.resize_and_centre_crop(tf.constant(image), 32)
        np.testing.assert_array_equal(out.numpy(), image)


def _tiny_nnclr(**kwargs):
    keras.utils.set_random_seed(0)
    return NNCLR(tiny_encoder((16, 16, 3)), projection_hidden_dims=(32,), projection_dim=16,
                 prediction_hidden_dims=(32,), queue_size=48, **kwargs)


def _views(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.random((2, n, 16, 16, 3), dtype=np.float32))


class StepCountTest(parameterized.TestCase):
    def test_step_advances_on_steps_the_loss_scale_skips(self):
        model = _tiny_nnclr()
        # A loss scale near float32's maximum makes the scaled gradients overflow: the update is
        # skipped and the scale halved, step after step, until it fits.
        initial = 2.0**127
        model.compile(optimizer=keras.optimizers.LossScaleOptimizer(
            keras.optimizers.SGD(0.1), initial_scale=initial))
        model.fit(_views(), batch_size=8, epochs=1, steps_per_epoch=4, verbose=0)
        skipped = int(round(np.log2(initial / float(model.optimizer.dynamic_scale.numpy()))))
        self.assertGreaterEqual(skipped, 1)
        self.assertEqual(int(model.optimizer.iterations.numpy()), 4)

    def test_step_counts_ordinary_steps_once(self):
        model = _tiny_nnclr()
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        model.fit(_views(), batch_size=8, epochs=1, steps_per_epoch=3, verbose=0)
        self.assertEqual(int(model.optimizer.iterations.numpy()), 3)


class AutoPrecisionTest(parameterized.TestCase):
    @parameterized.parameters(
        (True, [], False, "mixed_bfloat16"),              # TPU
        (False, [(8, 0)], False, "mixed_bfloat16"),       # A100
        (False, [(9, 0)] * 8, False, "mixed_bfloat16"),   # 8 x H100
        (False, [(7, 0)], False, "mixed_float16"),        # V100
        (False, [(8, 6), (7, 5)], False, "mixed_float16"),  # one older GPU decides
        (False, [None], False, "mixed_float16"),          # capability unknown
        (False, [], True, "mixed_bfloat16"),              # AMX CPU
        (False, [], False, "float32"),                    # other CPU
    )
    def test_auto_precision(self, on_tpu, gpus, amx, expected):
        self.assertEqual(distribute.auto_precision(on_tpu, gpus, amx), expected)


class StepsPerExecutionTest(parameterized.TestCase):
    @parameterized.parameters((0, False, False, 1), (0, True, False, 32), (5, True, False, 5),
                              (5, False, False, 5), (0, True, True, 1), (5, True, True, 1))
    def test_resolved_per_platform(self, requested, accelerator, mirrored, expected):
        self.assertEqual(
            distribute.resolve_steps_per_execution(requested, accelerator, mirrored), expected)

    def test_cpu_strategies_are_not_accelerators(self):
        self.assertFalse(distribute.on_accelerator(tf.distribute.get_strategy()))

    @parameterized.parameters(
        (0, 30, 10, 5, [(0, 3, 10)]),                         # 5 divides the epoch: one call
        (0, 30, 10, 4, [(0, 1, 10), (1, 2, 10), (2, 3, 10)]),  # else one call per epoch
        (13, 30, 10, 4, [(1, 2, 7), (2, 3, 10)]),
    )
    def test_segments(self, start, total, per_epoch, per_execution, expected):
        self.assertEqual(train.plan_segments(start, total, per_epoch, per_execution), expected)

    @parameterized.parameters(
        # (steps per execution, steps per epoch, checkpoint every, executions, saved at,
        #  loss check every, loss read at)
        (1, 100, 2, 7, [2, 4, 6], 1, [1, 2, 3, 4, 5, 6, 7]),
        (2, 100, 4, 5, [4, 8], 1, [2, 4, 6, 8, 10]),  # divides: exactly at the multiples
        (3, 100, 4, 5, [6, 9, 12], 1, [3, 6, 9, 12, 15]),  # first execution end past 4, 8, 12
        (3, 7, 4, 5, [6, 10, 13], 1, [3, 6, 7, 10, 13]),  # epochs of 7: ends 3, 6, 7, 10, 13
        (1, 100, 6, 13, [6, 12], 4, [4, 6, 8, 12]),  # mirrored GPUs: one read per 4 (32) steps
    )
    def test_checkpoint_and_loss_read_rule(self, per_execution, steps, every, executions,
                                           expected, check_every, expected_reads):
        reads, saved = [], []

        class Loss:
            def __float__(self):
                reads.append(callback.step)
                return 1.0

        class Manager:
            latest_checkpoint = None

            def save(self, checkpoint_number):
                del checkpoint_number  # the optimizer's step; this fake model has none
                saved.append(callback.step)

        model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", steps_per_execution=per_execution)
        callback = CheckpointCallback(Manager(), every_steps=every, loss_check_steps=check_every)
        callback.set_model(model)
        callback.set_params({"steps": steps})
        callback.on_train_begin()
        batch, epoch = 0, 0
        callback.on_epoch_begin(epoch)
        for _ in range(executions):
            if batch >= steps:
                batch, epoch = 0, epoch + 1
                callback.on_epoch_end(epoch - 1)
                callback.on_epoch_begin(epoch)
            callback.on_train_batch_end(batch + per_execution - 1, {"loss": Loss()})
            batch += per_execution
        self.assertEqual(saved, expected)
        self.assertEqual(reads, expected_reads)  # at most one read of the loss per execution

    def test_checkpoints_land_by_the_rule_and_training_stops_at_its_step(self):
        with tempfile.TemporaryDirectory() as folder:
            config = tiny(pathlib.Path(folder), **{
                "optim.train_steps": "7", "run.steps_per_execution": "3",
                "run.checkpoint_every_steps": "2", "run.keep_checkpoints": "10"})
            result = train.pretrain(config, verbose=0)
            self.assertEqual(int(result.model.optimizer.iterations.numpy()), 7)
            state = tf.train.get_checkpoint_state(os.path.join(folder, "run", "checkpoints"))
            steps = [int(p.rsplit("-", 1)[1]) for p in state.all_model_checkpoint_paths]
        # Executions end at 3, 6 and 7 (the data end there): 2 is passed at 3, 4 and 6 at 6;
        # the last step is saved at the end.
        self.assertEqual(steps, [3, 6, 7])


def _bfloat16_pass(a, b, transpose_b=False):
    """A TPU's default float32 matmul: inputs rounded to bfloat16, products summed in float32."""
    rounded = [tf.cast(tf.cast(x, tf.bfloat16), tf.float32) for x in (a, b)]
    return tf.matmul(*rounded, transpose_b=transpose_b)


def _unit_rows(n, dim, seed):
    x = np.random.default_rng(seed).normal(size=(n, dim))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Float32SimilarityTest(parameterized.TestCase):
    @parameterized.parameters(
        (True, False, False, True), (False, True, True, True), (False, True, False, False),
        (False, False, True, False))
    def test_split_where_matmuls_round(self, tpu, gpu, tf32, expected):
        self.assertEqual(similarity.reduced_precision_matmuls(tpu, gpu, tf32), expected)

    def test_split_product_is_float32_on_a_bfloat16_device(self):
        a, b = _unit_rows(64, 256, 0), _unit_rows(96, 256, 1)
        expected = a @ b.T
        with mock.patch.object(similarity, "_device_matmul", _bfloat16_pass):
            rounded = similarity.float32_matmul(a, b, transpose_b=True, split=False).numpy()
            split = similarity.float32_matmul(a, b, transpose_b=True, split=True).numpy()
        self.assertGreater(np.abs(rounded - expected).max(), 2e-4)  # what the device gives
        np.testing.assert_allclose(split, expected, atol=2e-5)

    def test_loss_logits_and_lookup_keep_float32_precision_under_mixed_bfloat16(self):
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
        dim = 128
        # Pairs of queue rows around 32 centres, each query nearer the first of its pair by
        # ~1e-4 in cosine: finer than a bfloat16 product resolves (it picks 65 % right).
        unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
        centres, u, v = (_unit_rows(32, dim, seed) for seed in (2, 3, 4))
        bank = np.empty((64, dim))
        bank[0::2], bank[1::2] = unit(centres + 0.02 * u), unit(centres + 0.02 * v)
        queries = unit(centres + 0.02 * (0.6 * u + 0.4 * v))
        expected_nn = np.argmax(queries @ bank.T, axis=1)
        np.testing.assert_array_equal(expected_nn, np.arange(0, 64, 2))
        support_set = SupportSet(64, dim)
        support_set.enqueue(tf.constant(bank, tf.float32))
        anchors = tf.constant(queries[:8], tf.bfloat16)
        predictions = tf.constant(_unit_rows(8, dim, 5), tf.bfloat16)
        a, p = (tf.cast(x, tf.float64).numpy() for x in (anchors, predictions))
        a, p = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (a, p))
        reference = a @ p.T / 0.1
        with mock.patch.object(similarity, "_device_matmul", _bfloat16_pass), \
                mock.patch.object(similarity, "_platform_rounds_matmuls", lambda: True):
            logits, _ = losses._logits(anchors, predictions, 0.1, None, 0)
            # z reaches the lookup in float32 (NNCLR._embed casts it).
            neighbours = support_set.nearest_neighbour(tf.constant(queries, tf.float32))
        self.assertEqual(logits.dtype, tf.float32)
        self.assertEqual(neighbours.dtype, tf.float32)
        np.testing.assert_allclose(logits.numpy(), reference, atol=2e-4)  # bf16: ~1e-3
        np.testing.assert_array_equal(np.argmax(neighbours.numpy() @ bank.T, axis=1), expected_nn)

class XlaAssignStepTest(parameterized.TestCase):
    """The TPU path (queue writes by assign, XLA) on CPU, one replica: the same step. Two logical
    CPU replicas cannot run it: Keras compiles all replicas' step into one XLA program
    (keras-team/keras#19005), so training turns XLA off there (`resolve_jit_compile`)."""

    @parameterized.parameters((True, 1, False, True), (True, 8, False, False),
                              (True, 8, True, True), (False, 1, False, False))
    def test_jit_compile_only_where_keras_can(self, requested, replicas, tpu, expected):
        self.assertEqual(distribute.resolve_jit_compile(requested, replicas, tpu), expected)

    def _trained(self, steps, **kwargs):
        model = _tiny_nnclr(**{k: v for k, v in kwargs.items() if k == "queue_write_mode"})
        model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                      jit_compile=kwargs.get("jit_compile", False))
        # As train.pretrain does: slots made before fit, not in its first trace (which would
        # then be redone).
        model.optimizer.build(model.trainable_variables)
        # A queue 40 rows full (of 48), so that the lookup and the wrap-around write matter.
        model.support_set.enqueue(tf.constant(_unit_rows(40, 16, 6), tf.float32))
        traces = []
        step = model.train_step

        def counting_step(data):
            traces.append(1)  # Python runs at trace time only
            return step(data)

        model.train_step = counting_step
        history = model.fit(_views(n=8 * steps), batch_size=8, epochs=1, shuffle=False,
                            verbose=0).history
        return model, history["loss"][0], len(traces)

    def test_xla_assign_step_equals_the_default_step(self):
        default, default_loss, _ = self._trained(1)
        xla, xla_loss, _ = self._trained(1, queue_write_mode="assign", jit_compile=True)
        self.assertEqual(xla.support_set.write_mode, "assign")
        # XLA fuses and reorders float32 arithmetic: equal to round-off.
        np.testing.assert_allclose(xla_loss, default_loss, rtol=1e-5)
        self.assertEqual(int(xla.support_set.count.numpy()), 48)
        np.testing.assert_allclose(xla.support_set.embeddings.numpy(),
                                   default.support_set.embeddings.numpy(), atol=1e-5)
        for a, b in zip(xla.weights, default.weights):
            np.testing.assert_allclose(np.asarray(a.value), np.asarray(b.value), atol=1e-5,
                                       err_msg=a.path)

    @parameterized.parameters(({},), ({"queue_write_mode": "assign", "jit_compile": True},))
    def test_step_is_traced_once(self, kwargs):
        # Static shapes: one trace for 5 steps, the queue filling and wrapping around included.
        model, _, traces = self._trained(5, **kwargs)
        self.assertEqual(int(model.support_set.count.numpy()), 80)
        self.assertEqual(traces, 1)

@pytest.mark.slow
def test_two_mirrored_replicas_fall_back_to_no_xla_and_one_step_per_execution(
        tmp_path, embedded_data_dir):
    done = run_nnclr("pretrain", "--preset=tiny", "--strategy=mirrored", "--cpu_replicas=2",
                     "--jit_compile", "--model_dir=run", "--train_steps=5", "--batch_size=16",
                     "--queue_size=64", "--set=run.export=false", "--set=run.report=false",
                     "--set=run.steps_per_execution=3", "--set=run.keep_checkpoints=10",
                     cwd=tmp_path, data_dir=embedded_data_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    output = done.stderr + done.stdout
    assert "run.jit_compile is off" in output
    assert "run.steps_per_execution=3 is 1 under 2 mirrored replicas" in output
    saved = sorted(int(name[5:-6]) for name in os.listdir(tmp_path / "run" / "checkpoints")
                   if name.endswith(".index"))
    assert saved == [2, 4, 5]  # every 2 steps, one step per execution, and the last

if __name__ == "__main__":
    absltest.main()
