"""`NNCLR(keras.Model)`: the method as a few lines of composition.

    import numpy as np
    from nnclr_tf.backbones import build_backbone
    from nnclr_tf.optim import LARS
    encoder = build_backbone("resnet18", input_shape=(32, 32, 3), cifar_stem=True)
    model = NNCLR(encoder, queue_size=1024, num_classes=10)
    model.compile(optimizer=LARS(0.1))
    view_1, view_2 = np.random.rand(2, 8, 32, 32, 3).astype("float32")  # [batch, H, W, C] each
    labels = np.arange(8)                    # optional: trains the online linear probe
    model.fit((view_1, view_2), labels, epochs=1)   # or nnclr_tf.pretraining_dataset(...)
    features = model.encode(view_1)          # [8, 512]

One training step (`train_step`), per replica under any tf.distribute strategy:
images -> views 1 and 2 -> one encoder pass (shared BN statistics) -> projection z (L2-normalised)
-> prediction p -> NN(z) from the support set (no gradient) -> nnclr_loss with all-gathered
negatives -> gradients -> optimizer -> enqueue the all-gathered z of view 1.
"""

import collections.abc
import inspect
import re
import typing

import keras
import tensorflow as tf
from keras.src.utils import summary_utils  # Keras' own byte formatting, for `summary`

from nnclr_tf import inputs, keras_workarounds
from nnclr_tf.config import POSITIVES
from nnclr_tf.heads import LinearProbe, PredictionHead, ProjectionHead
from nnclr_tf.losses import contrastive_accuracy, nnclr_loss
from nnclr_tf.support_set import SupportSet


def _logs(metrics):
    """{name: result} of `metrics`, shaped for the strategy that runs the step."""
    return keras_workarounds.logs_for_strategy({m.name: m.result() for m in metrics})


def advance_step(optimizer, step_before):
    """Makes `optimizer.iterations` the number of training steps run, skipped ones included.

    Under mixed_float16, Keras' LossScaleOptimizer skips the update of a step whose gradients
    overflow, and with it the increment of `iterations`. The step is what the resume position
    (checkpoints are numbered by it), the learning-rate schedule and the top-k sampling seeds
    read, so each would drift behind the data stream, which advances every step: set it to
    `step_before + 1` after every `apply()`. Adam's bias correction then counts the skipped step
    too, the price of one counter for everything. Other optimizers already advanced it.
    """
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer.iterations.assign(tf.cast(step_before, optimizer.iterations.dtype) + 1)


def _flat_labels(labels):
    return None if labels is None else tf.reshape(tf.cast(labels, tf.int32), [-1])


class _Replicas(typing.NamedTuple):
    """The replica context a step runs in (None outside any strategy) and the replica count."""
    context: tf.distribute.ReplicaContext | None
    count: int

    @classmethod
    def current(cls):
        context = tf.distribute.get_replica_context()
        return cls(context, context.num_replicas_in_sync if context is not None else 1)

    def gather(self, t):
        """Every replica's rows of `t` [batch, ...] in replica order; `t` itself on one."""
        return keras_workarounds.all_gather(self.context, t) if self.count > 1 else t


class _Views(typing.NamedTuple):
    """One replica's tensors of a step: float32 [batch, dim] unless said otherwise."""
    features_1: tf.Tensor  # encoder features of view 1, [batch, features]
    z_1: tf.Tensor  # L2-normalised projections
    z_2: tf.Tensor
    p_1: tf.Tensor  # L2-normalised predictions
    p_2: tf.Tensor
    anchors_1: tf.Tensor  # the positive paired with p_2: NN(z_1) (z_1 when positive="self")
    anchors_2: tf.Tensor  # the positive paired with p_1
    nn_labels: tf.Tensor  # labels of NN(z_1), [batch] int32, -1 where unknown


class _Negatives(typing.NamedTuple):
    """`nnclr_loss`'s cross-replica arguments: `gathered` (None on one replica), label_offset."""
    gathered: tuple | None
    label_offset: tf.Tensor | int


@keras.saving.register_keras_serializable(package="nnclr_tf")
class NNCLR(keras.Model):
    """Nearest-neighbour contrastive learning around any image encoder.

    Args:
      encoder: keras.Model, images [batch, H, W, C] -> features [batch, features], checked when
        the model builds: at construction for an encoder with an input shape (a Functional
        model), else by `model.build((None, H, W, C))`, which `fit` requires first.
      projection_hidden_dims, projection_dim: the projection MLP (paper: (2048, 2048), 256).
      prediction_hidden_dims: the prediction MLP's hidden widths (paper: (4096,)).
      queue_size: rows in the support set (paper: 98,304).
      temperature: softmax temperature (paper: 0.1).
      positive: "nn" (NNCLR) or "self" (anchors are z itself, with gradient: the SimCLR-style
        ablation with a prediction head).
      top_k: sample the neighbour among the top-k (1 = the paper).
      transposed_loss: add the transposed loss terms (see `nnclr_loss`).
      num_classes: > 0 trains an online linear probe on stop_gradient(features) when batches
        carry labels; 0 disables it.
      synchronized_bn: BN statistics over the global batch (all replicas) in the heads, as in
        the paper; on one device, the same statistics.
      queue_write_mode: "auto", "scatter" (CPU/GPU) or "assign" (TPU); see `SupportSet`.
      seed: with top_k > 1, the neighbour sampling is a function of (seed, step, replica, view),
        so a resumed run samples what an uninterrupted one did.

    Training batches: dict {"view_1", "view_2"[, "label"]}, tuple (view_1, view_2[, label]) or
    Keras' (x, y) with x = (view_1, view_2); views [batch, H, W, C] float in [0, 1] of one size,
    labels [batch] integer class ids (see `nnclr_tf.inputs`). Evaluation batches, including
    `validation_data`: (images, labels), scored with the linear probe (probe_loss, probe_acc),
    so they need num_classes > 0. `class_weight` and `sample_weight` are refused: the loss is
    self-supervised and the probe only monitors.

    The support set is a buffer, not parameters: `count_params()` and `summary()` leave it out
    of the parameter counts and `summary()` reports it on its own line.

    The heads follow the model's dtype policy (`dtype=` or the global one at construction), and
    a saved model reloads with the policy it was saved with.
    """

    def __init__(self, encoder, projection_hidden_dims=(2048, 2048), projection_dim=256,
                 prediction_hidden_dims=(4096,), queue_size=98304, temperature=0.1,
                 positive="nn", top_k=1, transposed_loss=False, num_classes=0,
                 synchronized_bn=True, queue_write_mode="auto", seed=0, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(encoder, keras.Model):
            raise ValueError(f"encoder={encoder!r} is not a keras.Model; pass e.g. "
                             "nnclr_tf.backbones.build_backbone('resnet18').")
        if positive not in POSITIVES:
            raise ValueError(f"positive={positive!r} is not one of {POSITIVES}; use 'nn' for "
                             "NNCLR or 'self' for the SimCLR-style ablation.")
        if not float(temperature) > 0:
            raise ValueError(f"temperature={temperature} must be positive; the paper uses 0.1.")
        if int(num_classes) < 0:
            raise ValueError(f"num_classes={num_classes} is negative; pass 0 to disable the "
                             "linear probe.")
        self.encoder = encoder
        self.projection_hidden_dims = tuple(int(d) for d in projection_hidden_dims)
        self.projection_dim = int(projection_dim)
        self.prediction_hidden_dims = tuple(int(d) for d in prediction_hidden_dims)
        self.queue_size = int(queue_size)
        self.temperature = float(temperature)
        self.positive = positive
        self.top_k = int(top_k)
        self.transposed_loss = bool(transposed_loss)
        self.num_classes = int(num_classes)
        self.synchronized_bn = bool(synchronized_bn)
        self.queue_write_mode = queue_write_mode
        self.seed = int(seed)

        # The model's policy (saved in its config), not the process's: a model saved under
        # mixed_bfloat16 reloads with bf16 heads in a float32 process.
        policy = self.dtype_policy
        self.projection_head = ProjectionHead(self.projection_hidden_dims, self.projection_dim,
                                              synchronized_bn, dtype=policy,
                                              name="projection_head")
        self.prediction_head = PredictionHead(self.prediction_hidden_dims, self.projection_dim,
                                              synchronized_bn, dtype=policy,
                                              name="prediction_head")
        self.support_set = SupportSet(self.queue_size, self.projection_dim, top_k=self.top_k,
                                      write_mode=queue_write_mode, name="support_set")
        self.probe = (LinearProbe(self.num_classes, dtype=policy, name="probe")
                      if self.num_classes else None)

        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.contrastive_acc_tracker = keras.metrics.Mean(name="contrastive_acc")
        self.nn_acc_tracker = keras.metrics.Mean(name="nn_acc")
        # Collapse watch: std over the batch of the L2-normalised projections, mean over their
        # dimensions; about 1/sqrt(projection_dim) when healthy, near 0 when all z are alike.
        self.z_std_tracker = keras.metrics.Mean(name="z_std")
        self.probe_loss_tracker = keras.metrics.Mean(name="probe_loss")
        self.probe_acc_tracker = keras.metrics.Mean(name="probe_acc")
        inputs.warn_if_rescaling(encoder)
        # Built now, so that fit/evaluate never trace `call` on a training batch to build it.
        if getattr(encoder, "inputs", None):
            self.build(encoder.input_shape)

    @property
    def metrics(self):
        # Listed here so Keras resets them at the start of every epoch / evaluation.
        return [self.loss_tracker, self.contrastive_acc_tracker, self.nn_acc_tracker,
                self.probe_loss_tracker, self.probe_acc_tracker, self.z_std_tracker]

    def _unbuilt_message(self):
        return (f"The encoder {self.encoder.name!r} has no input shape, so NNCLR cannot build its "
                "heads and support set; call model.build((None, H, W, C)) with your image shape "
                "before fit, or wrap the encoder in a Functional model: inputs = "
                "keras.Input((H, W, C)); encoder = keras.Model(inputs, encoder(inputs)).")

    def fit(self, *args, **kwargs):
        """`keras.Model.fit`, after the checks that would otherwise fail only after an epoch."""
        arguments = inspect.signature(super().fit).bind(*args, **kwargs).arguments
        if not self.built:
            raise ValueError(self._unbuilt_message())
        for name in ("class_weight", "sample_weight"):
            if arguments.get(name) is not None:
                raise ValueError(
                    f"model.fit got {name}=..., which NNCLR does not support: its loss is "
                    "self-supervised and its linear probe only monitors the features; drop "
                    f"{name} (nnclr_tf.evaluation.linear_evaluation trains a probe of its own).")
        if self.probe is None and (arguments.get("validation_data") is not None
                                   or arguments.get("validation_split")):
            raise ValueError(
                "model.fit got validation data, which NNCLR scores with its linear probe, but "
                "this model has num_classes=0 (no probe); build it with num_classes=<number of "
                "classes>, or drop validation_data and monitor the encoder with "
                "nnclr_tf.evaluation.KNNMonitor.")
        return super().fit(*args, **kwargs)

    def count_params(self):
        """Parameters of the encoder, heads and probe: the support set is a buffer, not counted."""
        return super().count_params() - self.support_set.buffer_size()

    def summary(self, *args, print_fn=None, **kwargs):
        """`keras.Model.summary`, with the support set's buffer out of the parameter counts."""
        captured = []
        super().summary(*args, print_fn=lambda text, **_: captured.append(text), **kwargs)
        buffer = self.support_set.buffer_size()
        memory = summary_utils.weight_memory_size
        buffer_bytes = memory(self.support_set.weights)
        optimizer = getattr(self, "optimizer", None) if self.compiled else None
        optimizer = optimizer.variables if optimizer is not None and optimizer.built else []
        # Keras' totals, as it computes them, less the buffer.
        sizes = {"Total": memory(self.weights) + memory(optimizer) - buffer_bytes,
                 "Non-trainable": memory(self.non_trainable_weights) - buffer_bytes}

        def without_buffer(match):
            count = int(match.group(3).replace(",", "")) - buffer
            size = summary_utils.readable_memory_size(sizes[match.group(2)])
            return f"{match.group(1)}{count:,} ({size})"

        text = re.sub(r"( (Total|Non-trainable) params: )([\d,]+) \([^)]*\)", without_buffer,
                      "\n".join(captured))
        text += (f"\n Support set buffer: {buffer:,} values "
                 f"({summary_utils.readable_memory_size(buffer_bytes)}), the queue of "
                 f"{self.queue_size:,} past embeddings: saved with the model, not parameters")
        (print_fn or print)(text)

    def build(self, input_shape=None):
        """Creates every weight (heads, queue, probe) from the images' [batch, H, W, C]."""
        if input_shape is None and not getattr(self.encoder, "inputs", None):
            raise ValueError(self._unbuilt_message())
        input_shape = tuple(input_shape if input_shape is not None else self.encoder.input_shape)
        features_shape = inputs.encoder_features_shape(self.encoder, input_shape)
        z_shape = features_shape[:-1] + (self.projection_dim,)
        for layer, shape in ((self.projection_head, features_shape),
                             (self.prediction_head, z_shape), (self.support_set, z_shape),
                             (self.probe, features_shape)):
            if layer is not None and not layer.built:
                layer.build(shape)

    def call(self, images, training=False):
        """[batch, H, W, C] -> encoder features [batch, features]."""
        return self.encoder(images, training=training)

    def encode(self, images):
        """Inference features, float32 [batch, features]."""
        return tf.cast(self.encoder(images, training=False), tf.float32)

    def _embed(self, features, training):
        z = tf.math.l2_normalize(
            tf.cast(self.projection_head(features, training=training), tf.float32), axis=-1)
        p = tf.math.l2_normalize(
            tf.cast(self.prediction_head(z, training=training), tf.float32), axis=-1)
        return z, p

    def _probe_step(self, features, labels):
        logits = self.probe(tf.stop_gradient(features))
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
        accuracy = tf.reduce_mean(tf.cast(
            tf.equal(tf.argmax(logits, axis=-1, output_type=tf.int32), labels), tf.float32))
        self.probe_loss_tracker.update_state(loss)
        self.probe_acc_tracker.update_state(accuracy)
        return loss

    def _sampling_seeds(self, replicas):
        """Stateless seeds for the top-k draw of each view: (seed, step) folded with the replica."""
        if self.top_k == 1:
            return None, None
        seed = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(self.optimizer.iterations, tf.int64)])
        if replicas.count > 1:
            seed = tf.random.experimental.stateless_fold_in(
                seed, replicas.context.replica_id_in_sync_group)
        return (tf.random.experimental.stateless_fold_in(seed, 1),
                tf.random.experimental.stateless_fold_in(seed, 2))

    def train_step(self, data):
        """One step on this replica's share of the batch; returns the logs {name: value}.

        Forward and lookup, negatives from all replicas, the loss (plus the probe's, when the
        batch has labels), the update, then the enqueue of view 1's projections and the metrics.
        """
        view_1, view_2, labels = inputs.unpack_views(data)
        labels = _flat_labels(labels)
        replicas = _Replicas.current()
        with tf.GradientTape() as tape:
            views = self._forward_and_look_up(view_1, view_2, replicas)
            negatives = self._global_negatives(views, replicas)
            loss = nnclr_loss(views.anchors_1, views.anchors_2, views.p_1, views.p_2,
                              self.temperature, transposed=self.transposed_loss,
                              gathered=negatives.gathered, label_offset=negatives.label_offset)
            total = loss
            with_probe = self.probe is not None and labels is not None
            if with_probe:
                total += self._probe_step(views.features_1, labels)
        self._gradient_step(tape, total, replicas)
        queued = self._enqueue(views.z_1, labels, replicas)
        return self._update_metrics(loss, views, negatives, queued, labels, with_probe)

    def _forward_and_look_up(self, view_1, view_2, replicas):
        """Encoder, heads and support-set lookup for both views, under the caller's tape.

        Both views go through the encoder in one pass, so its batch norms (and the heads') see
        the statistics of both. The neighbours come from the support set as it was before this
        step's enqueue, without gradient.
        """
        batch = tf.shape(view_1)[0]
        features = self.encoder(tf.concat([view_1, view_2], axis=0), training=True)
        z, p = self._embed(features, training=True)
        z_1, z_2, p_1, p_2 = z[:batch], z[batch:], p[:batch], p[batch:]
        seed_1, seed_2 = self._sampling_seeds(replicas)
        nn_1, nn_labels = self.support_set.nearest_neighbour(z_1, return_labels=True, seed=seed_1)
        nn_2 = self.support_set.nearest_neighbour(z_2, seed=seed_2)
        anchors_1, anchors_2 = (nn_1, nn_2) if self.positive == "nn" else (z_1, z_2)
        return _Views(features[:batch], z_1, z_2, p_1, p_2, anchors_1, anchors_2, nn_labels)

    def _global_negatives(self, views, replicas):
        """Every replica's predictions (and anchors, for the transposed loss) as negatives.

        Under several replicas, one all_gather (one collective each way) brings the tensors the
        loss needs from all replicas, [global_batch, dim] each, in replica order; this replica's
        rows start at `label_offset`. On one replica the loss uses the local batch as it is.
        """
        if replicas.count == 1:
            return _Negatives(None, 0)
        parts = [views.p_1, views.p_2]
        if self.transposed_loss:
            parts += [views.anchors_1, views.anchors_2]
        parts = tf.split(replicas.gather(tf.concat(parts, axis=1)), len(parts), axis=1)
        gathered = (parts[2], parts[3]) if self.transposed_loss else (None, None)
        offset = tf.cast(replicas.context.replica_id_in_sync_group, tf.int32) * tf.shape(
            views.p_1)[0]
        return _Negatives(gathered + (parts[0], parts[1]), offset)

    def _gradient_step(self, tape, total, replicas):
        """Gradients of `total` on the trainable variables, applied; `iterations` advances by 1.

        The optimizer sums the replicas' gradients, so each replica's loss is divided by their
        number: the sum is the gradient of the global batch's mean. `scale_loss` is the float16
        loss scale (the identity otherwise), and gradients of variables the loss does not reach
        (None) are left out.
        """
        with tape:  # recorded on the step's tape: the scaled loss is what is differentiated
            scaled = self.optimizer.scale_loss(total / replicas.count)
        variables = self.trainable_variables
        pairs = [(g, v) for g, v in zip(tape.gradient(scaled, variables), variables)
                 if g is not None]
        step = tf.identity(self.optimizer.iterations)  # read before apply() advances it
        self.optimizer.apply([g for g, _ in pairs], [v for _, v in pairs])
        advance_step(self.optimizer, step)

    def _enqueue(self, z_1, labels, replicas):
        """Writes the global batch's z_1 (and labels) into the support set, after the lookup.

        Every replica writes the same all-gathered rows, in replica order, into its own copy of
        the queue, so the copies stay equal. Returns the rows written, [global_batch, dim].
        """
        queued = replicas.gather(z_1)
        self.support_set.enqueue(queued, None if labels is None else replicas.gather(labels))
        return queued

    def _update_metrics(self, loss, views, negatives, queued, labels, with_probe):
        """Updates the step's metrics and returns their logs {name: value}.

        loss, contrastive_acc and z_std always; nn_acc (labels of NN(z_1) against the batch's)
        when the batch has labels; probe_loss and probe_acc (updated by `_probe_step`) when the
        probe trained.
        """
        self.loss_tracker.update_state(loss)
        g_p_1, g_p_2 = (negatives.gathered[2:] if negatives.gathered is not None
                        else (None, None))
        offset = negatives.label_offset
        self.contrastive_acc_tracker.update_state(0.5 * (  # over the global batch's columns
            contrastive_accuracy(views.anchors_1, views.p_2, predictions_global=g_p_2,
                                 label_offset=offset)
            + contrastive_accuracy(views.anchors_2, views.p_1, predictions_global=g_p_1,
                                   label_offset=offset)))
        # Over the global batch, so that it is the same number under any number of replicas.
        self.z_std_tracker.update_state(tf.reduce_mean(tf.math.reduce_std(queued, axis=0)))
        logs = [self.loss_tracker, self.contrastive_acc_tracker, self.z_std_tracker]
        if labels is not None:
            self.nn_acc_tracker.update_state(
                tf.reduce_mean(tf.cast(tf.equal(views.nn_labels, labels), tf.float32)))
            logs.append(self.nn_acc_tracker)
        if with_probe:
            logs += [self.probe_loss_tracker, self.probe_acc_tracker]
        return _logs(logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # NNCLR creates all its weights in build(): see keras_workarounds.build_optimizer_only.
        return keras_workarounds.build_optimizer_only(
            self, super()._maybe_symbolic_build, iterator=iterator, data_batch=data_batch)

    def test_step(self, data):
        if isinstance(data, collections.abc.Mapping):
            images, labels = data.get("image", data.get("view_1")), data.get("label")
        elif isinstance(data, (list, tuple)):
            images, labels = data[0], data[1] if len(data) > 1 else None
        else:
            images, labels = data, None
        # Keras cannot run an evaluation step that returns no logs, so say why instead.
        if self.probe is None:
            raise ValueError("This NNCLR model has num_classes=0, so it has no linear probe to "
                             "evaluate; build it with num_classes > 0 or use nnclr_tf.evaluate.")
        if labels is None:
            raise ValueError("The evaluation batch has no labels; pass (images, labels) batches "
                             "to evaluate the linear probe.")
        self._probe_step(self.encoder(images, training=False), _flat_labels(labels))
        return _logs((self.probe_loss_tracker, self.probe_acc_tracker))

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            projection_hidden_dims=self.projection_hidden_dims,
            projection_dim=self.projection_dim,
            prediction_hidden_dims=self.prediction_hidden_dims,
            queue_size=self.queue_size, temperature=self.temperature, positive=self.positive,
            top_k=self.top_k, transposed_loss=self.transposed_loss,
            num_classes=self.num_classes, synchronized_bn=self.synchronized_bn,
            queue_write_mode=self.queue_write_mode, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        # Rebuilt under the policy it was saved with, as it was built: layers that took the
        # global policy then (the Functional encoder, its inputs) take the same one now.
        saved = keras.dtype_policies.deserialize(config["dtype"]) if config.get("dtype") else None
        previous = keras.config.dtype_policy()
        try:
            if saved is not None:
                keras.config.set_dtype_policy(saved)
            config["encoder"] = keras.saving.deserialize_keras_object(config["encoder"])
            return cls(**config)
        finally:
            keras.config.set_dtype_policy(previous)
