"""One NNCLR training run in a process of its own, for tests/test_distribute.py.

Distributed checks need a fresh process each: logical CPU devices must be set before TensorFlow
starts, and TF 2.21 refuses a second MirroredStrategy in a process where one has trained. What runs
here is plain user code (build in strategy.scope(), compile, fit): any workaround a strategy needs
belongs in the library.

    python tests/distributed_worker.py mirrored OUT.npz      # 2 logical CPUs -> OUT.npz, then one
                                                             # device on the same global batches -> OUT.single.npz
    TF_CONFIG=... python tests/distributed_worker.py multi_worker OUT.npz   # one process per worker
    python tests/distributed_worker.py xla OUT.npz           # one device, jit_compile=True -> OUT.npz,
                                                             # then without XLA -> OUT.nojit.npz
    python tests/distributed_worker.py pretrain OUT.npz --model_dir=D --cpu_replicas=2 --steps=4
                                                             # nnclr_tf.train.pretrain on the tiny preset
    python tests/distributed_worker.py eval OUT.npz          # linear evaluation and fine-tuning on 2
                                                             # logical CPUs -> OUT.npz, one device -> OUT.single.npz

The data are fixed random images whose label is the sample's id: global batch s holds ids
[s * G, (s + 1) * G) and replica r its rows [r * L, (r + 1) * L) (L = G / replicas), so the support
set's labels say which sample each row came from. OUT.npz holds the weights (in model order),
every local replica's copy of the support set, the per-step logs and the replica count.
"""

import argparse
import json
import sys

import keras
import numpy as np
import tensorflow as tf  # importing starts no device: logical CPUs can still be set

from nnclr_tf import backbones, distribute, optim
from nnclr_tf import config as cfg
from nnclr_tf import train as train_lib
from nnclr_tf.model import NNCLR

GLOBAL_BATCH = 16
IMAGE_SIZE = 16
QUEUE_SIZE = 40  # not a multiple of the global batch: enqueues wrap around mid-batch


def parse_args(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["mirrored", "multi_worker", "xla", "pretrain", "eval"])
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--write_mode", default="auto")
    parser.add_argument("--encoder", choices=["smooth", "resnet"], default="smooth")
    parser.add_argument("--learning_rate", type=float, default=0.5)
    parser.add_argument("--model_dir")
    parser.add_argument("--data_dir")
    parser.add_argument("--cpu_replicas", type=int, default=0)
    parser.add_argument("--strategy", default="auto")
    return parser.parse_args(argv)


def images_for(ids):
    """Two deterministic views per sample id, each [n, 16, 16, 3] float32 in [0, 1]."""
    return [np.stack([np.random.default_rng([int(i), view]).uniform(size=(IMAGE_SIZE, IMAGE_SIZE, 3))
                      for i in ids]).astype(np.float32) for view in (1, 2)]


def replica_batches(replica_ids, num_replicas, steps):
    """The batches of the replicas `replica_ids` (one input pipeline's), step by step in turn."""
    local = GLOBAL_BATCH // num_replicas
    ids = np.concatenate([np.arange(s * GLOBAL_BATCH + r * local, s * GLOBAL_BATCH + (r + 1) * local)
                          for s in range(steps) for r in replica_ids])
    view_1, view_2 = images_for(ids)
    ds = tf.data.Dataset.from_tensor_slices(
        {"view_1": view_1, "view_2": view_2, "label": ids.astype(np.int32)})
    return ds.batch(local, drop_remainder=True)


def encoder(kind):
    if kind == "resnet":
        return backbones.resnet((IMAGE_SIZE, IMAGE_SIZE, 3), stage_blocks=(1, 1),
                                width_multiplier=0.125, cifar_stem=True, synchronized_bn=True)
    # Synchronised BN as in the backbones, but smooth activations: a ReLU input within float32
    # rounding of 0 flips with the summation order (see test_distribute.py).
    images = keras.Input((IMAGE_SIZE, IMAGE_SIZE, 3))
    x = images
    for filters, strides in ((8, 1), (16, 2)):
        x = keras.layers.Conv2D(filters, 3, strides=strides, padding="same", use_bias=False)(x)
        x = keras.layers.BatchNormalization(synchronized=True)(x)
        x = keras.layers.Activation("swish")(x)
    return keras.Model(images, keras.layers.GlobalAveragePooling2D()(x), name="smooth")


def train(strategy, args, jit_compile=False):
    """Fits NNCLR for args.steps global batches; returns (model, per-step logs, initial weights)."""
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = NNCLR(encoder(args.encoder), projection_hidden_dims=(32,), projection_dim=16,
                      prediction_hidden_dims=(32,), queue_size=QUEUE_SIZE,
                      num_classes=GLOBAL_BATCH * args.steps, transposed_loss=True,
                      synchronized_bn=True, queue_write_mode=args.write_mode)
        model.compile(optimizer=optim.LARS(args.learning_rate, momentum=0.9, weight_decay=1e-4),
                      jit_compile=jit_compile)
    replicas = strategy.num_replicas_in_sync
    if replicas > 1:
        def dataset_fn(context):
            per_pipeline = replicas // context.num_input_pipelines
            first = context.input_pipeline_id * per_pipeline
            return replica_batches(range(first, first + per_pipeline), replicas, args.steps)
        data = strategy.distribute_datasets_from_function(dataset_fn)
    else:
        data = replica_batches([0], 1, args.steps)
    initial = [local_copies(v)[0] for v in model.weights]
    history = []
    model.fit(data, epochs=1, steps_per_epoch=args.steps, verbose=0,
              callbacks=[RecordLogs(history)])
    return model, history, initial


class RecordLogs(keras.callbacks.Callback):
    """Appends every step's logs to `history`."""

    def __init__(self, history):
        super().__init__()
        self.history = history

    def on_train_batch_end(self, batch, logs=None):
        self.history.append({k: float(v) for k, v in (logs or {}).items()})


def local_copies(variable):
    """Every local replica's copy of a Keras variable, as NumPy arrays."""
    value = variable.value
    return [c.numpy() for c in getattr(value, "values", None) or (value,)]


def save(path, model, history, replicas, initial=None, **extra):
    arrays = {f"weight/{i:03d}": local_copies(v)[0] for i, v in enumerate(model.weights)}
    arrays.update({f"initial/{i:03d}": w for i, w in enumerate(initial or [])})
    arrays["jit_compile"] = np.array(bool(model.jit_compile))
    arrays["weight_names"] = np.array([v.path.split("/", 1)[-1] for v in model.weights])
    support_set = model.support_set
    for name in ("embeddings", "labels", "count"):
        for i, copy in enumerate(local_copies(getattr(support_set, name))):
            arrays[f"queue/{name}/{i}"] = copy
    arrays["ordered"] = support_set.ordered().numpy()
    arrays["logs"] = np.array(json.dumps(history))
    arrays["replicas"] = np.array(replicas)
    arrays.update(extra)
    np.savez(path, **arrays)


def pretrain(args):
    """nnclr_tf.train.pretrain on the tiny preset; records the step and queue it starts from."""
    config = cfg.override(cfg.get_preset("tiny"), {
        "run.model_dir": args.model_dir, "data.data_dir": args.data_dir,
        "run.strategy": args.strategy, "run.cpu_replicas": args.cpu_replicas,
        "optim.train_steps": args.steps, "run.report": False, "run.export": False,
        "run.allow_config_change": True})  # the tests resume a run for more steps
    start = {}

    class AtStart(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            start["step"] = int(self.model.optimizer.iterations.numpy())
            start["queue"] = np.array(self.model.support_set.embeddings.numpy())
            start["count"] = int(self.model.support_set.count.numpy())

    history = []
    result = train_lib.pretrain(config, verbose=0, callbacks=[AtStart(), RecordLogs(history)])
    model = result.model
    save(args.out, model, history, model.distribute_strategy.num_replicas_in_sync,
         start_step=np.array(start.get("step", -1)), start_count=np.array(start.get("count", -1)),
         start_queue=start.get("queue", np.zeros([0])),
         end_step=np.array(int(model.optimizer.iterations.numpy())))


def classification_data(count, seed):
    """(images [count, 16, 16, 3] in [0, 1], labels [count] in 0..2): the class's channel is brighter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=count)
    images = rng.uniform(0.0, 0.8, size=(count, IMAGE_SIZE, IMAGE_SIZE, 3))
    images[np.arange(count), :, :, labels] += 0.2
    return images.astype(np.float32), labels.astype(np.int64)


def evaluate_under(strategy, out):
    """linear_evaluation and fine_tune of one seeded encoder under `strategy`, on fixed data
    (250 training images in global batches of 32: the last, of 26, is doubled so that each of two
    replicas gets an even 26); saves the top-1s and the fine-tuned weights."""
    from nnclr_tf import evaluate
    # A dataset in a fixed order: arrays are reshuffled per iteration, and Keras iterates a
    # dataset under a strategy once more than on one device, so the epochs' orders would differ.
    train = tf.data.Dataset.from_tensor_slices(classification_data(250, 1)).batch(32)
    test = classification_data(128, 2)
    arrays = {}
    keras.utils.set_random_seed(0)
    with strategy.scope():
        frozen = encoder("smooth")
    keras.utils.set_random_seed(1)
    linear = evaluate.linear_evaluation(frozen, train, test, num_classes=3, epochs=3,
                                        learning_rate=0.1, batch_size=32, strategy=strategy)
    keras.utils.set_random_seed(2)
    tuned, classifier = evaluate.fine_tune(frozen, train, test, num_classes=3, epochs=2,
                                           learning_rate=0.05, batch_size=32, strategy=strategy)
    arrays["linear_top1"], arrays["finetune_top1"] = linear["top1"], tuned["top1"]
    arrays["num_test"] = np.array([linear["num_test"], tuned["num_test"]])
    for i, weight in enumerate(classifier.weights):
        arrays[f"finetuned/{i:03d}"] = local_copies(weight)[0]
    arrays["initial"] = np.concatenate([w.reshape(-1) for w in frozen.get_weights()])
    arrays["replicas"] = np.array(strategy.num_replicas_in_sync)
    np.savez(out, **arrays)


def main(argv):
    args = parse_args(argv)
    if args.mode == "pretrain":
        pretrain(args)
    elif args.mode == "eval":
        strategy = distribute.get_strategy("mirrored", cpu_replicas=2)
        distribute.set_precision("float32", strategy)
        evaluate_under(strategy, args.out)
        evaluate_under(tf.distribute.get_strategy(), args.out.replace(".npz", ".single.npz"))
    else:
        if args.mode == "mirrored":
            strategy = distribute.get_strategy("mirrored", cpu_replicas=2)
        elif args.mode == "multi_worker":
            strategy = distribute.get_strategy("multi_worker")
        else:
            strategy = distribute.get_strategy("default")
        distribute.set_precision("float32", strategy)
        model, history, initial = train(strategy, args, jit_compile=args.mode == "xla")
        save(args.out, model, history, strategy.num_replicas_in_sync, initial)
        if args.mode in ("mirrored", "xla"):  # the reference: one device, no XLA, same batches
            model, history, initial = train(tf.distribute.get_strategy(), args)
            suffix = ".single.npz" if args.mode == "mirrored" else ".nojit.npz"
            save(args.out.replace(".npz", suffix), model, history, 1, initial)
    print("WORKER_OK", args.mode, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
