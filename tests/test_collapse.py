"""The collapse watch: NNCLR logs z_std, the batch std of the L2-normalised projections."""

import keras
import numpy as np
import tensorflow as tf

from test_model import dataset, small_model, structured_views


def test_z_std_is_the_batch_std_of_the_normalised_projections():
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0))  # weights stay as they are
    view_1, view_2, _ = structured_views(16)
    # NumPy reference on the same forward pass: both views through the encoder together (its
    # batch norm sees both), projections of view 1, L2-normalised.
    features = model.encoder(np.concatenate([view_1, view_2]), training=True)
    z = model.projection_head(features, training=True).numpy()[:16]
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    expected = z.std(axis=0).mean()
    history = model.fit(dataset("dict_labels", n=16), epochs=1, shuffle=False, verbose=0).history
    np.testing.assert_allclose(history["z_std"][0], expected, rtol=1e-4)
    assert expected > 0.3 / np.sqrt(z.shape[1])  # healthy at initialisation, not collapsed


def test_z_std_is_zero_when_every_projection_is_the_same():
    model = small_model()
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    view = np.full([16, 16, 16, 3], 0.5, np.float32)  # one image: every z identical
    ds = tf.data.Dataset.from_tensor_slices((view, view)).batch(16)
    history = model.fit(ds, epochs=1, verbose=0).history
    np.testing.assert_allclose(history["z_std"][0], 0.0, atol=1e-6)
