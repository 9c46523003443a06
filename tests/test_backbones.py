"""Tests for nnclr_tf.backbones: shapes, parameter counts, stride placement, width, errors,
`.keras` round trip."""

import os
import tempfile

import keras
import numpy as np
from absl.testing import absltest, parameterized

from nnclr_tf import backbones
from nnclr_tf.batch_norm import BatchNormalization


def images(size, channels, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(size=(batch, size, size, channels)).astype(np.float32)


def expected_resnet_params(stage_blocks, channels, in_channels, stem_kernel):
    """Trainable parameters of a basic-block ResNet without the classifier, counted by hand."""
    bn = lambda c: 2 * c  # gamma and beta (the moving statistics are not trainable)
    total = stem_kernel * stem_kernel * in_channels * channels[0] + bn(channels[0])
    previous = channels[0]
    for stage, (blocks, c) in enumerate(zip(stage_blocks, channels)):
        for block in range(blocks):
            total += 9 * previous * c + bn(c) + 9 * c * c + bn(c)
            downsamples = stage > 0 and block == 0
            if downsamples or previous != c:  # 1x1 projection shortcut
                total += previous * c + bn(c)
            previous = c
    return total


def expected_bottleneck_params(stage_blocks, channels, in_channels, stem_kernel, expansion=4):
    """Trainable parameters of a bottleneck ResNet (v1.5, no conv biases) without the classifier."""
    bn = lambda c: 2 * c
    total = stem_kernel * stem_kernel * in_channels * channels[0] + bn(channels[0])
    previous = channels[0]
    for blocks, c in zip(stage_blocks, channels):
        for block in range(blocks):
            total += previous * c + bn(c) + 9 * c * c + bn(c) + c * expansion * c + bn(expansion * c)
            if block == 0:  # the first block of every stage changes the width: 1x1 projection
                total += previous * expansion * c + bn(expansion * c)
            previous = expansion * c
    return total


class BackboneTest(parameterized.TestCase):

    @parameterized.product(cifar_stem=(True, False), channels=(1, 3))
    def test_resnet18_output_shape(self, cifar_stem, channels):
        size = backbones.min_image_size("resnet18", cifar_stem) * 2
        model = backbones.build_backbone("resnet18", (size, size, channels), width_multiplier=0.125,
                                         cifar_stem=cifar_stem)
        features = model(images(size, channels), training=False)
        self.assertEqual(tuple(features.shape), (2, 64))
        self.assertEqual(model.output_shape, (None, 64))
        self.assertEqual(features.dtype, "float32")
        self.assertTrue(np.all(np.isfinite(features)))

    def test_resnet34_output_shape(self):
        model = backbones.build_backbone("resnet34", (16, 16, 3), width_multiplier=0.125,
                                         cifar_stem=True)
        self.assertEqual(tuple(model(images(16, 3)).shape), (2, 64))
        convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
        # stem + 2 per block over 3+4+6+3 blocks + 3 projection shortcuts
        self.assertLen(convs, 1 + 2 * 16 + 3)

    def test_resnet50_parameter_count_is_torchvisions(self):
        model = backbones.build_backbone("resnet50", (224, 224, 3))
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        self.assertEqual(trainable, expected_bottleneck_params((3, 4, 6, 3), (64, 128, 256, 512), 3,
                                                               stem_kernel=7))
        # torchvision's resnet50 (v1.5) has 25,557,032 parameters, of which the fc has 2,049,000.
        self.assertEqual(trainable, 25_557_032 - 2_049_000)
        self.assertEqual(model.output_shape, (None, 2048))

    def test_resnet50_strides_on_the_3x3_convs_and_no_conv_bias(self):
        model = backbones.build_backbone("resnet50", (64, 64, 3), width_multiplier=0.125)
        convs = [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]
        self.assertLen(convs, 1 + 3 * 16 + 4)  # stem, 3 per block, 4 projection shortcuts
        self.assertFalse(any(c.use_bias for c in convs))
        norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        self.assertLen(norms, len(convs))  # a batch norm after every convolution
        self.assertTrue(all(isinstance(n, BatchNormalization) for n in norms))  # the fused one
        for stage, blocks in enumerate((3, 4, 6, 3), start=1):
            for block in range(1, blocks + 1):
                name = f"stage{stage}_block{block}"
                stride = 2 if stage > 1 and block == 1 else 1
                for conv, kernel, strides in (("conv1", 1, 1), ("conv2", 3, stride), ("conv3", 1, 1)):
                    layer = model.get_layer(f"{name}_{conv}")
                    self.assertEqual((layer.kernel_size, layer.strides),
                                     ((kernel, kernel), (strides, strides)), layer.name)
                if block == 1:
                    shortcut = model.get_layer(f"{name}_shortcut_conv")
                    self.assertEqual((shortcut.kernel_size, shortcut.strides),
                                     ((1, 1), (stride, stride)))
        # ImageNet stem: /4; then /1, /2, /2, /2 at 4 x the stage's channels.
        for stage, (side, channels) in enumerate(((16, 32), (8, 64), (4, 128), (2, 256)), start=1):
            output = model.get_layer(f"stage{stage}_block1_out").output
            self.assertEqual(tuple(output.shape[1:]), (side, side, channels))

    @parameterized.parameters(True, False)
    def test_resnet50_last_norm_of_each_block_starts_at_zero(self, zero_init):
        model = backbones.build_backbone("resnet50", (32, 32, 1), width_multiplier=0.125,
                                         zero_init_residual=zero_init)
        norms = [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]
        self.assertTrue(all(l.synchronized for l in norms))
        zeroed = sorted(l.name for l in norms if not np.any(l.gamma.numpy()))
        expected = sorted(f"stage{s}_block{b}_bn3" for s, n in enumerate((3, 4, 6, 3), start=1)
                          for b in range(1, n + 1))
        self.assertEqual(zeroed, expected if zero_init else [])
        self.assertTrue(all(np.all(l.gamma.numpy() == 1.0) for l in norms if l.name not in zeroed))

    @parameterized.parameters((True, 8, 0.25), (False, 32, 0.5), (True, 16, 1.0))
    def test_resnet50_cifar_stem_and_width(self, cifar_stem, size, width):
        model = backbones.build_backbone("resnet50", (size, size, 3), width_multiplier=width,
                                         cifar_stem=cifar_stem)
        features = model(images(size, 3), training=False)
        self.assertEqual(tuple(features.shape), (2, int(2048 * width)))
        self.assertEqual(features.dtype, "float32")
        self.assertTrue(np.all(np.isfinite(features)))
        channels = tuple(backbones.scaled_channels(c, width) for c in (64, 128, 256, 512))
        expected = expected_bottleneck_params((3, 4, 6, 3), channels, 3,
                                              stem_kernel=3 if cifar_stem else 7)
        self.assertEqual(sum(int(np.prod(w.shape)) for w in model.trainable_weights), expected)
        last = model.get_layer("stage4_block3_out").output
        self.assertEqual(last.shape[1], size // backbones.min_image_size("resnet50", cifar_stem))

    def test_resnet18_parameter_count(self):
        model = backbones.build_backbone("resnet18", (64, 64, 3))
        trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
        expected = expected_resnet_params((2, 2, 2, 2), (64, 128, 256, 512), 3, stem_kernel=7)
        self.assertEqual(trainable, expected)
        # torchvision's resnet18 has 11,689,512 parameters, of which the 1000-way fc has 513,000.
        self.assertEqual(trainable, 11_689_512 - 513_000)

    @parameterized.parameters((0.25, (16, 32, 64, 128)), (0.5, (32, 64, 128, 256)),
                              (0.01, (8, 8, 8, 8)), (0.75, (48, 96, 192, 384)))
    def test_width_multiplier_scales_channels(self, width, channels):
        model = backbones.build_backbone("resnet18", (8, 8, 1), width_multiplier=width,
                                         cifar_stem=True)
        for stage, c in enumerate(channels, start=1):
            self.assertEqual(model.get_layer(f"stage{stage}_block2_conv2").filters, c)
        self.assertEqual(model.output_shape, (None, channels[-1]))
        expected = expected_resnet_params((2, 2, 2, 2), channels, 1, stem_kernel=3)
        self.assertEqual(sum(int(np.prod(w.shape)) for w in model.trainable_weights), expected)

    @parameterized.parameters(("resnet18", True, 8), ("resnet18", False, 32),
                              ("resnet34", True, 8), ("resnet50", False, 32), ("resnet50", True, 8))
    def test_min_image_size(self, name, cifar_stem, size):
        self.assertEqual(backbones.min_image_size(name, cifar_stem), size)

    @parameterized.parameters(True, False)
    def test_min_size_leaves_one_pixel(self, cifar_stem):
        size = backbones.min_image_size("resnet18", cifar_stem)
        model = backbones.resnet((size, size, 3), stage_blocks=(1, 1, 1, 1), width_multiplier=0.125,
                                 cifar_stem=cifar_stem)
        self.assertEqual(model.get_layer("stage4_block1_out").output.shape[1:3], (1, 1))
        with self.assertRaisesRegex(ValueError, "too small"):
            backbones.resnet((size - 1, size, 3), stage_blocks=(1, 1, 1, 1), cifar_stem=cifar_stem)

    @parameterized.named_parameters(
        ("unknown_name", dict(name="resnet101"), "Unknown backbone name='resnet101'"),
        ("two_channels", dict(input_shape=(32, 32, 2)), "1 \\(grayscale\\) or 3 \\(RGB\\)"),
        ("too_small", dict(input_shape=(16, 16, 3)), "too small .* at least 32x32"),
        ("too_small_r50", dict(name="resnet50", input_shape=(24, 24, 3)), "at least 32x32"),
        ("zero_width", dict(width_multiplier=0.0), "width_multiplier=0.0 must be positive"),
        ("negative_width", dict(width_multiplier=-1.0), "must be positive"),
        ("no_batch_dim", dict(input_shape=(32, 32)), "\\(height, width, channels\\)"),
        ("r50_zero_width", dict(name="resnet50", width_multiplier=0.0), "must be positive"),
        ("r50_too_small_cifar", dict(name="resnet50", input_shape=(4, 4, 3), cifar_stem=True),
         "at least 8x8"),
    )
    def test_invalid_arguments(self, overrides, message):
        args = dict(name="resnet18", input_shape=(32, 32, 3))
        args.update(overrides)
        with self.assertRaisesRegex(ValueError, message):
            backbones.build_backbone(**args)

    def test_unknown_name_in_min_image_size(self):
        with self.assertRaisesRegex(ValueError, "expected one of"):
            backbones.min_image_size("vit", False)

    @parameterized.parameters(True, False)
    def test_zero_init_residual(self, zero_init):
        model = backbones.resnet((8, 8, 3), stage_blocks=(1, 1), width_multiplier=0.125,
                                 cifar_stem=True, zero_init_residual=zero_init)
        gamma = model.get_layer("stage2_block1_bn2").gamma.numpy()
        np.testing.assert_array_equal(gamma, np.zeros_like(gamma) if zero_init else np.ones_like(gamma))
        np.testing.assert_array_equal(model.get_layer("stage2_block1_bn1").gamma.numpy(), 1.0)

    def test_keras_round_trip_safe_mode(self):
        model = backbones.build_backbone("resnet18", (16, 16, 3), width_multiplier=0.125,
                                         cifar_stem=True, synchronized_bn=True)
        # Non-trivial weights and statistics, so that a silent re-initialisation would show.
        model.set_weights([w + np.random.default_rng(i).normal(0, 0.1, w.shape).astype(w.dtype)
                           for i, w in enumerate(model.get_weights())])
        x = images(16, 3, batch=4)
        directory = tempfile.TemporaryDirectory()
        self.addCleanup(directory.cleanup)
        path = os.path.join(directory.name, "resnet18.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        np.testing.assert_array_equal(restored(x, training=False), model(x, training=False))
        self.assertEqual(restored.name, "resnet18")
        self.assertTrue(restored.get_layer("stem_bn").synchronized)


if __name__ == "__main__":
    absltest.main()
