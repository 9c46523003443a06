"""Projection MLP, prediction MLP and the online linear probe.

    import tensorflow as tf
    features = tf.random.normal([8, 512])      # encoder(images): [batch, features]
    z = ProjectionHead()(features)             # [batch, 256]
    p = PredictionHead()(z)                    # [batch, 256]
    logits = LinearProbe(10)(features)         # [batch, 10], never trains the encoder

The last layer of each head computes in float32 so the loss and the support set stay float32
under a mixed_bfloat16 policy.
"""

import keras
import tensorflow as tf

from nnclr_tf.batch_norm import BatchNormalization


def _check_dims(name, hidden_dims, output_dim):
    dims = tuple(int(d) for d in hidden_dims) + (int(output_dim),)
    if any(d < 1 for d in dims):
        raise ValueError(f"{name} dims hidden={tuple(hidden_dims)}, output={output_dim} must "
                         "all be positive; pass widths such as hidden_dims=(2048, 2048).")
    return dims[:-1], dims[-1]


class _MLPHead(keras.layers.Layer):
    """(Dense -> BN -> ReLU) per hidden width, then the subclass's output layers.

    The hidden layers are two flat lists (not a list of pairs) so Keras tracks and saves every
    sublayer; their names (`dense_i`, `bn_i`) are the weight paths that checkpoints key on.
    """

    def __init__(self, hidden_dims, output_dim, synchronized_bn, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dims, self.output_dim = _check_dims(type(self).__name__, hidden_dims,
                                                        output_dim)
        self.synchronized_bn = bool(synchronized_bn)
        # The hidden layers follow the head's policy (Keras does not pass it down to sublayers),
        # so a head saved under mixed_bfloat16 loads as one in a float32 process.
        policy = self.dtype_policy
        self.hidden_dense = [keras.layers.Dense(width, use_bias=False, dtype=policy,
                                                name=f"dense_{i}")
                             for i, width in enumerate(self.hidden_dims)]
        self.hidden_bn = [BatchNormalization(synchronized=self.synchronized_bn, dtype=policy,
                                             name=f"bn_{i}")
                          for i in range(len(self.hidden_dims))]

    def _build_hidden(self, input_shape):
        """Builds the hidden layers; returns the shape they output."""
        shape = tuple(input_shape)
        for dense, bn in zip(self.hidden_dense, self.hidden_bn):
            dense.build(shape)
            shape = dense.compute_output_shape(shape)
            bn.build(shape)
        return shape

    def _hidden(self, x, training):
        for dense, bn in zip(self.hidden_dense, self.hidden_bn):
            x = tf.nn.relu(bn(dense(x), training=training))
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(hidden_dims=self.hidden_dims, output_dim=self.output_dim,
                      synchronized_bn=self.synchronized_bn)
        return config


@keras.saving.register_keras_serializable(package="nnclr_tf")
class ProjectionHead(_MLPHead):
    """[batch, features] -> [batch, output_dim] float32.

    (Dense without bias -> BN -> ReLU) per hidden width, then Dense -> BN without ReLU
    (the paper: batch norm after every layer, ReLU after all but the last).
    `synchronized_bn` (default, as in the paper) computes the BN statistics over all replicas.
    """

    def __init__(self, hidden_dims=(2048, 2048), output_dim=256, synchronized_bn=True,
                 **kwargs):
        super().__init__(hidden_dims, output_dim, synchronized_bn, **kwargs)
        last = len(self.hidden_dims)
        self.output_dense = keras.layers.Dense(self.output_dim, use_bias=False,
                                               dtype="float32", name=f"dense_{last}")
        self.output_bn = BatchNormalization(synchronized=self.synchronized_bn, dtype="float32",
                                            name=f"bn_{last}")

    def build(self, input_shape):
        shape = self._build_hidden(input_shape)
        self.output_dense.build(shape)
        self.output_bn.build(self.output_dense.compute_output_shape(shape))

    def call(self, features, training=None):
        x = self._hidden(features, training)
        return self.output_bn(self.output_dense(x), training=training)


@keras.saving.register_keras_serializable(package="nnclr_tf")
class PredictionHead(_MLPHead):
    """[batch, dim] -> [batch, output_dim] float32: (Dense -> BN -> ReLU) per hidden, Dense."""

    def __init__(self, hidden_dims=(4096,), output_dim=256, synchronized_bn=True, **kwargs):
        super().__init__(hidden_dims, output_dim, synchronized_bn, **kwargs)
        self.output_dense = keras.layers.Dense(self.output_dim, dtype="float32",
                                               name=f"dense_{len(self.hidden_dims)}")

    def build(self, input_shape):
        self.output_dense.build(self._build_hidden(input_shape))

    def call(self, z, training=None):
        return self.output_dense(self._hidden(z, training))


@keras.saving.register_keras_serializable(package="nnclr_tf")
class LinearProbe(keras.layers.Layer):
    """[batch, features] -> [batch, num_classes] float32 logits.

    Trained jointly with the self-supervised loss to monitor the representation; its input
    goes through stop_gradient so the labels never shape the encoder.
    """

    def __init__(self, num_classes, **kwargs):
        super().__init__(**kwargs)
        if int(num_classes) < 1:
            raise ValueError(f"LinearProbe num_classes={num_classes} must be positive; "
                             "pass the number of label classes.")
        self.num_classes = int(num_classes)
        self.dense = keras.layers.Dense(self.num_classes, dtype="float32", name="logits")

    def build(self, input_shape):
        self.dense.build(tuple(input_shape))

    def call(self, features):
        return self.dense(tf.stop_gradient(features))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(num_classes=self.num_classes)
        return config
