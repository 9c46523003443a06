"""The encoder converted to TFLite, run in the LiteRT (or tf.lite) interpreter, against TensorFlow."""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import nnclr_tf
from conftest import tiny_encoder
from nnclr_tf import export_formats

# Measured on the demo encoder: LiteRT 1.1e-6 on features, 2.7e-7 on embeddings (float32 kernels).
TOLERANCE = 1e-4


def test_tflite_agrees_with_tensorflow_on_uint8_images(tmp_path):
    keras.utils.set_random_seed(0)
    saved = nnclr_tf.export_encoder(tiny_encoder((16, 16, 3)), str(tmp_path / "encoder"),
                                    image_size=16, channels=3,
                                    projection_head=keras.layers.Dense(8))
    path = export_formats.write_tflite(saved, str(tmp_path / "out" / "encoder.tflite"))
    run = export_formats.tflite_runner(path)
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    got = run(images)
    expected = nnclr_tf.load_encoder(saved).embed_float(tf.cast(images, tf.float32) / 255.0)
    for name in ("features", "embeddings"):
        assert got[name].shape == tuple(expected[name].shape)
        np.testing.assert_allclose(got[name], expected[name].numpy(), atol=TOLERANCE)
    assert np.std(got["features"], axis=0).max() > 1e-3  # rows differ: not a constant output
    _assert_refuses_other_inputs(run, "TFLite", "16, 16, 3")


def _assert_refuses_other_inputs(run, runtime, shape):
    """Float pixels, another size and an unbatched image each get one sentence naming the input.
    Unchecked, LiteRT runs another size (other features) and reads [S, S, C] as S images, and
    casting floats in [0, 1] to uint8 would make them black."""
    images = np.zeros((2, 16, 16, int(shape[-1])), np.uint8)
    for wrong, got in [(images.astype(np.float32) / 255, "float32 [2, 16, 16"),
                       (np.zeros((2, 32, 32, int(shape[-1])), np.uint8), "uint8 [2, 32, 32"),
                       (images[0], "uint8 [16, 16")]:
        with pytest.raises(ValueError, match=rf"^The {runtime} encoder takes uint8 images "
                                             rf"\[N, {shape}\] .*, got {re.escape(got)}"):
            run(wrong)


def test_onnx_agrees_with_tensorflow_on_uint8_images(tmp_path):
    keras.utils.set_random_seed(1)
    saved = nnclr_tf.export_encoder(tiny_encoder((16, 16, 1)), str(tmp_path / "encoder"),
                                    image_size=16, channels=1)
    path = export_formats.write_onnx(saved, str(tmp_path / "encoder.onnx"))
    images = np.random.default_rng(1).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    got = export_formats.onnx_runner(path)(images)
    expected = nnclr_tf.load_encoder(saved).embed_float(tf.cast(images, tf.float32) / 255.0)
    for name in ("features", "embeddings"):
        np.testing.assert_allclose(got[name], expected[name].numpy(), atol=TOLERANCE)
    _assert_refuses_other_inputs(export_formats.onnx_runner(path), "ONNX", "16, 16, 1")
