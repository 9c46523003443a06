"""The Python API as a Keras user in a notebook meets it: what it takes, and what it refuses.

Each test is one promise of the API, run as a user would (fit, save, load, the standalone pieces).
Fresh interpreters (subprocess) where import order or the process's dtype policy matters.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import tiny_encoder

import nnclr_tf
from nnclr_tf.augment import view_augmenter
from nnclr_tf.support_set import SupportSet

SEED = tf.constant([3, 4], tf.int64)


def small_nnclr(encoder=None, **kwargs):
    kwargs = dict(dict(projection_hidden_dims=(16,), projection_dim=8, prediction_hidden_dims=(16,),
                       queue_size=32), **kwargs)
    return nnclr_tf.NNCLR(encoder if encoder is not None else tiny_encoder(), **kwargs)


def views(batch=4, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random((batch, size, size, 3), dtype=np.float32),
            rng.random((batch, size, size, 3), dtype=np.float32))


def run_python(code, cwd, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


# 1. view_augmenter's input contract.

def test_uint8_images_give_the_views_of_the_same_images_in_0_1():
    pixels = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
    augmenter = view_augmenter(1, 28, channels=1)
    from_uint8 = augmenter(pixels, seed=SEED).numpy()
    from_floats = augmenter(pixels.astype(np.float32) / 255.0, seed=SEED).numpy()
    np.testing.assert_allclose(from_uint8, from_floats, atol=1e-6)
    assert (from_uint8 == 1.0).mean() < 0.05  # not saturated


def test_value_range_0_255_maps_float_pixels_to_0_1():
    pixels = np.random.default_rng(1).random((4, 16, 16, 3), dtype=np.float32)
    unit = view_augmenter(2, 16)(pixels, seed=SEED).numpy()
    wide = view_augmenter(2, 16, value_range=(0, 255))(pixels * 255.0, seed=SEED).numpy()
    np.testing.assert_allclose(wide, unit, atol=1e-5)


@pytest.mark.parametrize("pixels", [np.full((2, 16, 16, 3), 255.0, np.float32),
                                    np.full((2, 16, 16, 3), -1.0, np.float32)])
def test_floats_outside_value_range_are_refused_eagerly(pixels):
    with pytest.raises(ValueError, match=r"outside value_range=\(0, 1\)"):
        view_augmenter(1, 16)(pixels)


def test_floats_outside_value_range_are_refused_in_tf_data():
    ds = tf.data.Dataset.from_tensor_slices(np.full((4, 16, 16, 3), 255.0, np.float32)).batch(2)
    augmenter = view_augmenter(1, 16)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside value_range"):
        list(ds.map(augmenter))


# 2. SupportSet.enqueue checks the rows' width on every path.

@pytest.mark.parametrize("write_mode", ["scatter", "assign"])
@pytest.mark.parametrize("shape", [[2, 3], [2, 6], [2, 2, 4]])
def test_enqueue_refuses_rows_of_the_wrong_width_eagerly(write_mode, shape):
    support_set = SupportSet(8, 4, write_mode=write_mode)
    with pytest.raises(ValueError, match=r"expected \[batch, 4\]"):
        support_set.enqueue(tf.ones(shape))
    assert int(support_set.count) == 0
    np.testing.assert_array_equal(support_set.embeddings.numpy(), 0)


@pytest.mark.parametrize("write_mode", ["scatter", "assign"])
def test_enqueue_refuses_rows_of_the_wrong_width_in_a_graph(write_mode):
    support_set = SupportSet(8, 4, write_mode=write_mode)
    enqueue = tf.function(support_set.enqueue, input_signature=[tf.TensorSpec([None, None])])
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected shape \[\?,4\]"):
        enqueue(tf.ones([2, 6]))
    assert int(support_set.count) == 0
    enqueue(tf.ones([2, 4]))
    assert int(support_set.count) == 2


def test_enqueue_refuses_a_label_count_that_differs_from_the_rows():
    with pytest.raises(ValueError, match="2 rows but 3 labels"):
        SupportSet(8, 4).enqueue(tf.ones([2, 4]), labels=[0, 1, 2])


# 12.12: a SupportSet works as constructed, as its docstring shows.

def test_a_fresh_support_set_enqueues_and_looks_up():
    support_set = SupportSet(size=16, dim=4)
    rows = tf.math.l2_normalize(tf.random.normal([3, 4], seed=1), axis=-1)
    support_set.enqueue(rows, labels=[5, 6, 7])
    neighbours, labels = support_set.nearest_neighbour(rows, return_labels=True)
    np.testing.assert_allclose(neighbours.numpy(), rows.numpy(), atol=1e-6)
    np.testing.assert_array_equal(labels.numpy(), [5, 6, 7])


# 3. A model saved under mixed_bfloat16 reloads with the policies it was saved with.

def test_mixed_precision_survives_a_reload_in_a_float32_process(tmp_path):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = small_nnclr(num_classes=3)
    finally:
        keras.config.set_dtype_policy(previous)
    model.compile(optimizer=nnclr_tf.LARS(0.1))
    model.fit(views(), epochs=1, verbose=0)  # the optimizer's state is saved too
    # Paths without the model's name, which Keras numbers per process (nnclr, nnclr_1, ...).
    saved = {(layer.path or layer.name).removeprefix(f"{model.name}/"): layer.dtype_policy.name
             for layer in model._flatten_layers()}
    assert saved["projection_head/dense_0"] == "mixed_bfloat16"
    model.save(tmp_path / "nnclr.keras")
    loaded = run_python("""
        import json
        import nnclr_tf
        import keras
        model = keras.models.load_model("nnclr.keras")
        print(json.dumps({"process": keras.config.dtype_policy().name, "layers": {
            (layer.path or layer.name).removeprefix(f"{model.name}/"): layer.dtype_policy.name
            for layer in model._flatten_layers()}}))
        """, cwd=tmp_path)
    loaded = json.loads(loaded.splitlines()[-1])
    assert loaded["process"] == "float32"
    assert loaded["layers"] == saved


# 8 (and 12.5): one import makes every documented name work and every saved class loadable.

def test_after_import_nnclr_tf_saved_models_load_with_keras_and_the_project(tmp_path):
    model = small_nnclr()
    model.compile(optimizer=nnclr_tf.LARS(0.1))
    model.fit(views(), epochs=1, verbose=0)
    (tmp_path / "run").mkdir()
    model.save(tmp_path / "run" / "nnclr.keras")
    out = run_python("""
        import nnclr_tf
        import keras
        model = keras.models.load_model("run/nnclr.keras")
        print(type(model).__name__, type(model.optimizer).__name__)
        again = nnclr_tf.export.load_full_model("run/nnclr.keras")
        print(type(again.optimizer).__name__)
        model.compile(optimizer="lars")
        print(type(model.optimizer).__name__)
        """, cwd=tmp_path)
    assert out.split() == ["NNCLR", "LARS", "LARS", "LARS"]


def test_after_import_nnclr_tf_every_documented_name_resolves(tmp_path):
    out = run_python("""
        import nnclr_tf
        names = [nnclr_tf.optim.LARS, nnclr_tf.heads.ProjectionHead, nnclr_tf.support_set.SupportSet,
                 nnclr_tf.backbones.build_backbone, nnclr_tf.model.NNCLR,
                 nnclr_tf.evaluation.knn_evaluate, nnclr_tf.losses.nnclr_loss,
                 nnclr_tf.batch_norm.BatchNormalization, nnclr_tf.augment.view_augmenter,
                 nnclr_tf.evaluate.knn_accuracy]
        names += [getattr(nnclr_tf, name) for name in nnclr_tf.__all__]
        print(len(names))
        """, cwd=tmp_path)
    assert int(out.split()[-1]) == 10 + len(nnclr_tf.__all__)


def test_import_nnclr_tf_config_stays_without_tensorflow(tmp_path):
    out = run_python("""
        import sys
        import nnclr_tf.config
        print(sorted(name for name in ("tensorflow", "keras") if name in sys.modules))
        """, cwd=tmp_path)
    assert out.strip() == "[]"


# 4. Reproducible views.

def test_an_unseeded_augmenter_repeats_under_set_random_seed():
    pixels = np.random.default_rng(2).random((4, 16, 16, 3), dtype=np.float32)
    outputs = []
    for _ in range(2):
        keras.utils.set_random_seed(11)
        outputs.append(view_augmenter(2, 16)(pixels).numpy())
    np.testing.assert_array_equal(outputs[0], outputs[1])


def test_map_views_repeats_under_parallel_map_and_changes_with_the_seed():
    pixels = np.random.default_rng(3).random((16, 16, 16, 3), dtype=np.float32)
    labels = np.arange(16)

    def run(seed):
        ds = tf.data.Dataset.from_tensor_slices((pixels, labels)).batch(2)
        ds = nnclr_tf.map_views(ds, view_augmenter(1, 16), view_augmenter(2, 16), seed=seed)
        return [(v1.numpy(), v2.numpy(), y.numpy()) for (v1, v2), y in ds]

    first, again, other = run(5), run(5), run(6)
    for (a1, a2, ay), (b1, b2, by) in zip(first, again):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
        np.testing.assert_array_equal(ay, by)
    assert not np.array_equal(first[0][0], other[0][0])
    assert not np.array_equal(first[0][0], first[0][1])  # the two views differ


# 5. The encoder contract, checked before training.

class _SubclassedEncoder(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = keras.layers.Conv2D(8, 3)
        self.pool = keras.layers.GlobalAveragePooling2D()

    def call(self, images):
        return self.pool(self.conv(images))


def test_an_encoder_without_input_shape_is_named_at_fit_and_builds_when_told():
    model = small_nnclr(_SubclassedEncoder(name="mine"))
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=r"'mine' has no input shape.*model\.build"):
        model.fit(views(), epochs=1, verbose=0)
    model.build((None, 16, 16, 3))
    history = model.fit(views(), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_a_feature_map_encoder_is_refused_at_construction():
    inputs = keras.Input((16, 16, 3))
    feature_map = keras.Model(inputs, keras.layers.Conv2D(8, 3)(inputs), name="fmap")
    with pytest.raises(ValueError, match=r"'fmap' returns features of shape \(None, 14, 14, 8\)"
                                         r".*GlobalAveragePooling2D"):
        small_nnclr(feature_map)


def test_an_encoder_of_unknown_feature_size_is_refused_at_construction():
    inputs = keras.Input((None, None, 3))
    flat = keras.Model(inputs, keras.layers.Flatten()(inputs), name="flat")
    with pytest.raises(ValueError, match="unknown feature size"):
        small_nnclr(flat)


def test_an_encoder_that_rescales_0_255_input_gets_a_warning():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255.0, name="rescale")(inputs)
    encoder = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))
    with pytest.warns(UserWarning, match=r"'rescale'.*\[0, 255\]"):
        small_nnclr(encoder)


# 6. Batches: Keras' (x, y) shape is accepted; common mistakes get one sentence.

def test_keras_shaped_batches_train():
    view_1, view_2 = views()
    labels = np.arange(4) % 3
    model = small_nnclr(num_classes=3)
    model.compile(optimizer="sgd")
    ds = tf.data.Dataset.from_tensors(((view_1, view_2), labels))
    logs = model.fit(ds, epochs=1, verbose=0).history
    assert "probe_acc" in logs and "nn_acc" in logs
    logs = model.fit([view_1, view_2], labels, batch_size=4, epochs=1, verbose=0).history
    assert "probe_acc" in logs


def _labelled(images, labels):
    return tf.data.Dataset.from_tensors((images, labels))


@pytest.mark.parametrize("dataset, message", [
    (lambda v1, v2: _labelled(v1, np.arange(4)), "labelled image dataset.*map_views"),
    (lambda v1, v2: tf.data.Dataset.from_tensor_slices((v1, v2)),
     r"view_1 has shape \(16, 16, 3\), one image without a batch axis.*ds\.batch"),
    (lambda v1, v2: _labelled(v1, tf.image.resize(v2, (8, 8))).map(lambda a, b: (a, b, [0] * 4)),
     "The views differ in size"),
    (lambda v1, v2: tf.data.Dataset.from_tensors(((v1, v2), np.eye(4, 3, dtype=np.float32))),
     r"labels have shape \(4, 3\), one-hot.*tf\.argmax"),
])
def test_common_batch_mistakes_get_one_sentence(dataset, message):
    model = small_nnclr(num_classes=3)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match=message):
        model.fit(dataset(*views()), epochs=1, verbose=0)


# 7. fit arguments that could only fail late fail at once.

def test_validation_data_without_a_probe_is_refused_before_training():
    model = small_nnclr()
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="num_classes=0"):
        model.fit(views(), epochs=1, verbose=0, validation_data=(views()[0], np.arange(4)))
    assert int(model.optimizer.iterations) == 0


def test_class_weight_is_refused_with_one_sentence():
    model = small_nnclr(num_classes=3)
    model.compile(optimizer="sgd")
    with pytest.raises(ValueError, match="class_weight"):
        model.fit([*views()], np.arange(4) % 3, epochs=1, verbose=0, class_weight={0: 2.0})
    assert int(model.optimizer.iterations) == 0


# 10. The support set is a buffer, not parameters.

def test_the_queue_is_reported_as_a_buffer_not_as_parameters():
    model = small_nnclr(queue_size=1000)
    buffer = 1000 * 8 + 1000 + 1  # embeddings, labels, count
    weights = sum(int(np.prod(w.shape)) for w in model.weights)
    assert model.count_params() == weights - buffer
    lines = []
    model.summary(print_fn=lines.append)
    text = "\n".join(lines)
    assert f"Total params: {model.count_params():,} " in text
    assert f"Support set buffer: {buffer:,} values" in text
