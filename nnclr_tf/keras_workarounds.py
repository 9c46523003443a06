"""Workarounds for Keras 3 / TensorFlow under tf.distribute, each in one place.

Written for Keras 3.15.1 and TensorFlow 2.21.0. Each entry says what it works around, where it is
known upstream, and how to tell when it can go: remove the workaround, run the test named, and
keep the removal if it passes.

1. `logs_for_strategy`: Keras reduces a train/test step's logs across MultiWorkerMirroredStrategy
   workers with `strategy.reduce(MEAN, value, axis=0)`, which fails on the scalars a metric
   returns ("Invalid reduction dimension 0 for input with 0 dimensions"). Upstream:
   tensorflow/tensorflow#72388, keras-team/keras#20585 (Keras 3 with that strategy). Scalars get
   one axis there. Remove when `pytest -m slow tests/test_distribute.py -k two_workers` passes
   without it.

2. `build_optimizer_only`: before fit/evaluate under a strategy, Keras pulls a first batch and
   `strategy.reduce()`s it to build the model symbolically (`Trainer._maybe_symbolic_build`);
   under MultiWorkerMirroredStrategy that reduce fails on a dict or tuple batch, and costs a
   cross-worker collective. No upstream issue names this exact failure; keras-team/keras#20329
   reports MultiWorkerMirroredStrategy with dict inputs failing in Keras 3. A model whose layers
   are all built needs only its optimizer built, which this does without pulling a batch.
   Remove when the multi-worker test above passes with dict batches and Keras' own method.

3. `all_gather`: `ReplicaContext.all_gather` of a tensor that comes straight from the input
   pipeline (a label, or a slice of one) fails under MultiWorkerMirroredStrategy; a `tf.identity`
   first makes it an ordinary tensor of the step. No upstream issue found (TensorFlow 2.21).
   Remove the identity when the multi-worker test above passes without it.

4. `multi_step_execution_supported`: under a MirroredStrategy or MultiWorkerMirroredStrategy of
   several replicas, Keras runs `steps_per_execution > 1` as a while loop whose `tf.cond` around
   the step cannot hold the optimizer's merge_call ("You must feed a value for placeholder tensor
   'while/body/...'"): keras-team/keras#19246 (open). Training uses 1 step per execution there.
   Remove when that issue is closed and a mirrored fit with steps_per_execution=4 trains
   (`distribute.resolve_steps_per_execution` with the limit lifted).

5. `jit_compile_supported`: under a mirrored strategy of several replicas, Keras compiles every
   replica's step into one XLA program on the first device, which cannot reach the other
   devices' variables ("Trying to access resource ... located in device GPU:1 from device
   GPU:0"): keras-team/keras#19005. TPUStrategy compiles each replica itself and keeps XLA.
   Remove when a mirrored fit with jit_compile=True trains on 2 logical CPUs.
"""

import tensorflow as tf


def logs_for_strategy(logs):
    """{name: scalar} -> the same, with each value [1] under a multi-worker strategy (entry 1)."""
    strategy = tf.distribute.get_strategy()
    if (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
            and strategy.extended._in_multi_worker_mode()):  # pylint: disable=protected-access
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def build_optimizer_only(model, keras_symbolic_build, iterator=None, data_batch=None):
    """`Trainer._maybe_symbolic_build` for a model whose layers are all built (entry 2).

    Args:
      model: the keras.Model about to fit or evaluate.
      keras_symbolic_build: Keras' own method, bound to `model` (`super()._maybe_symbolic_build`),
        used when there is no strategy or some layer is still unbuilt.
      iterator, data_batch: as Keras passes them.
    """
    # pylint: disable=protected-access
    if model._distribute_strategy is None or not all(
            layer.built for layer in model._flatten_layers()):
        return keras_symbolic_build(iterator=iterator, data_batch=data_batch)
    with model.distribute_strategy.scope():
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    return None


def all_gather(ctx, t):
    """`ctx.all_gather(t, axis=0)`: every replica's rows of `t` [batch, ...], in replica order,
    [replicas * batch, ...] (entry 3)."""
    return ctx.all_gather(tf.identity(t), axis=0)


def multi_step_execution_supported(mirrored: bool) -> bool:
    """Whether Keras can run several steps per execution: not under mirrored replicas (entry 4).

    mirrored: a MirroredStrategy or MultiWorkerMirroredStrategy of several replicas.
    """
    return not mirrored


def jit_compile_supported(num_replicas: int, tpu: bool) -> bool:
    """Whether Keras can XLA-compile the train step: on TPUs and on one replica (entry 5)."""
    return tpu or num_replicas <= 1
